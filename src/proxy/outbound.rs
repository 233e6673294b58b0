//! Outbound listeners: the transparent one (15001, fed by redirection) and SOCKS5 (15080).
//! accept → identify the source workload → find the destination → plan → connect (HBONE through
//! the pool, plain TCP, or TLS that ztund originates) → copy → record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::info;

use super::accept::accept_loop;
use super::context::{ProxyContext, Scope};
use super::copy::{Transferred, copy_bidirectional, copy_tcp_h2};
use super::error::ConnectionError;
use super::refusals::RefusalReason;
use super::route::{self, Plan};
use super::socks5;
use crate::hbone::WithCertExpiry;
use crate::hbone::pool::PoolKey;
use crate::hbone::read_ahead::ReadAhead;
use crate::hbone::{ConnectRequest, H2Stream, HboneError};
use crate::logging::Optional;
use crate::mesh::Workload;

/// Which way into the mesh a client came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Redirected by the kernel; the destination is the original one.
    Transparent,
    /// A SOCKS5 client naming its destination.
    Socks5,
}

/// Accepts outbound connections until the daemon drains.
pub async fn serve(ctx: Arc<ProxyContext>, scope: Scope, listener: TcpListener, entry: Entry) {
    let what = match entry {
        Entry::Transparent => "outbound",
        Entry::Socks5 => "socks5",
    };
    let handler_ctx = ctx.clone();
    accept_loop(ctx, listener, what, move |client, peer| {
        handle(handler_ctx.clone(), scope.clone(), client, peer, entry)
    })
    .await;
}

/// One outbound connection: set up, then carry. The connection's task keeps its future for
/// the connection's whole life, so the set-up (SOCKS5 exchange, routing, pool checkout or dial)
/// runs in its own allocation, freed once the copy starts; what stays is `carry`'s state.
fn handle(
    ctx: Arc<ProxyContext>,
    scope: Scope,
    client: TcpStream,
    peer: SocketAddr,
    entry: Entry,
) -> impl Future<Output = Result<(), ConnectionError>> + Send + 'static {
    let set_up = Box::pin(set_up(ctx.clone(), scope, client, peer, entry));
    async move {
        let connection = set_up.await?;
        carry(&ctx, connection).await;
        Ok(())
    }
}

async fn set_up(
    ctx: Arc<ProxyContext>,
    scope: Scope,
    client: TcpStream,
    peer: SocketAddr,
    entry: Entry,
) -> Result<Box<Connection>, ConnectionError> {
    match entry {
        Entry::Transparent => set_up_transparent(&ctx, &scope, client, peer).await,
        Entry::Socks5 => set_up_socks5(&ctx, &scope, client, peer).await,
    }
}

/// An outbound connection once set up: both ends, and what its record needs.
struct Connection {
    source: Option<Arc<Workload>>,
    peer: SocketAddr,
    destination: SocketAddr,
    plan: Plan,
    upstream: Result<Upstream, Failure>,
    client: TcpStream,
    started: Instant,
    /// How many of the client's bytes went out with the CONNECT, before the copy.
    first_sent: u64,
}

/// The client's first bytes, for a tunnel's CONNECT to carry
/// ([`ConnectRequest::with_first_data`]).
enum FirstData<'a> {
    /// Not for this client (SOCKS5: it waits for our reply).
    None,
    /// Read what the client has sent so far from this socket, if the plan is a tunnel.
    Take(&'a TcpStream),
    /// Read and handed to the CONNECT.
    Sent(u64),
}

/// Read without waiting: at most what fits the send budget's per-stream floor, so that the
/// bytes never wait for room (and a client that has sent nothing yet is not waited for).
const FIRST_DATA_MAX: usize = 16 << 10;

impl FirstData<'_> {
    fn take(&mut self) -> bytes::Bytes {
        let FirstData::Take(client) = *self else {
            return bytes::Bytes::new();
        };
        let data = read_ready(client);
        *self = FirstData::Sent(data.len() as u64);
        data
    }

    fn sent(&self) -> u64 {
        match self {
            FirstData::Sent(n) => *n,
            _ => 0,
        }
    }
}

/// What `client` has already received, without waiting: one `recv(MSG_DONTWAIT)` straight on
/// the socket (tokio's readiness for a socket just accepted is not known yet, so its
/// `try_read` would not even look). Nothing on EOF or any error: the copy meets those again.
/// Read onto the stack and copied out at its size: a client that has not spoken yet (or a
/// server-first protocol) costs no allocation, one that has costs only what it sent.
fn read_ready(client: &TcpStream) -> bytes::Bytes {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_DATA_MAX];
    match socket2::SockRef::from(client).recv_with_flags(&mut buf, libc::MSG_DONTWAIT) {
        Ok(n) if n > 0 => {
            // SAFETY: the kernel initialised the first `n` bytes.
            let read = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            bytes::Bytes::copy_from_slice(read)
        }
        _ => bytes::Bytes::new(),
    }
}

