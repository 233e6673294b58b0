//! The HTTP/1 servers for readiness, metrics and admin: one accept loop shared by all three,
//! and a plain function per server that maps a request to a response. Listeners are bound by
//! the caller (the admin one through [`bind_admin`], which never binds a wildcard address).
//! What the daemon does on `/quitquitquit` or which JSON it dumps is not decided here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use super::metrics::{Metrics, content_type};
use super::readiness::Readiness;
use crate::logging::{LogControl, LogError};
use crate::net::SocketFactory;

/// How long requests in flight may finish once the drain signal fires.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A request's headers must arrive within this (slowloris on 15020/15021).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one server holds open; past it the oldest is closed, so a flood of idle or
/// trickling connections can neither exhaust descriptors nor keep a probe out.
const MAX_CONNECTIONS: usize = 64;

/// What went wrong setting up the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Produces the `/config_dump` document; supplied by the daemon.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin server reads and acts on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub config_dump: ConfigDump,
    pub log: LogControl,
    /// Set to `true` by `POST /quitquitquit`; the daemon waits on a receiver of it.
    pub shutdown: Arc<watch::Sender<bool>>,
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// Resolves once draining starts, or once nobody can ever start it (sender gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

/// Serves `route` on every connection accepted from `listener` until the drain signal; then
/// gives requests in flight [`DRAIN_GRACE`] to finish.
async fn serve<F>(
    listener: TcpListener,
    mut drain: watch::Receiver<bool>,
    server: &'static str,
    route: F,
) where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let mut connections = JoinSet::new();
    // Oldest first; entries of finished connections are pruned when the cap is reached.
    let mut by_age: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            _ = drained(&mut drain) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let task = connections.spawn(serve_connection(stream, drain.clone(), route.clone()));
                    by_age.push_back(task);
                    if by_age.len() > MAX_CONNECTIONS {
                        by_age.retain(|task| !task.is_finished());
                    }
                    if by_age.len() > MAX_CONNECTIONS && let Some(oldest) = by_age.pop_front() {
                        tracing::debug!(server, "connection cap reached: closing the oldest");
                        oldest.abort();
                    }
                }
                Err(e) => {
                    tracing::warn!(server, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let finished = tokio::time::timeout(DRAIN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::debug!(
            server,
            open = connections.len(),
            "aborting connections after drain grace"
        );
    }
}

async fn serve_connection<F>(stream: TcpStream, mut drain: watch::Receiver<bool>, route: F)
where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let service = service_fn(move |request| {
        let response = route(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // The timer lets hyper enforce its header read timeout against idle, half-sent requests.
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = drained(&mut drain) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

/// Serves `GET /healthz/ready` until `stop` turns true: 200 `ready`, 503 `draining` once the
/// daemon drains, or 500 naming the pending tasks.
pub async fn serve_readiness(
    listener: TcpListener,
    readiness: Readiness,
    drain: watch::Receiver<bool>,
) {
    serve(listener, drain, "readiness", move |request| {
        readiness_route(request, &readiness)
    })
    .await
}

fn readiness_route<B>(request: &Request<B>, readiness: &Readiness) -> Response<Body> {
    if request.uri().path() != "/healthz/ready" {
        return not_found();
    }
    if request.method() != Method::GET {
        return method_not_allowed("GET");
    }
    if readiness.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let pending = readiness.pending();
    if pending.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("not ready, pending: {}\n", pending.join(", ")),
        )
    }
}

/// Serves `/metrics` and `/stats/prometheus` until drained.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    drain: watch::Receiver<bool>,
) {
    serve(listener, drain, "metrics", move |request| {
        match request.uri().path() {
            "/metrics" | "/stats/prometheus" => metrics_response(request, &metrics),
            _ => not_found(),
        }
    })
    .await
}

fn wants_openmetrics<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"))
}

fn metrics_response<B>(request: &Request<B>, metrics: &Metrics) -> Response<Body> {
    if request.method() != Method::GET {
        return method_not_allowed("GET");
    }
    let openmetrics = wants_openmetrics(request);
    respond(
        StatusCode::OK,
        content_type(openmetrics),
        metrics.encode(openmetrics),
    )
}

