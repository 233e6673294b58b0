//! The HBONE server (port 15008): one mutual-TLS connection in, many CONNECT streams out to the
//! caller. Checks ALPN, runs HTTP/2 with the §1.2 server settings, answers malformed requests
//! with 400 itself and hands every well-formed CONNECT to the caller as an [`IncomingConnect`],
//! which the caller accepts (200) or refuses. Knows nothing about policy or upstreams.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::budget::{LimitHit, ServerBudget, StreamPermit};
use super::frames::FrameWatch;
use super::keepalive::keepalive;
use super::recv_window::ConnectionWindow;
use super::send_budget::ConnectionLedger;
use super::{ALPN_H2, Authority, H2Stream, HboneError};
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
    /// 429: the peer is over a budget (it cancels too many CONNECTs before their answer).
    Throttled(String),
}

impl Refusal {
    /// The HTTP status the peer receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Refusal::BadRequest(reason)
            | Refusal::Denied(reason)
            | Refusal::Unavailable(reason)
            | Refusal::Throttled(reason) => reason,
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
        let permit = self.responder.permit.take();
        let ledger = Arc::clone(&self.responder.ledger);
        Ok(H2Stream::with_permit(send, body, ledger, None, permit))
    }

    /// Whether the client has reset the stream already (it then wants no answer).
    pub fn is_cancelled(&mut self) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        self.responder.poll_cancelled(&mut cx).is_ready()
    }

    /// Runs `work` (the authorization, the dial) unless the client resets the stream first:
    /// then `work` is dropped where it stands (a dial in flight is abandoned) and the answer is
    /// `None`. Such a reset counts against the peer's early-reset budget.
    pub async fn unless_cancelled<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            self.responder.poll_cancelled(cx).map(|()| None)
        })
        .await
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
    permit: Option<StreamPermit>,
    peer_identity: Option<SpiffeId>,
    /// The client's early reset has been counted already.
    reset_counted: bool,
    ledger: Arc<ConnectionLedger>,
}

