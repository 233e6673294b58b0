//! The PING keepalive both ends of an HBONE connection run (PROTOCOL.md §1.2): a PING after a
//! pause, the next pause starting at each PONG, and a missing PONG ends the connection. Owns
//! only the timing; the caller decides how to tear down.

use std::time::Duration;

use tokio::sync::oneshot;

/// Runs the keepalive. Completes only when a PONG is overdue; if the connection goes away
/// first, it waits forever so the connection's own end wins any `select!`.
///
/// `first_pong` is told as soon as the first PONG arrives: by then the peer's initial SETTINGS
/// (the first frame it sends) has been applied, which the pool waits for before sharing a
/// connection.
pub(crate) async fn keepalive(
    ping_pong: Option<h2::PingPong>,
    first_ping_after: Duration,
    interval: Duration,
    timeout: Duration,
    mut first_pong: Option<oneshot::Sender<()>>,
) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    let mut pause = first_ping_after;
    loop {
        tokio::time::sleep(pause).await;
        pause = interval;
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                if let Some(tell) = first_pong.take() {
                    let _ = tell.send(());
                }
            }
            // The connection is closing for its own reasons; let that finish.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_elapsed) => return,
        }
    }
}
