//! The HBONE server (port 15008): one mutual-TLS connection in, many CONNECT streams out to the
//! caller. Checks ALPN, runs HTTP/2 with the §1.2 server settings, answers malformed requests
//! with 400 itself and hands every well-formed CONNECT to the caller as an [`IncomingConnect`],
//! which the caller accepts (200) or refuses. Knows nothing about policy or upstreams.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::keepalive::keepalive;
use super::{ALPN_H2, Authority, H2Settings, H2Stream, HboneError};
use crate::identity::SpiffeId;

/// How long a client gets for the TLS handshake before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TCP connection a TLS stream runs over, as the listener saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub peer_addr: SocketAddr,
    /// The address the connection arrived on: the pod IP and 15008.
    pub local_addr: SocketAddr,
}

/// Why the caller turns a CONNECT down; the reason is for logs, never sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request makes no sense for this destination.
    BadRequest(String),
    /// 401: authorization policy denied it.
    Denied(String),
    /// 503: the destination is unknown or unreachable.
    Unavailable(String),
}

impl Refusal {
    /// The HTTP status the peer receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Refusal::BadRequest(reason)
            | Refusal::Denied(reason)
            | Refusal::Unavailable(reason) => reason,
        }
    }
}

/// A well-formed CONNECT waiting for the caller's answer. Dropping it unanswered answers 503.
#[derive(Debug)]
pub struct IncomingConnect {
    pub authority: Authority,
    /// The client's SPIFFE id from its certificate (first SPIFFE URI SAN).
    pub peer_identity: Option<SpiffeId>,
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// Request headers (`baggage`, `forwarded`, `traceparent`, `x-forwarded-network`...).
    pub headers: HeaderMap,
    responder: Responder,
}

impl IncomingConnect {
    /// Answers 200 and returns the tunnel. Call only once the upstream is connected.
    pub fn accept(self) -> Result<H2Stream, HboneError> {
        self.accept_with_headers(HeaderMap::new())
    }

    /// Answers 200 carrying `headers` (e.g. response `baggage`) and returns the tunnel.
    pub fn accept_with_headers(mut self, headers: HeaderMap) -> Result<H2Stream, HboneError> {
        let peer = self.peer_addr;
        let (Some(mut respond), Some(body)) =
            (self.responder.respond.take(), self.responder.body.take())
        else {
            // Both are taken only here, and `self` is consumed: unreachable in practice.
            return Err(HboneError::H2 {
                peer,
                source: h2::Error::from(Reason::INTERNAL_ERROR),
            });
        };
        let mut response = Response::new(());
        *response.headers_mut() = headers;
        let send = respond
            .send_response(response, false)
            .map_err(|source| HboneError::H2 { peer, source })?;
        Ok(H2Stream::new(send, body, None))
    }

    /// Answers with the refusal's status and ends the stream.
    pub fn refuse(mut self, refusal: Refusal) {
        tracing::debug!(
            peer = %self.peer_addr,
            authority = %self.authority,
            status = %refusal.status(),
            reason = refusal.reason(),
            "refusing HBONE CONNECT"
        );
        if let Some(mut respond) = self.responder.respond.take() {
            answer(&mut respond, refusal.status());
        }
    }
}

/// The stream's answering end; answers 503 if dropped unused.
#[derive(Debug)]
struct Responder {
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(mut respond) = self.respond.take() {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

/// Sends a body-less final response that ends the stream.
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // The peer may have reset the stream already; then there is no one to tell.
    let _ = respond.send_response(response, true);
}

/// Completes the TLS handshake on a freshly accepted connection, then serves it.
pub async fn accept_and_serve<IO>(
    io: IO,
    acceptor: &tokio_rustls::TlsAcceptor,
    info: ConnectionInfo,
    settings: &H2Settings,
    drain: watch::Receiver<bool>,
    on_connect: impl Fn(IncomingConnect) + Send + Sync + 'static,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls = tls_accept(io, acceptor, info.peer_addr).await?;
    serve_connection(tls, info, settings, drain, on_connect).await
}

/// The TLS handshake of a freshly accepted connection from `peer`, bounded by
/// [`TLS_HANDSHAKE_TIMEOUT`] (a silent or trickling client is dropped at the deadline).
pub async fn tls_accept<IO>(
    io: IO,
    acceptor: &tokio_rustls::TlsAcceptor,
    peer: SocketAddr,
) -> Result<tokio_rustls::server::TlsStream<IO>, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io))
        .await
        .map_err(|_| HboneError::Timeout {
            peer,
            what: "the TLS handshake",
            after: TLS_HANDSHAKE_TIMEOUT,
        })?
        .map_err(|source| HboneError::Tls { peer, source })
}

