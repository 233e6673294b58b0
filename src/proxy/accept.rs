//! The accept loop every listener shares: each connection on its own task, the loop ending when
//! its scope drains, and connections still open `drainDeadline` after the drain cut off (a
//! removed pod or a stopping daemon does not wait on a client that never closes). Every
//! connection is also counted in the daemon-wide [`LiveConnections`], which the daemon's drain
//! waits on.
//!
//! The cut is one timer per listener, not one per connection: an idle connection's task holds
//! nothing for it but its place in the listener's set of open connections.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use slab::Slab;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info};

use super::context::ProxyContext;
use super::refusals::RefusalReason;

/// The daemon's open proxied connections, over every listener and pod.
#[derive(Debug, Default)]
pub struct LiveConnections {
    count: AtomicUsize,
    idle: Notify,
}

impl LiveConnections {
    /// How many are open now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a last leave in between still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Accepts on `listener` until `ctx.drain` flips, running `handle` for each connection.
/// `what` names the listener in logs.
pub async fn accept_loop<F, Fut, E>(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let open = Arc::new(OpenConnections::counted_in(ctx.live.clone()));
    // Its own task: a removed pod's listeners are aborted, and its connections must still be cut.
    tokio::spawn(cut_after_drain(
        ctx.drain.clone(),
        open.clone(),
        ctx.config.drain_deadline,
        what,
    ));
    let port = listener.local_addr().map_or(0, |addr| addr.port());
    let admission = ctx.admission.clone();
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
                if admission.in_reserve(stream.as_raw_fd()) {
                    // Descriptors are running out: this one goes, and so do the oldest
                    // connections that have proved nothing yet.
                    let shed = admission.shed_for_descriptors();
                    drop(stream);
                    let detail =
                        format!("open files near the limit; {shed} pending handshakes shed");
                    admission
                        .refusals
                        .record(port, RefusalReason::FdReserve, peer, &detail);
                    continue;
                }
                open.spawn(logged(handle(stream, peer), peer, what));
            }
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) the listener stays readable: retrying at
                // once would spin. Shed what has proved nothing, then pause.
                let shed = admission.shed_for_descriptors();
                let detail = format!("{what}: {e}; {shed} pending handshakes shed");
                admission.refusals.record(
                    port,
                    RefusalReason::AcceptFailed,
                    unknown_peer(),
                    &detail,
                );
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Pause after a failed `accept()`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A failed `accept()` has no peer; its log line shows this one.
fn unknown_peer() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A connection's future with its end logged. (`map`, not an `async` block: a block that awaits
/// a future it captured holds it twice, and this future lives as long as the connection.)
fn logged<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
    what: &'static str,
) -> impl Future<Output = ()> {
    connection.map(move |result| {
        if let Err(reason) = result {
            debug!(%peer, %reason, listener = what, "connection ended");
        }
    })
}

/// The tasks of one listener's connections that are still running.
#[derive(Debug, Default)]
struct OpenConnections {
    tasks: Mutex<Slab<AbortHandle>>,
    live: Arc<LiveConnections>,
}

impl OpenConnections {
    fn counted_in(live: Arc<LiveConnections>) -> OpenConnections {
        OpenConnections {
            tasks: Mutex::default(),
            live,
        }
    }

    /// Runs `connection` on its own task, a member of the set until it ends.
    fn spawn(self: &Arc<Self>, connection: impl Future<Output = ()> + Send + 'static) {
        // Held across the spawn, so a task that ends at once on another thread cannot leave
        // before it is entered.
        let mut open = self.lock();
        self.live.enter();
        let entry = open.vacant_entry();
        let member = Member {
            open: self.clone(),
            key: entry.key(),
        };
        let task = tokio::spawn(member.held_by(connection));
        entry.insert(task.abort_handle());
    }