async fn set_up_transparent(
    ctx: &ProxyContext,
    scope: &Scope,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<Box<Connection>, ConnectionError> {
    let destination =
        crate::net::original_destination(&client).map_err(ConnectionError::Address)?;
    let snapshot = ctx.mesh.load();
    let source = scope.source_workload(&snapshot, &ctx.config.node, peer.ip());
    let started = Instant::now();
    let client_namespace = source.as_ref().map(|w| w.namespace.as_str());
    let plan = route::plan(
        &snapshot,
        client_namespace,
        destination,
        ctx.config.ports.hbone,
    );
    let mut first_data = FirstData::Take(&client);
    let upstream = connect(ctx, scope, source.as_deref(), peer, &plan, &mut first_data).await;
    count_refusal(ctx, ctx.config.ports.outbound, peer, &upstream);
    let first_sent = first_data.sent();
    Ok(Box::new(Connection {
        source,
        peer,
        destination,
        plan,
        upstream,
        client,
        started,
        first_sent,
    }))
}

async fn set_up_socks5(
    ctx: &ProxyContext,
    scope: &Scope,
    mut client: TcpStream,
    peer: SocketAddr,
) -> Result<Box<Connection>, ConnectionError> {
    let handshake = socks5::accept(&mut client).await?;
    let started = Instant::now();
    let snapshot = ctx.mesh.load();
    let Some(source) = scope.source_workload(&snapshot, &ctx.config.node, peer.ip()) else {
        let _ = handshake
            .reply(&mut client, socks5::Reply::NotAllowed)
            .await;
        return Err(ConnectionError::NotAWorkload { peer });
    };
    let destination = match &handshake.target {
        socks5::Target::Addr(addr) => *addr,
        socks5::Target::Domain(name, port) => {
            match route::resolve_hostname(&snapshot, name, *port, &source.namespace) {
                Some(addr) => addr,
                None => {
                    let _ = handshake
                        .reply(&mut client, socks5::Reply::HostUnreachable)
                        .await;
                    return Err(ConnectionError::NotAService { name: name.clone() });
                }
            }
        }
    };
    let plan = route::plan(
        &snapshot,
        Some(&source.namespace),
        destination,
        ctx.config.ports.hbone,
    );
    // The client sends nothing before our SOCKS5 reply, which waits for the upstream.
    let upstream = connect(ctx, scope, Some(&source), peer, &plan, &mut FirstData::None).await;
    count_refusal(ctx, ctx.config.ports.socks5, peer, &upstream);
    let code = match &upstream {
        Ok(_) => socks5::Reply::Succeeded,
        Err(Failure::Refused(_)) => socks5::Reply::NotAllowed,
        Err(Failure::Unreachable(_)) => socks5::Reply::ConnectionRefused,
    };
    handshake
        .reply(&mut client, code)
        .await
        .map_err(ConnectionError::Socks5Reply)?;
    Ok(Box::new(Connection {
        source: Some(source),
        peer,
        destination,
        plan,
        upstream,
        client,
        started,
        first_sent: 0,
    }))
}

/// Where an outbound connection's bytes go once it is set up.
enum Upstream {
    Tunnel(H2Stream),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why an outbound connection could not be set up.
#[derive(Debug)]
enum Failure {
    /// The plan forbids it.
    Refused(String),
    /// The next hop could not be reached or said no.
    Unreachable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(r) | Failure::Unreachable(r) => f.write_str(r),
        }
    }
}

/// A connection the plan refuses is counted and logged (rate-limited) as a refusal; one that
/// could not reach its next hop is an ordinary failed connection.
fn count_refusal(
    ctx: &ProxyContext,
    port: u16,
    peer: SocketAddr,
    upstream: &Result<Upstream, Failure>,
) {
    if let Err(Failure::Refused(reason)) = upstream {
        ctx.admission
            .refusals
            .record(port, RefusalReason::NoRoute, peer, reason);
    }
}