/// Serves one HBONE connection until the client closes it, the keepalive fails, or a drain
/// (`*drain == true`) has let every open stream finish. Each well-formed CONNECT goes to
/// `on_connect`, which must not block: spawn a task for the stream.
pub async fn serve_connection<IO>(
    mut tls: tokio_rustls::server::TlsStream<IO>,
    info: ConnectionInfo,
    settings: &H2Settings,
    mut drain: watch::Receiver<bool>,
    on_connect: impl Fn(IncomingConnect) + Send + Sync + 'static,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer_addr;
    let (_, session) = tls.get_ref();
    // rustls lets a client that offers no ALPN through; such a client does not speak HBONE.
    if session.alpn_protocol() != Some(ALPN_H2) {
        let alpn = session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_else(|| "none".to_string());
        let _ = tls.shutdown().await;
        return Err(HboneError::Alpn { peer, alpn });
    }
    let peer_identity = crate::tls::peer_identity(session);

    let mut conn = tokio::time::timeout(
        settings.keepalive_timeout,
        server_builder(settings).handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| HboneError::Timeout {
        peer,
        what: "the HTTP/2 preface",
        after: settings.keepalive_timeout,
    })?
    .map_err(|source| HboneError::H2 { peer, source })?;

    let keepalive = keepalive(
        conn.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_interval,
        settings.keepalive_timeout,
        None,
    );
    tokio::pin!(keepalive);

    let mut draining = *drain.borrow_and_update();
    if draining {
        conn.graceful_shutdown();
    }
    let mut drain_open = true;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                None => return Ok(()),
                Some(Ok((request, respond))) => {
                    dispatch(request, respond, &info, &peer_identity, &on_connect);
                }
                Some(Err(e)) if peer_went_away(&e) => return Ok(()),
                Some(Err(source)) => return Err(HboneError::H2 { peer, source }),
            },
            changed = drain.changed(), if drain_open && !draining => match changed {
                Ok(()) => {
                    if *drain.borrow_and_update() {
                        tracing::debug!(%peer, "draining HBONE connection");
                        draining = true;
                        conn.graceful_shutdown();
                    }
                }
                Err(_) => drain_open = false,
            },
            () = &mut keepalive => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                let flush = poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                return Err(HboneError::Timeout {
                    peer,
                    what: "a keepalive PING",
                    after: settings.keepalive_timeout,
                });
            }
        }
    }
}

fn server_builder(settings: &H2Settings) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_header_list_size(settings.max_header_list_size)
        .max_send_buffer_size(settings.max_send_buffer)
        .max_concurrent_streams(settings.max_concurrent_streams);
    builder
}

/// Answers a malformed request with 400 here; hands a well-formed CONNECT to the caller.
fn dispatch(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    info: &ConnectionInfo,
    peer_identity: &Option<SpiffeId>,
    on_connect: &impl Fn(IncomingConnect),
) {
    if request.method() != Method::CONNECT {
        tracing::debug!(peer = %info.peer_addr, method = %request.method(), "HBONE request is not CONNECT");
        answer(&mut respond, StatusCode::BAD_REQUEST);
        return;
    }
    let authority = match request
        .uri()
        .authority()
        .map(|a| Authority::parse(a.as_str()))
    {
        Some(Ok(authority)) => authority,
        Some(Err(e)) => {
            tracing::debug!(peer = %info.peer_addr, "{e}");
            answer(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
        None => {
            tracing::debug!(peer = %info.peer_addr, "CONNECT without :authority");
            answer(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let (parts, body) = request.into_parts();
    on_connect(IncomingConnect {
        authority,
        peer_identity: peer_identity.clone(),
        peer_addr: info.peer_addr,
        local_addr: info.local_addr,
        headers: parts.headers,
        responder: Responder {
            respond: Some(respond),
            body: Some(body),
        },
    });
}

/// A client closing its TCP connection, or saying goodbye, is how connections normally end.
fn peer_went_away(e: &h2::Error) -> bool {
    if e.is_go_away() && e.reason() == Some(Reason::NO_ERROR) {
        return true;
    }
    e.get_io().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        )
    })
}
