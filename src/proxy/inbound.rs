//! The HBONE listener (15008): accept → prove our identity (TLS) → for each CONNECT: validate the
//! destination → authorize (and stay registered for re-checks) → connect to the app → answer 200
//! → copy until done or closed by policy → record.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::accept::accept_loop;
use super::context::{Owner, ProxyContext, Scope};
use super::copy::{Transferred, copy_tcp_h2};
use super::error::ConnectionError;
use super::refusals::RefusalReason;
use super::route::is_own_port;
use super::tracker::TrackedConnection;
use crate::admin::TrafficSeries;
use crate::hbone::read_ahead::ReadAhead;
use crate::hbone::request::forwarded_for;
use crate::hbone::server::{
    ConnectionInfo, IncomingConnect, Refusal, serve_connection, tls_accept,
};
use crate::hbone::{Authority, H2Stream, HboneError};
use crate::identity::SpiffeId;
use crate::logging::Optional;
use crate::mesh::{Snapshot, Workload};
use crate::policy::ConnectionFacts;

/// Accepts HBONE connections until the daemon drains.
pub async fn serve(ctx: Arc<ProxyContext>, scope: Scope, listener: TcpListener) {
    let handler_ctx = ctx.clone();
    accept_loop(ctx, listener, "hbone", move |stream, peer| {
        let ctx = handler_ctx.clone();
        let scope = scope.clone();
        // Pooled and long-lived: spread over the shards by count, not by SO_REUSEPORT's hash.
        let shards = ctx.shards.clone();
        shards.place(stream, move |stream| {
            handle_connection(ctx, scope, stream, peer)
        })
    })
    .await;
}

/// One TLS connection carrying any number of CONNECT streams. Until its handshake is done it
/// is pending ([`crate::proxy::admission`]): capped, and shed first when the caps are reached.
async fn handle_connection(
    ctx: Arc<ProxyContext>,
    scope: Scope,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(), ConnectionError> {
    let port = ctx.config.ports.hbone;
    let refusals = &ctx.admission.refusals;
    let mut pending = ctx.admission.admit_handshake(peer.ip());
    let local = crate::net::canonical(tcp.local_addr().map_err(ConnectionError::Address)?);
    let snapshot = ctx.mesh.load();
    let Some(workload) = scope.local_workload(&snapshot, &ctx.config.node, local.ip()) else {
        let reason = ConnectionError::NoLocalWorkload { addr: local };
        refusals.record(port, RefusalReason::NoLocalWorkload, peer, &reason);
        return Err(reason);
    };
    drop(snapshot);
    let server_config = ctx.credentials.server_config(&workload.identity()).await?;
    let acceptor = TlsAcceptor::from(server_config);
    let lingering = super::linger::Lingering::keep(&tcp);
    let tls = tokio::select! {
        tls = tls_accept(ReadAhead::new(tcp), &acceptor, peer) => tls,
        why = pending.shed() => {
            let reason = ConnectionError::Shed;
            refusals.record(port, why.reason(), peer, &reason);
            return Err(reason);
        }
    };
    drop(pending);
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            let reason = match e {
                HboneError::Timeout { .. } => RefusalReason::HandshakeTimeout,
                _ => RefusalReason::TlsHandshake,
            };
            refusals.record(port, reason, peer, &e);
            return Err(e.into());
        }
    };
    let info = ConnectionInfo {
        peer_addr: peer,
        local_addr: local,
    };
    let drain = ctx.drain.clone();
    let budget = ctx.hbone_budget.clone();
    let on_connect_ctx = ctx.clone();
    let served = serve_connection(tls, info, &budget, drain, move |incoming| {
        tokio::spawn(handle_connect(
            on_connect_ctx.clone(),
            scope.clone(),
            incoming,
        ));
    })
    .await;
    if let Some(lingering) = lingering {
        lingering.close().await;
    }
    match served {
        Err(e @ HboneError::Alpn { .. }) => {
            refusals.record(port, RefusalReason::Alpn, peer, &e);
            Err(e.into())
        }
        other => other.map_err(ConnectionError::from),
    }
}