impl Responder {
    /// Ready once the client has reset the unanswered stream; counts that reset once.
    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(respond) = self.respond.as_mut() else {
            return Poll::Pending;
        };
        match respond.poll_reset(cx) {
            // An error is the whole connection ending: not this peer cancelling.
            Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                if !self.reset_counted {
                    self.reset_counted = true;
                    if let Some(permit) = &self.permit {
                        permit.budget().early_reset(&self.peer_identity);
                    }
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        if self.poll_cancelled(&mut cx).is_ready() {
            return;
        }
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
    budget: &Arc<ServerBudget>,
    drain: watch::Receiver<bool>,
    on_connect: impl Fn(IncomingConnect) + Send + Sync + 'static,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls = tls_accept(io, acceptor, info.peer_addr).await?;
    serve_connection(tls, info, budget, drain, on_connect).await
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

/// Serves one HBONE connection until the client closes it, the keepalive fails, a limit of
/// [`super::Limits`] closes it, or a drain (`*drain == true`) has let every open stream finish.
/// Each well-formed CONNECT within the budgets goes to `on_connect`, which must not block:
/// spawn a task for the stream.
pub async fn serve_connection<IO>(
    mut tls: tokio_rustls::server::TlsStream<IO>,
    info: ConnectionInfo,
    budget: &Arc<ServerBudget>,
    mut drain: watch::Receiver<bool>,
    on_connect: impl Fn(IncomingConnect) + Send + Sync + 'static,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer_addr;
    let limits = &budget.limits;
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
    // The client's certificate proves its identity only until it expires: from then on the
    // connection takes no new stream (the client dials again with its renewed certificate),
    // while the streams already open run to their end.
    let certificate_left = super::dialled::peer_not_after(session).map(|not_after| {
        not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    });
    let certificate_expiry = tokio::time::sleep(certificate_left.unwrap_or(Duration::MAX));
    tokio::pin!(certificate_expiry);
    let mut certificate_expired = certificate_left.is_none();
    let ledger = ConnectionLedger::new(Arc::clone(budget.send()));
    let (watched, frames_exhausted) = FrameWatch::server(
        tls,
        limits.control_frames_per_second,
        limits.control_frame_burst,
        Arc::clone(&ledger),
    );

    let handshake = tokio::time::timeout(
        limits.preface_timeout,
        limits.builder().handshake::<_, Bytes>(watched),
    )
    .await;
    let mut conn = match handshake {
        Ok(conn) => conn.map_err(|source| HboneError::H2 { peer, source })?,
        Err(_) => {
            budget.hit(LimitHit::PrefaceTimeout);
            return Err(HboneError::Timeout {
                peer,
                what: "the HTTP/2 preface",
                after: limits.preface_timeout,
            });
        }
    };

    let keepalive = keepalive(
        conn.ping_pong(),
        limits.h2.keepalive_interval,
        limits.h2.keepalive_interval,
        limits.h2.keepalive_timeout,
        None,
    );
    tokio::pin!(keepalive);
    let exhausted = frames_exhausted.wait();
    tokio::pin!(exhausted);
    let open_streams = Arc::new(AtomicUsize::new(0));
    let mut idle = Idle::new(limits.idle_timeout);
    let mut window = ConnectionWindow::new(
        limits.h2.connection_window,
        limits.h2.stream_window,
        Arc::clone(&ledger),
    );

    let mut draining = *drain.borrow_and_update();
    if draining {
        conn.graceful_shutdown();
    }
    let mut drain_open = true;
    let mut calmed = false;
    loop {
        tokio::select! {
            next = poll_fn(|cx| {
                if let Some(target) = window.adjust() {
                    conn.set_target_window_size(target);
                }
                conn.poll_accept(cx)
            }) => match next {
                None => return Ok(()),
                Some(Ok((request, respond))) => {
                    idle.busy();
                    let stream = NewStream { info: &info, peer_identity: &peer_identity, ledger: &ledger };
                    let verdict = stream.dispatch(request, respond, budget, &open_streams, &on_connect);
                    if verdict == Dispatched::OverBudget && !calmed {
                        calmed = true;
                        tracing::warn!(%peer, identity = ?peer_identity, "peer cancels too many CONNECTs before their answer; closing its connection");
                        conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    }
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
            () = &mut certificate_expiry, if !certificate_expired => {
                certificate_expired = true;
                tracing::debug!(%peer, identity = ?peer_identity, "the client's certificate expired; its connection takes no new stream");
                conn.graceful_shutdown();
            }
            () = idle.tick(), if !idle.closed => {
                if idle.expired(open_streams.load(Ordering::Acquire)) {
                    budget.hit(LimitHit::IdleTimeout);
                    tracing::debug!(%peer, "closing HBONE connection idle for {:?}", limits.idle_timeout);
                    conn.graceful_shutdown();
                }
            }
            () = &mut exhausted, if !calmed => {
                budget.hit(LimitHit::ControlFrames);
                tracing::warn!(%peer, identity = ?peer_identity, "peer sends PING/SETTINGS/PRIORITY frames over budget; closing its connection");
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                let flush = poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                return Err(HboneError::H2 {
                    peer,
                    source: h2::Error::from(Reason::ENHANCE_YOUR_CALM),
                });
            }
            () = &mut keepalive => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                let flush = poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                return Err(HboneError::Timeout {
                    peer,
                    what: "a keepalive PING",
                    after: limits.h2.keepalive_timeout,
                });
            }
        }
    }
}

/// When a connection without streams is due to close: checked a few times per timeout.
struct Idle {
    timeout: Duration,
    since: Option<Instant>,
    ticker: tokio::time::Interval,
    /// GOAWAY has gone out for it; nothing more to check.
    closed: bool,
}

impl Idle {
    fn new(timeout: Duration) -> Idle {
        let period = (timeout / 4).max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Idle {
            timeout,
            since: Some(Instant::now()),
            ticker,
            closed: false,
        }
    }

    async fn tick(&mut self) {
        self.ticker.tick().await;
    }

    fn busy(&mut self) {
        self.since = None;
    }

    /// Whether the connection, with `open` streams now, has been idle for the timeout.
    fn expired(&mut self, open: usize) -> bool {
        if open > 0 {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        self.closed = since.elapsed() >= self.timeout;
        self.closed
    }
}

/// What became of a new stream.
#[derive(Debug, PartialEq, Eq)]
enum Dispatched {
    ToCaller,
    Refused,
    /// The peer has spent its early-reset budget: the connection is to be closed.
    OverBudget,
}

/// A new stream's connection facts.
struct NewStream<'a> {
    info: &'a ConnectionInfo,
    peer_identity: &'a Option<SpiffeId>,
    ledger: &'a Arc<ConnectionLedger>,
}

impl NewStream<'_> {
    /// Refuses what is over a budget (before anything is checked or dialled), answers a
    /// malformed request with 400 here, and hands a well-formed CONNECT to the caller.
    fn dispatch(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        budget: &Arc<ServerBudget>,
        open_streams: &Arc<AtomicUsize>,
        on_connect: &impl Fn(IncomingConnect),
    ) -> Dispatched {
        let peer = self.info.peer_addr;
        if !budget.peer_in_budget(self.peer_identity) {
            budget.hit(LimitHit::EarlyResetBudget);
            answer(&mut respond, StatusCode::TOO_MANY_REQUESTS);
            return Dispatched::OverBudget;
        }
        let Some(permit) = budget.open_stream(open_streams) else {
            tracing::warn!(%peer, "the node has {} HBONE streams open; refusing one more", budget.limits.max_streams_total);
            respond.send_reset(Reason::REFUSED_STREAM);
            return Dispatched::Refused;
        };
        if request.method() != Method::CONNECT {
            tracing::debug!(%peer, method = %request.method(), "HBONE request is not CONNECT");
            answer(&mut respond, StatusCode::BAD_REQUEST);
            return Dispatched::Refused;
        }
        // RFC 9113 §8.5: a CONNECT carries no :scheme and no :path (and is not extended).
        if request.uri().scheme().is_some()
            || request.uri().path_and_query().is_some()
            || request.extensions().get::<h2::ext::Protocol>().is_some()
        {
            tracing::debug!(%peer, uri = %request.uri(), "CONNECT with :scheme or :path");
            answer(&mut respond, StatusCode::BAD_REQUEST);
            return Dispatched::Refused;
        }
        let authority = match request
            .uri()
            .authority()
            .map(|a| Authority::parse(a.as_str()))
        {
            Some(Ok(authority)) => authority,
            Some(Err(e)) => {
                tracing::debug!(%peer, "{e}");
                answer(&mut respond, StatusCode::BAD_REQUEST);
                return Dispatched::Refused;
            }
            None => {
                tracing::debug!(%peer, "CONNECT without :authority");
                answer(&mut respond, StatusCode::BAD_REQUEST);
                return Dispatched::Refused;
            }
        };
        let (parts, body) = request.into_parts();
        on_connect(IncomingConnect {
            authority,
            peer_identity: self.peer_identity.clone(),
            peer_addr: peer,
            local_addr: self.info.local_addr,
            headers: parts.headers,
            responder: Responder {
                respond: Some(respond),
                body: Some(body),
                permit: Some(permit),
                peer_identity: self.peer_identity.clone(),
                reset_counted: false,
                ledger: Arc::clone(self.ledger),
            },
        });
        Dispatched::ToCaller
    }
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