    /// Aborts every task still in the set; returns how many there were.
    fn cut(&self) -> usize {
        let tasks = std::mem::take(&mut *self.lock());
        let count = tasks.len();
        for (_, task) in tasks {
            task.abort();
        }
        count
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Slab<AbortHandle>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection task's place in its listener's set, given up when the task ends or is aborted.
#[derive(Debug)]
struct Member {
    open: Arc<OpenConnections>,
    key: usize,
}

impl Member {
    /// `connection`, keeping this place until it ends or is dropped (`map`: see [`logged`]).
    fn held_by(self, connection: impl Future<Output = ()>) -> impl Future<Output = ()> {
        connection.map(move |()| drop(self))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // Absent after a cut, which empties the set before aborting.
        self.open.lock().try_remove(self.key);
        self.open.live.leave();
    }
}

/// Cuts the connections still open `deadline` after the drain signal flips; never, if the
/// signal's sender is gone without a drain (nothing asked this scope to stop).
async fn cut_after_drain(
    mut drain: watch::Receiver<bool>,
    open: Arc<OpenConnections>,
    deadline: Duration,
    what: &'static str,
) {
    if drain.wait_for(|d| *d).await.is_err() {
        return;
    }
    tokio::time::sleep(deadline).await;
    let cut = open.cut();
    if cut > 0 {
        info!(
            listener = what,
            connections = cut,
            "connections cut: drain deadline passed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

    /// A connection task that runs until its `finish` sender fires or drops; `ended` reports
    /// (by closing) when its future is gone, finished or aborted.
    fn connection(
        open: &Arc<OpenConnections>,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        open.spawn(async move {
            let _ended = ended_tx;
            let _ = finished.await;
        });
        (finish, ended)
    }

    /// The connection whose `ended` this is has neither finished nor been aborted.
    fn still_running(ended: &mut tokio::sync::oneshot::Receiver<()>) -> bool {
        ended.try_recv() == Err(tokio::sync::oneshot::error::TryRecvError::Empty)
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_cuts_what_is_still_open_after_the_deadline() {
        let (tx, rx) = watch::channel(false);
        let open = Arc::new(OpenConnections::default());
        let cutter = tokio::spawn(cut_after_drain(rx, open.clone(), DRAIN_DEADLINE, "test"));
        let (finish_a, a) = connection(&open);
        let (_finish_b, mut b) = connection(&open);
        tokio::task::yield_now().await;
        assert_eq!(open.len(), 2);

        finish_a.send(()).unwrap();
        assert!(a.await.is_err(), "a finished connection's future is gone");
        assert_eq!(open.len(), 1, "a finished connection leaves the set");

        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(still_running(&mut b), "cut without a drain");
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(open.len(), 1, "cut before the deadline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        cutter.await.unwrap();
        assert!(b.await.is_err(), "the open connection was aborted");
        assert_eq!(open.len(), 0);
    }

    /// A connection's task runs as long as the connection: it must hold the connection's
    /// future once, plus a few words for its log line and its place (an `async` block
    /// awaiting it would hold it twice).
    #[test]
    fn a_connection_task_holds_its_future_once() {
        let connection = async {
            let state = [7u8; 1000];
            std::future::pending::<()>().await;
            std::hint::black_box(&state);
            Ok::<(), String>(())
        };
        let inner = std::mem::size_of_val(&connection);
        let open = Arc::<OpenConnections>::default();
        open.live.enter();
        let member = Member { open, key: 0 };
        let task = member.held_by(logged(connection, "127.0.0.1:1".parse().unwrap(), "test"));
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= inner + 96,
            "a {inner}-byte connection makes a {size}-byte task"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_drain_sender_never_cuts() {
        let (tx, rx) = watch::channel(false);
        let open = Arc::new(OpenConnections::default());
        let cutter = tokio::spawn(cut_after_drain(rx, open.clone(), DRAIN_DEADLINE, "test"));
        let (_finish, mut ended) = connection(&open);
        drop(tx);
        cutter.await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(still_running(&mut ended), "a dropped sender is not a drain");
        assert_eq!(open.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_daemon_wide_count_follows_every_listener_and_wakes_the_drain_at_zero() {
        let live = Arc::new(LiveConnections::default());
        let a = Arc::new(OpenConnections::counted_in(live.clone()));
        let b = Arc::new(OpenConnections::counted_in(live.clone()));
        let (finish_a, ended_a) = connection(&a);
        let (_finish_b, ended_b) = connection(&b);
        tokio::task::yield_now().await;
        assert_eq!(live.count(), 2);

        let waiting = tokio::spawn({
            let live = live.clone();
            async move { live.idle().await }
        });
        finish_a.send(()).unwrap();
        assert!(ended_a.await.is_err());
        assert_eq!(live.count(), 1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "idle with a connection open");

        assert_eq!(b.cut(), 1);
        assert!(ended_b.await.is_err(), "the cut connection was aborted");
        assert_eq!(live.count(), 0, "a cut connection still counted");
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("idle resolves once the last connection is gone")
            .unwrap();
    }
}