/// One CONNECT stream, start to end. The stream's task keeps its future for the stream's whole
/// life, so the set-up (decide, authorize, connect to the app) runs in its own allocation,
/// freed once the copy starts; what stays is `carry`'s state.
fn handle_connect(
    ctx: Arc<ProxyContext>,
    scope: Scope,
    incoming: IncomingConnect,
) -> impl Future<Output = ()> + Send + 'static {
    let set_up = Box::pin(set_up(ctx.clone(), scope, incoming));
    async move {
        if let Some(connection) = set_up.await {
            carry(&ctx, connection).await;
        }
    }
}

/// A CONNECT stream once accepted: both ends, and what its record needs. The workload, the
/// client's address and the target are read back from `tracked`'s registration, which keeps
/// them anyway: every byte here stays on the stream's task for its whole life.
struct Connection {
    tracked: TrackedConnection,
    upstream: TcpStream,
    stream: H2Stream,
    series: Arc<TrafficSeries>,
    /// The HBONE connection's peer (see [`Ends::tunnel_peer`]).
    tunnel_peer: SocketAddr,
    started: Instant,
}

/// Where a CONNECT came from, as its access-log line names it.
#[derive(Debug, Clone, Copy)]
struct Ends {
    /// The client's own socket, as its node's `forwarded` header names it (else the tunnel's
    /// peer): the `src.addr` the client side's line carries too, so the two lines join.
    client: SocketAddr,
    /// The HBONE connection's peer: the client node's (or pod's) pooled tunnel socket.
    tunnel_peer: SocketAddr,
}

impl Ends {
    fn of(incoming: &IncomingConnect) -> Ends {
        Ends {
            client: forwarded_for(&incoming.headers).unwrap_or(incoming.peer_addr),
            tunnel_peer: incoming.peer_addr,
        }
    }
}

