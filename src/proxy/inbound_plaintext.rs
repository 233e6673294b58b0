//! The inbound plaintext listener (15006): TCP that reached a pod without HBONE. accept → find
//! the pod and port → authorize with no peer identity (so STRICT refuses it) and stay registered
//! for re-checks → connect to the app with the client's address → copy until done or closed by
//! policy → record.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use super::accept::accept_loop;
use super::context::{ProxyContext, Scope};
use super::copy::{Transferred, copy_bidirectional};
use super::error::ConnectionError;
use super::refusals::RefusalReason;
use super::route::is_own_port;
use crate::policy::ConnectionFacts;

/// Accepts plaintext connections until the pod or the daemon drains.
pub async fn serve(ctx: Arc<ProxyContext>, scope: Scope, listener: TcpListener) {
    let handler_ctx = ctx.clone();
    accept_loop(ctx, listener, "inbound_plaintext", move |stream, peer| {
        let ctx = handler_ctx.clone();
        let scope = scope.clone();
        async move { handle(&ctx, &scope, stream, peer).await }
    })
    .await;
}

async fn handle(
    ctx: &ProxyContext,
    scope: &Scope,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<(), ConnectionError> {
    let started = Instant::now();
    let port = ctx.config.ports.inbound_plaintext;
    let refusals = &ctx.admission.refusals;
    let target = crate::net::original_destination(&client).map_err(ConnectionError::Address)?;
    let snapshot = ctx.mesh.load();
    let Some(workload) = scope.local_workload(&snapshot, &ctx.config.node, target.ip()) else {
        let reason = ConnectionError::NoLocalWorkload { addr: target };
        refusals.record(port, RefusalReason::NoLocalWorkload, peer, &reason);
        return Err(reason);
    };
    if is_own_port(target.port(), &ctx.config.ports) || target.ip().is_loopback() {
        let reason = ConnectionError::OwnPort { addr: target };
        refusals.record(port, RefusalReason::SelfCall, peer, &reason);
        return Err(reason);
    }
    let facts = ConnectionFacts {
        source_ip: peer.ip(),
        source_identity: None,
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let admitted = ctx
        .tracker
        .admit(&workload, facts, peer, &snapshot, &ctx.mesh, &ctx.metrics);
    let tracked = match admitted {
        Ok(tracked) => tracked,
        Err(reason) => {
            info!(
                target: "access",
                direction = "inbound_plaintext",
                src.addr = %peer,
                dst.addr = %target,
                dst.workload = %workload.name,
                reason = %reason,
                "connection refused"
            );
            refusals.record(port, RefusalReason::Denied, peer, &reason);
            return Ok(());
        }
    };
    let spoof = (peer.ip() != target.ip()).then_some(peer.ip());
    let upstream = match scope.sockets.connect(target, spoof).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let reason = ConnectionError::Connect { target, source: e };
            refusals.record(port, RefusalReason::Unavailable, peer, &reason);
            return Err(reason);
        }
    };
    let series = super::labels::inbound_series(&ctx.metrics, &workload, None, &snapshot);
    ctx.metrics.open(&series);
    let result = tracked.guard(copy_bidirectional(client, upstream)).await;
    let Transferred {
        to_upstream: received,
        to_downstream: sent,
    } = Transferred::of(&result);
    ctx.metrics.close(&series, received, sent);
    info!(
        target: "access",
        direction = "inbound_plaintext",
        src.addr = %peer,
        dst.addr = %target,
        dst.workload = %workload.name,
        bytes_received = received,
        bytes_sent = sent,
        duration_ms = started.elapsed().as_millis() as u64,
        error = result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
        "connection complete"
    );
    Ok(())
}