async fn connect(
    ctx: &ProxyContext,
    scope: &Scope,
    source: Option<&Workload>,
    client: SocketAddr,
    plan: &Plan,
    first_data: &mut FirstData<'_>,
) -> Result<Upstream, Failure> {
    match plan {
        Plan::Refuse(reason) => Err(Failure::Refused(reason.clone())),
        Plan::Passthrough { target } | Plan::Direct { target, .. } => scope
            .sockets
            .connect(*target, None)
            .await
            .map(Upstream::Tcp)
            .map_err(|e| Failure::Unreachable(format!("connecting to {target}: {e}"))),
        Plan::Originate {
            target,
            tls,
            server_name,
            ..
        } => {
            let tcp = scope
                .sockets
                .connect(*target, None)
                .await
                .map_err(|e| Failure::Unreachable(format!("connecting to {target}: {e}")))?;
            ctx.originator
                .connect(tcp, *target, tls, server_name)
                .await
                .map(|tls| Upstream::Tls(Box::new(tls)))
                .map_err(|e| Failure::Unreachable(e.to_string()))
        }
        Plan::Hbone {
            next_hop,
            authority,
            expected,
            service,
            ..
        } => {
            let Some(source) = source else {
                return Err(Failure::Refused(format!(
                    "{client} is not a mesh workload of this node; it cannot use HBONE"
                )));
            };
            // Read as late as possible: the more of the client's first message is here, the
            // fewer round trips the tunnel costs.
            let request = ConnectRequest::new(authority.to_string())
                .forwarded(client, service.as_ref().map(|s| s.hostname.as_str()))
                .with_first_data(first_data.take());
            // In-pod, each pod dials from its own namespace and address: never share its tunnels.
            let source_ip = match scope.owner {
                super::context::Owner::Pod(_) => source.addresses.first().copied(),
                super::context::Owner::Node => None,
            };
            let key = PoolKey {
                source: source.identity(),
                expected: expected.clone(),
                destination: *next_hop,
                source_ip,
                pod: match &scope.owner {
                    super::context::Owner::Pod(pod) => Some(pod.uid.clone()),
                    super::context::Owner::Node => None,
                },
                shard: crate::shard::current(),
            };
            open_tunnel(ctx, scope, key, request)
                .await
                .map(Upstream::Tunnel)
                .map_err(|e| Failure::Unreachable(format!("HBONE to {next_hop}: {e}")))
        }
    }
}

/// A CONNECT stream from the pool, dialling (in the scope's namespace) when needed.
async fn open_tunnel(
    ctx: &ProxyContext,
    scope: &Scope,
    key: PoolKey,
    request: ConnectRequest,
) -> Result<H2Stream, HboneError> {
    let (source, expected, next_hop) = (key.source.clone(), key.expected.clone(), key.destination);
    let sockets = scope.sockets.clone();
    let credentials = ctx.credentials.clone();
    let dial = move || -> crate::identity::BoxFuture<'static, Result<_, HboneError>> {
        Box::pin(async move {
            let tcp = sockets
                .connect(next_hop, None)
                .await
                .map_err(|source| HboneError::Dial {
                    peer: next_hop,
                    source,
                })?;
            let tls_error = |e: crate::tls::TlsError| HboneError::Tls {
                peer: next_hop,
                source: std::io::Error::other(e),
            };
            // Read before the config is built: a renewal in between only makes the config's
            // certificate outlive this instant, never the other way round.
            let local_not_after = credentials
                .certs()
                .fetch(&source)
                .await
                .map_err(|e| tls_error(e.into()))?
                .not_after;
            let config = credentials
                .client_config(&source, &expected)
                .await
                .map_err(tls_error)?;
            let tls = TlsConnector::from(config)
                .connect(crate::tls::dummy_server_name(), ReadAhead::new(tcp))
                .await
                .map_err(|source| HboneError::Tls {
                    peer: next_hop,
                    source,
                })?;
            Ok(WithCertExpiry {
                tls,
                local_not_after,
            })
        })
    };
    ctx.pool.open(&key, dial, request).await
}

/// Copies until both sides are done, then writes the access log and metrics. Across the copy
/// this future keeps only the copy and the [`Record`]: [`start`] takes the connection apart
/// outside it, because in an `async fn` a local that is ever borrowed or partly moved (the
/// plan, the upstream) keeps its slot until its scope ends, beside the copy that took its
/// contents (heaptrack: a 912-byte future, 1 152 bytes of task per idle outbound tunnel).
async fn carry(ctx: &ProxyContext, connection: Box<Connection>) {
    let (record, copy) = start(ctx, connection);
    let result = copy.await;
    record.finish(ctx, result);
}

/// Why an outbound connection ended in error: its set-up failed, or its copy did.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    SetUp(Failure),
    #[error("{0}")]
    Copy(std::io::Error),
}

/// What an outbound connection's access-log line and metrics need once its copy has ended.
struct Record {
    source: Option<Arc<Workload>>,
    peer: SocketAddr,
    destination: SocketAddr,
    route: Route,
    series: Arc<crate::admin::TrafficSeries>,
    /// Who the server proved to be, read before the copy consumes the stream.
    verified: Option<Arc<crate::identity::SpiffeId>>,
    started: Instant,
    first_sent: u64,
}