/// Decides, authorizes and connects to the app; `None` once the stream has been refused.
async fn set_up(
    ctx: Arc<ProxyContext>,
    scope: Scope,
    mut incoming: IncomingConnect,
) -> Option<Box<Connection>> {
    let started = Instant::now();
    let snapshot = ctx.mesh.load();
    let peer = incoming.peer_addr;

    // Decide: is the target ours, and may this peer reach it?
    let (workload, target) = match destination(&ctx, &scope, &snapshot, &incoming) {
        Ok(found) => found,
        Err((reason, refusal)) => {
            refuse(&ctx, incoming, None, reason, refusal);
            return None;
        }
    };
    let facts = ConnectionFacts {
        source_ip: peer.ip(),
        source_identity: incoming.peer_identity.clone(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    // A client that has reset the stream already gets neither an authorization nor a dial.
    if incoming.is_cancelled() {
        cancelled(&incoming, target, false);
        return None;
    }
    // Registered while it lives, so that a policy change can close it (see `tracker`).
    let ends = Ends::of(&incoming);
    let admitted = ctx.tracker.admit(
        &workload,
        facts,
        ends.client,
        &snapshot,
        &ctx.mesh,
        &ctx.metrics,
    );
    let tracked = match admitted {
        Ok(tracked) => tracked,
        Err(super::tracker::Denied(reason)) => {
            let refusal = Refusal::Denied(reason);
            refuse(&ctx, incoming, Some(target), RefusalReason::Denied, refusal);
            return None;
        }
    };

    // Connect to the app, keeping the client's address when we are inside the pod.
    let spoof = match scope.owner {
        Owner::Pod(_) if peer.ip() != target.ip() => Some(peer.ip()),
        _ => None,
    };
    // A reset while the dial is in flight abandons the dial: every one is counted and, when
    // it did not end in a tunnel, logged.
    let dial = scope.sockets.connect(target, spoof);
    let upstream = match incoming.unless_cancelled(dial).await {
        None => {
            ctx.metrics.inbound_dial("cancelled");
            cancelled(&incoming, target, true);
            return None;
        }
        Some(Ok(upstream)) => {
            ctx.metrics.inbound_dial("connected");
            upstream
        }
        Some(Err(e)) => {
            ctx.metrics.inbound_dial("failed");
            refuse(
                &ctx,
                incoming,
                Some(target),
                RefusalReason::Unavailable,
                Refusal::Unavailable(format!("connecting to {target}: {e}")),
            );
            return None;
        }
    };
    let series = super::labels::inbound_series(
        &ctx.metrics,
        &workload,
        tracked.facts().source_identity.as_ref(),
        &snapshot,
    );
    if incoming.is_cancelled() {
        cancelled(&incoming, target, true);
        return None;
    }
    let stream = match incoming.accept() {
        Ok(stream) => stream,
        Err(e) => {
            debug!(%peer, error = %e, "client went away before 200");
            return None;
        }
    };
    Some(Box::new(Connection {
        tracked,
        upstream,
        stream,
        series,
        tunnel_peer: ends.tunnel_peer,
        started,
    }))
}

/// Copies until done or closed by policy, then writes the access log and metrics.
async fn carry(ctx: &ProxyContext, connection: Box<Connection>) {
    let Connection {
        tracked,
        upstream,
        stream,
        series,
        tunnel_peer,
        started,
    } = super::unbox(connection);
    ctx.metrics.open(&series);
    let result = tracked.guard(copy_tcp_h2(upstream, stream)).await;
    let Transferred {
        to_upstream: received,
        to_downstream: sent,
    } = Transferred::of(&result);
    ctx.metrics.close(&series, received, sent);
    let facts = tracked.facts();
    let workload = tracked.workload();
    info!(
        target: "access",
        direction = "inbound",
        src.addr = %tracked.client(),
        src.identity = %Optional(facts.source_identity.as_ref()),
        tunnel.peer_addr = %tunnel_peer,
        dst.addr = %SocketAddr::new(facts.destination_ip, facts.destination_port),
        dst.workload = %workload.name,
        dst.namespace = %workload.namespace,
        dst.identity = %workload.identity_ref(),
        bytes_received = received,
        bytes_sent = sent,
        duration_ms = started.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
        "connection complete"
    );
}

/// Answers a CONNECT with `refusal`, logs and counts it; `target` is the workload socket the
/// authority was resolved to, when it got that far.
fn refuse(
    ctx: &ProxyContext,
    incoming: IncomingConnect,
    target: Option<SocketAddr>,
    reason: RefusalReason,
    refusal: Refusal,
) {
    let target = target.or(match incoming.authority {
        Authority::Addr(addr) => Some(addr),
        Authority::Host(..) => None,
    });
    let ends = Ends::of(&incoming);
    access_refused(
        ends,
        incoming.peer_identity.as_ref(),
        &incoming.authority,
        target,
        &refusal,
    );
    ctx.admission.refusals.record(
        ctx.config.ports.hbone,
        reason,
        ends.tunnel_peer,
        &refusal.reason(),
    );
    incoming.refuse(refusal);
}

/// Logs a CONNECT its client reset before the answer (the early reset is counted against the
/// peer's budget by the server).
fn cancelled(incoming: &IncomingConnect, target: SocketAddr, dialled: bool) {
    let ends = Ends::of(incoming);
    info!(
        target: "access",
        direction = "inbound",
        src.addr = %ends.client,
        src.identity = %Optional(incoming.peer_identity.as_ref()),
        tunnel.peer_addr = %ends.tunnel_peer,
        dst.authority = %incoming.authority,
        dst.addr = %target,
        dialled,
        "connection cancelled by the client before its answer"
    );
}

/// Why a CONNECT is turned away before anything is dialled: how it is counted, and what the
/// peer hears.
type Turned = (RefusalReason, Refusal);

/// The local workload and socket address a CONNECT authority names, or why it is refused.
/// An address must be the one the TLS connection arrived on (ztund is never an open proxy); a
/// service hostname must have an endpoint that is this very workload. Whatever the authority
/// resolves to, a port of ztund's own or a loopback address is a self-call: 400 before dialling.
fn destination(
    ctx: &ProxyContext,
    scope: &Scope,
    snapshot: &Snapshot,
    incoming: &IncomingConnect,
) -> Result<(Arc<Workload>, SocketAddr), Turned> {
    let bad = |reason, text: String| Err((reason, Refusal::BadRequest(text)));
    let local = incoming.local_addr;
    let Some(workload) = scope.local_workload(snapshot, &ctx.config.node, local.ip()) else {
        return Err((
            RefusalReason::NoLocalWorkload,
            Refusal::Unavailable(format!("no local workload at {local}")),
        ));
    };
    let target = match &incoming.authority {
        Authority::Addr(addr) => {
            // `[::ffff:10.0.0.2]` is 10.0.0.2: compared and authorized as such.
            let addr = crate::net::canonical(*addr);
            if is_host_itself(addr.ip()) {
                return bad(
                    RefusalReason::SelfCall,
                    format!("{addr} is the host itself, never a workload"),
                );
            }
            if addr.ip() != local.ip() || !workload.addresses.contains(&addr.ip()) {
                return bad(
                    RefusalReason::NotLocalDestination,
                    format!(
                        "{addr} is not the workload this connection reached ({})",
                        local.ip()
                    ),
                );
            }
            if addr.port() == 0 {
                return bad(RefusalReason::BadAuthority, format!("{addr}: port 0"));
            }
            addr
        }
        Authority::Host(host, port) => {
            if !is_service_hostname(host) {
                return bad(
                    RefusalReason::BadAuthority,
                    format!("{host} is neither a socket address nor a service hostname"),
                );
            }
            let Some(service) = snapshot.service_by_hostname(host, &workload.namespace) else {
                return Err((
                    RefusalReason::Unavailable,
                    Refusal::Unavailable(format!("unknown service {host}")),
                ));
            };
            if !snapshot
                .endpoints(service)
                .iter()
                .any(|w| w.uid == workload.uid)
            {
                return bad(
                    RefusalReason::NotLocalDestination,
                    format!("{host} has no endpoint on this workload"),
                );
            }
            let Some(port) = service.port(*port) else {
                return Err((
                    RefusalReason::Unavailable,
                    Refusal::Unavailable(format!("{host} has no port {port}")),
                ));
            };
            SocketAddr::new(local.ip(), workload.target_port(service, port))
        }
    };
    if is_own_port(target.port(), &ctx.config.ports) {
        return bad(
            RefusalReason::SelfCall,
            format!("{target} is one of ztund's own ports"),
        );
    }
    Ok((workload, target))
}

/// Loopback or unspecified, in any spelling once canonical (127.0.0.0/8, ::1, 0.0.0.0, ::).
fn is_host_itself(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified()
}

/// A name that can only be a service hostname: not `localhost`, and no all-digit last label
/// (`127.1`, `2130706433`: what `inet_aton` would read as an address). Never resolved by DNS.
fn is_service_hostname(host: &str) -> bool {
    !crate::hbone::is_address_in_disguise(host)
}

fn access_refused(
    ends: Ends,
    identity: Option<&SpiffeId>,
    authority: &Authority,
    target: Option<SocketAddr>,
    refusal: &Refusal,
) {
    info!(
        target: "access",
        direction = "inbound",
        src.addr = %ends.client,
        src.identity = %Optional(identity),
        tunnel.peer_addr = %ends.tunnel_peer,
        dst.authority = %authority,
        dst.addr = %Optional(target),
        status = refusal.status().as_u16(),
        reason = refusal.reason(),
        "connection refused"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<F>(_: fn(Arc<ProxyContext>, Scope, IncomingConnect) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every CONNECT stream's task holds this future for the stream's whole life; the set-up
    /// state (authorization, the app connect: 2.7 KiB inline) must not be part of it, nor what
    /// the tracker's registration already keeps (workload, client, target), nor a waiting
    /// `Notify` future (672 bytes before both). tokio adds ~112 bytes and rounds the task up
    /// to 128: 480 bytes make a 640-byte task.
    #[test]
    fn an_open_stream_keeps_only_the_copy_state_on_its_task() {
        let size = output_size(handle_connect);
        assert!(size <= 512, "the inbound stream future is {size} bytes");
    }
}
