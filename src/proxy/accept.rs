//! The accept loop every listener shares: each connection on its own task, the loop ending when
//! its scope drains, and connections still open [`DRAIN_DEADLINE`] after the drain cut off (a
//! removed pod or a stopping daemon does not wait on a client that never closes).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::context::ProxyContext;

/// How long open connections may finish after their scope starts draining.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Accepts on `listener` until `ctx.drain` flips, running `handle` for each connection.
/// `what` names the listener in logs.
pub async fn accept_loop<F, Fut>(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut drain = ctx.drain.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.wait_for(|d| *d) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Dual-stack listeners report IPv4 peers as ::ffff:a.b.c.d.
                let peer = crate::net::canonical(peer);
                let connection = handle(stream, peer);
                let drain = ctx.drain.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        result = connection => {
                            if let Err(reason) = result {
                                debug!(%peer, %reason, listener = what, "connection ended");
                            }
                        }
                        _ = drained_for(drain, DRAIN_DEADLINE) => {
                            debug!(%peer, listener = what, "connection cut: drain deadline passed");
                        }
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, listener = what, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resolves `deadline` after the drain signal flips; never, if the signal's sender is gone
/// without a drain (nothing asked this scope to stop).
async fn drained_for(mut drain: watch::Receiver<bool>, deadline: Duration) {
    if drain.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(deadline).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_cuts_after_the_deadline_and_a_dropped_sender_never_does() {
        let (tx, rx) = watch::channel(false);
        let cut = tokio::spawn(drained_for(rx, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!cut.is_finished(), "cut without a drain");
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!cut.is_finished(), "cut before the deadline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(cut.is_finished(), "not cut after the deadline");

        let (tx, rx) = watch::channel(false);
        let never = tokio::spawn(drained_for(rx, Duration::from_secs(1)));
        drop(tx);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!never.is_finished(), "a dropped sender is not a drain");
    }
}