/// Takes a set-up connection apart into its record and its copy, and counts it open.
fn start(
    ctx: &ProxyContext,
    connection: Box<Connection>,
) -> (Record, impl Future<Output = Result<Transferred, Ended>>) {
    use futures::future::{Either, FutureExt, ready};
    let Connection {
        source,
        peer,
        destination,
        plan,
        upstream,
        client,
        started,
        first_sent,
    } = super::unbox(connection);
    let route = describe(&plan);
    let series = super::labels::outbound_series(&ctx.metrics, source.as_ref(), &plan);
    ctx.metrics.open(&series);
    let verified = match &upstream {
        Ok(Upstream::Tunnel(stream)) => stream.peer_identity().cloned(),
        _ => None,
    };
    let text = |result: std::io::Result<Transferred>| result.map_err(Ended::Copy);
    let copy = match upstream {
        Ok(Upstream::Tunnel(stream)) => {
            Either::Left(Either::Left(copy_tcp_h2(client, stream).map(text)))
        }
        Ok(Upstream::Tcp(tcp)) => {
            Either::Left(Either::Right(copy_bidirectional(client, tcp).map(text)))
        }
        // Boxed: TLS state is larger than the other copies together, and rarely needed.
        Ok(Upstream::Tls(tls)) => Either::Right(Either::Left(
            Box::pin(copy_bidirectional(client, *tls)).map(text),
        )),
        Err(failure) => Either::Right(Either::Right(ready(Err(Ended::SetUp(failure))))),
    };
    let record = Record {
        source,
        peer,
        destination,
        route,
        series,
        verified,
        started,
        first_sent,
    };
    (record, copy)
}

impl Record {
    /// Counts the connection closed and writes its access-log line.
    fn finish(self, ctx: &ProxyContext, result: Result<Transferred, Ended>) {
        let Record {
            source,
            peer,
            destination,
            route:
                Route {
                    path,
                    hbone_addr,
                    upstream_addr,
                },
            series,
            verified,
            started,
            first_sent,
        } = self;
        let (received, sent) = match &result {
            Ok(t) => (first_sent + t.to_upstream, t.to_downstream),
            Err(_) => (0, 0),
        };
        ctx.metrics.close(&series, received, sent);
        info!(
            target: "access",
            direction = "outbound",
            path,
            src.addr = %peer,
            src.workload = source.as_ref().map(|w| w.name.as_str()).unwrap_or(""),
            src.namespace = source.as_ref().map(|w| w.namespace.as_str()).unwrap_or(""),
            src.identity = %Optional(source.as_ref().map(|w| w.identity_ref())),
            dst.addr = %destination,
            dst.hbone_addr = %Optional(hbone_addr),
            dst.identity = %Optional(verified.as_ref()),
            upstream.addr = %Optional(upstream_addr),
            bytes_sent = received,
            bytes_received = sent,
            duration_ms = started.elapsed().as_millis() as u64,
            error = %Optional(result.as_ref().err()),
            "connection complete"
        );
    }
}

/// What the access log says about a plan's way to the destination.
struct Route {
    path: &'static str,
    /// The CONNECT authority, on the HBONE path only.
    hbone_addr: Option<SocketAddr>,
    /// The socket ztund dials: the peer node's HBONE port, or the destination itself.
    upstream_addr: Option<SocketAddr>,
}

fn describe(plan: &Plan) -> Route {
    let (path, hbone_addr, upstream_addr) = match plan {
        Plan::Hbone {
            authority,
            next_hop,
            ..
        } => ("hbone", Some(*authority), Some(*next_hop)),
        Plan::Direct { target, .. } => ("direct", None, Some(*target)),
        Plan::Originate { target, .. } => ("tls-origination", None, Some(*target)),
        Plan::Passthrough { target } => ("passthrough", None, Some(*target)),
        Plan::Refuse(_) => ("refused", None, None),
    };
    Route {
        path,
        hbone_addr,
        upstream_addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<F>(_: fn(Arc<ProxyContext>, Scope, TcpStream, SocketAddr, Entry) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every outbound connection's task holds this future for the connection's whole life; the
    /// set-up state (SOCKS5, routing, pool checkout: 4.4 KiB inline) must not be part of it,
    /// nor the plan and the upstream beside the copy that took them (936 bytes until
    /// [`start`]). What remains: the copy (~330 bytes) and the access log's [`Record`] (~190).
    /// tokio adds ~112 bytes and rounds the task up to 128: 576 bytes make a 768-byte task.
    #[test]
    fn an_open_connection_keeps_only_the_copy_state_on_its_task() {
        let size = output_size(handle);
        assert!(
            size <= 600,
            "the outbound connection future is {size} bytes"
        );
    }
}