/// Binds the admin port on `127.0.0.1` and, when the host has IPv6, `::1`; never a wildcard
/// address, since the admin server can shut the daemon down. With port 0 both share the port
/// the kernel picked for IPv4 when it is free on `::1`. `SO_REUSEPORT`, as every listener of
/// ztund: a successor binds the same port while this daemon still runs (an upgrade).
pub async fn bind_admin(port: u16) -> Result<Vec<TcpListener>, AdminError> {
    let bind = |addr: SocketAddr| SocketFactory::default().listener(addr, false);
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v4_listener = bind(v4).map_err(|source| AdminError::Bind { addr: v4, source })?;
    let chosen = match v4_listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(_) => port,
    };
    let mut listeners = vec![v4_listener];
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, chosen));
    match bind(v6) {
        Ok(listener) => listeners.push(listener),
        Err(e) => tracing::debug!(addr = %v6, error = %e, "admin server not on IPv6 loopback"),
    }
    Ok(listeners)
}

/// Serves the admin endpoints on one listener (from [`bind_admin`]) until drained.
pub async fn serve_admin(listener: TcpListener, state: AdminState, drain: watch::Receiver<bool>) {
    serve(listener, drain, "admin", move |request| {
        admin_route(request, &state)
    })
    .await
}

const INDEX: &str = "<!doctype html>
<html><head><title>ztund admin</title></head><body>
<h1>ztund admin</h1>
<ul>
<li><a href=\"/config_dump\">/config_dump</a>: the daemon's state as JSON</li>
<li><a href=\"/stats\">/stats</a> (also /metrics): Prometheus metrics</li>
<li>POST /logging: show log levels; ?level=debug or ?level=ztund::proxy=trace,access=off changes them; ?reset restores them</li>
<li>POST /quitquitquit: graceful shutdown</li>
</ul>
</body></html>
";

fn admin_route<B>(request: &Request<B>, state: &AdminState) -> Response<Body> {
    let method = request.method();
    match request.uri().path() {
        "/" if method == Method::GET => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/config_dump" if method == Method::GET => config_dump(state),
        "/stats" | "/metrics" | "/stats/prometheus" => metrics_response(request, &state.metrics),
        "/logging" if method == Method::POST => logging(request.uri().query(), &state.log),
        "/quitquitquit" if method == Method::POST => {
            tracing::info!("shutdown requested through the admin server");
            state.shutdown.send_replace(true);
            text(StatusCode::OK, "shutting down\n")
        }
        "/" | "/config_dump" => method_not_allowed("GET"),
        "/logging" | "/quitquitquit" => method_not_allowed("POST"),
        _ => not_found(),
    }
}

fn config_dump(state: &AdminState) -> Response<Body> {
    let document = (state.config_dump)();
    match serde_json::to_vec_pretty(&document) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the config dump: {e}\n"),
        ),
    }
}

/// `POST /logging`: no query shows the levels; `level=` merges directives; `reset` restores.
fn logging(query: Option<&str>, log: &LogControl) -> Response<Body> {
    let mut level = None;
    let mut reset = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "level" => match percent_decode(value) {
                Some(value) => level = Some(value),
                None => return text(StatusCode::BAD_REQUEST, "level: bad percent-encoding\n"),
            },
            "reset" => reset = true,
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter `{other}` (use level=... or reset)\n"),
                );
            }
        }
    }
    let outcome = match (reset, level) {
        (true, _) => log.reset(),
        (false, Some(level)) => log.set(&level),
        (false, None) => Ok(()),
    };
    match outcome {
        Ok(()) => text(
            StatusCode::OK,
            format!("current log level is {}\n", log.current()),
        ),
        Err(e @ LogError::Reload { .. }) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Decodes `%XX` escapes and `+` (a space in form encoding); `None` on a malformed escape or
/// non-UTF-8 result.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("ztund%3A%3Aproxy%3Ddebug%2Caccess=off").as_deref(),
            Some("ztund::proxy=debug,access=off")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
