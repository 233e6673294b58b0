//! The data plane's threads: one thread per shard, each running a single-threaded tokio runtime
//! of its own. Every listener is bound once per shard (`SO_REUSEPORT` lets the kernel spread
//! new connections over them), a connection lives its whole life on the shard that accepted it,
//! and the HBONE pool keeps each shard's tunnels apart (the shard is part of
//! [`crate::hbone::PoolKey`]). So the hand-offs of one connection — copier task to HTTP/2
//! connection task and back — are queue pushes on one thread, never a futex wake of another
//! worker, which `perf` showed costing a fifth of the daemons' CPU per new connection on the
//! work-stealing runtime. Control work (mesh, certificates, admin) stays on the main runtime.
//! Knows nothing about what runs on the shards.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::scheduling::{self, ThreadScheduling};

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread belongs to; 0 on any thread that is not a shard's.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The running shards. Dropping them stops their runtimes (their tasks are dropped) and joins
/// their threads, so only their starter holds them; everyone else gets a [`Spawner`].
#[derive(Debug)]
pub struct Shards {
    spawner: Spawner,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// `auto` scheduling's controller, stopped by dropping its sender.
    scheduler: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Shards {
    /// Starts `count` shards (at least one), threads named `ztund-shard<N>`, scheduled as
    /// `scheduling` says.
    pub fn start(count: usize, scheduling: ThreadScheduling) -> io::Result<Shards> {
        let mut handles = Vec::new();
        let mut shards = Shards {
            spawner: Spawner::new(Vec::new()),
            stops: Vec::new(),
            threads: Vec::new(),
            scheduler: None,
        };
        let (ready, started) = std::sync::mpsc::channel();
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let ready = ready.clone();
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            shards.stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("ztund-shard{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(index));
                    let scheduled = match scheduling::initial_policy(scheduling) {
                        Some(policy) => scheduling::set_policy(0, policy),
                        None => Ok(()),
                    };
                    let failed = scheduled.is_err();
                    let _ = ready.send(scheduled.map(|()| scheduling::this_thread()));
                    // The starter reads until every thread's sender is gone.
                    drop(ready);
                    if failed {
                        return;
                    }
                    // A current-thread runtime runs its spawned tasks only inside `block_on`.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            shards.threads.push(thread);
        }
        drop(ready);
        // Every thread reports once; a shard that could not be scheduled as asked fails the
        // start (the partly built shards stop as `shards` drops).
        let mut tids = Vec::new();
        for scheduled in started {
            tids.push(scheduled?);
        }
        if scheduling == ThreadScheduling::Auto {
            let (stop, stopped) = std::sync::mpsc::channel();
            let controller = std::thread::Builder::new()
                .name("ztund-sched".into())
                .spawn(move || {
                    scheduling::run_auto(
                        &tids,
                        scheduling::CpuTimes::read,
                        scheduling::SAMPLE_EVERY,
                        &stopped,
                    )
                })?;
            shards.scheduler = Some((stop, controller));
        }
        shards.spawner = Spawner::new(handles);
        Ok(shards)
    }

    /// Spawns onto these shards; cheap to clone, and holding one keeps no thread alive.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }
}

/// Spawns tasks onto the shards.
#[derive(Debug, Clone)]
pub struct Spawner {
    handles: Arc<[Handle]>,
    /// Long-lived connections placed on each shard by [`Spawner::place`].
    placed: Arc<[AtomicUsize]>,
}

impl Spawner {
    fn new(handles: Vec<Handle>) -> Spawner {
        let placed = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Spawner {
            handles: Arc::from(handles),
            placed,
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs a long-lived connection on the shard that has the fewest of them (the caller's own
    /// on a tie, so a lone connection never moves). `SO_REUSEPORT` spreads connections by a
    /// hash, which is fair for many short ones but can put both of a peer's two pooled HBONE
    /// connections on one shard and leave the other idle. `make` gets the socket back on the
    /// chosen shard; the returned future ends with the connection, and dropping it aborts it.
    pub fn place<F, Fut, E>(&self, tcp: TcpStream, make: F) -> Placed<E>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: From<PlacementError> + Send + 'static,
    {
        let here = current().min(self.len().saturating_sub(1));
        let load = |shard: usize| self.placed[shard].load(Ordering::Relaxed);
        let target = (0..self.len())
            .min_by_key(|&shard| (load(shard), shard != here))
            .unwrap_or(here);
        let occupancy = Occupancy::new(self.placed.clone(), target);
        if target == here {
            return Placed::Here(Box::pin(async move {
                let _occupancy = occupancy;
                make(tcp).await
            }));
        }
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => return Placed::Failed(Some(PlacementError::Move(e))),
        };
        Placed::There(self.handles[target].spawn(async move {
            let _occupancy = occupancy;
            let tcp = TcpStream::from_std(tcp).map_err(|e| E::from(PlacementError::Move(e)))?;
            make(tcp).await
        }))
    }

    /// Runs `make(shard)` on each shard. The future is built on the caller's thread but first
    /// polled on its shard, so sockets it registers belong to that shard's reactor.
    pub fn spawn_each<F, Fut>(&self, mut make: F) -> Vec<JoinHandle<()>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handles
            .iter()
            .enumerate()
            .map(|(index, handle)| handle.spawn(make(index)))
            .collect()
    }

    /// Serves one listener per shard (bound with `SO_REUSEPORT` on the same address): the
    /// listener is moved onto its shard's reactor, then `serve` runs there with it.
    pub fn serve_each<F, Fut>(&self, listeners: Vec<TcpListener>, serve: F) -> Vec<JoinHandle<()>>
    where
        F: Fn(TcpListener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handles
            .iter()
            .zip(listeners)
            .filter_map(|(handle, listener)| {
                let listener = listener
                    .into_std()
                    .inspect_err(|e| warn!(error = %e, "moving a listener to its shard"))
                    .ok()?;
                let serve = serve.clone();
                Some(handle.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener).await,
                        Err(e) => warn!(error = %e, "registering a listener on its shard"),
                    }
                }))
            })
            .collect()
    }
}

/// One connection counted on a shard while it lives.
struct Occupancy {
    placed: Arc<[AtomicUsize]>,
    shard: usize,
}

impl Occupancy {
    fn new(placed: Arc<[AtomicUsize]>, shard: usize) -> Occupancy {
        placed[shard].fetch_add(1, Ordering::Relaxed);
        Occupancy { placed, shard }
    }
}

impl Drop for Occupancy {
    fn drop(&mut self) {
        self.placed[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a [`Spawner::place`]d connection could not run on the shard chosen for it.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The socket could not be handed from one shard's runtime to another's.
    #[error("moving a connection: {0}")]
    Move(#[source] io::Error),
    /// The connection's task on the other shard panicked or was cancelled.
    #[error("connection task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A connection [`Spawner::place`]d: run here, or running on another shard.
pub enum Placed<E> {
    Here(Pin<Box<dyn Future<Output = Result<(), E>> + Send>>),
    There(JoinHandle<Result<(), E>>),
    Failed(Option<PlacementError>),
}

impl<E: From<PlacementError>> Future for Placed<E> {
    type Output = Result<(), E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Placed::Here(connection) => connection.as_mut().poll(cx),
            Placed::There(task) => Pin::new(task)
                .poll(cx)
                .map(|joined| joined.unwrap_or_else(|e| Err(PlacementError::Task(e).into()))),
            // Taken at the first poll; a later one (past completion) has nothing left to say.
            Placed::Failed(reason) => Poll::Ready(reason.take().map_or(Ok(()), |e| Err(e.into()))),
        }
    }
}

impl<E> Drop for Placed<E> {
    fn drop(&mut self) {
        if let Placed::There(task) = self {
            task.abort();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        if let Some((stop, controller)) = self.scheduler.take() {
            drop(stop);
            let _ = controller.join();
        }
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The echo connection's errors: its socket's, or the placement's.
    #[derive(Debug, thiserror::Error)]
    enum EchoError {
        #[error(transparent)]
        Io(#[from] io::Error),
        #[error(transparent)]
        Placement(#[from] PlacementError),
    }

    #[test]
    fn each_shard_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let shards = Shards::start(3, ThreadScheduling::Normal).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = shards.spawner().spawn_each(|index| {
            let seen = seen.clone();
            async move {
                // A task spawned from a shard stays on it.
                let inner = tokio::spawn(async { (current(), std::thread::current().id()) });
                let (spawned_on, spawned_thread) = inner.await.unwrap();
                seen.lock().unwrap().push((
                    index,
                    current(),
                    spawned_on,
                    std::thread::current().id() == spawned_thread,
                    std::thread::current().name().map(str::to_string),
                ));
            }
        });
        let main = Builder::new_current_thread().build().unwrap();
        main.block_on(async {
            for task in tasks {
                task.await.unwrap();
            }
        });
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen.len(), 3);
        for (index, current, spawned_on, same_thread, name) in &seen {
            assert_eq!(index, current);
            assert_eq!(index, spawned_on);
            assert!(same_thread, "shard {index}: a spawned task moved threads");
            assert_eq!(
                name.as_deref(),
                Some(format!("ztund-shard{index}").as_str())
            );
        }
        let names: HashSet<_> = seen.iter().map(|s| s.4.clone()).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(current(), 0, "a thread that is no shard's reads as 0");
    }

    #[test]
    fn placed_connections_spread_over_the_shards_and_bytes_still_flow() {
        let shards = Shards::start(2, ThreadScheduling::Normal).unwrap();
        let spawner = shards.spawner();
        let on_shard0 = spawner.clone();
        let tasks = spawner.spawn_each(move |index| {
            let spawner = on_shard0.clone();
            async move {
                if index != 0 {
                    return;
                }
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let mut placed = Vec::new();
                let mut clients = Vec::new();
                for _ in 0..4 {
                    clients.push(TcpStream::connect(addr).await.unwrap());
                    let (tcp, _) = listener.accept().await.unwrap();
                    let (ran_on, seen) = oneshot::channel();
                    let connection = spawner.place(tcp, move |mut tcp| async move {
                        let _ = ran_on.send(current());
                        // Echo one message: the socket works on the shard it moved to.
                        let mut buf = [0u8; 5];
                        tcp.read_exact(&mut buf).await?;
                        tcp.write_all(&buf).await?;
                        std::future::pending::<()>().await;
                        Ok::<(), EchoError>(())
                    });
                    placed.push((tokio::spawn(connection), seen));
                }
                let mut shards_used = Vec::new();
                for (client, (_, seen)) in clients.iter_mut().zip(placed.iter_mut()) {
                    shards_used.push(seen.await.unwrap());
                    client.write_all(b"hello").await.unwrap();
                    let mut back = [0u8; 5];
                    client.read_exact(&mut back).await.unwrap();
                    assert_eq!(&back, b"hello");
                }
                shards_used.sort();
                assert_eq!(shards_used, [0, 0, 1, 1], "two connections on each shard");
                // Dropping a placed connection ends it, wherever it runs.
                for (task, _) in placed {
                    task.abort();
                }
            }
        });
        let main = Builder::new_current_thread().build().unwrap();
        main.block_on(async {
            for task in tasks {
                task.await.unwrap();
            }
        });
    }

    /// The policy each shard thread reports for itself.
    fn policies_on(scheduling: ThreadScheduling) -> Vec<i32> {
        let shards = Shards::start(2, scheduling).unwrap();
        let (report, reports) = std::sync::mpsc::channel();
        shards.spawner().spawn_each(|_| {
            let report = report.clone();
            // SAFETY: sched_getscheduler only reads the calling thread's policy.
            async move { report.send(unsafe { libc::sched_getscheduler(0) }).unwrap() }
        });
        drop(report);
        reports.iter().collect()
    }

    #[test]
    fn batch_scheduling_reaches_every_shard_auto_starts_normal_and_normal_leaves_the_policy_alone()
    {
        assert_eq!(policies_on(ThreadScheduling::Batch), [libc::SCHED_BATCH; 2]);
        // SAFETY: as above.
        let ours = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(
            ours,
            libc::SCHED_OTHER,
            "the test thread itself is untouched"
        );
        assert_eq!(policies_on(ThreadScheduling::Normal), [ours; 2]);
        // `auto` starts safe; `scheduling::tests` drive its switching.
        assert_eq!(policies_on(ThreadScheduling::Auto), [libc::SCHED_OTHER; 2]);
    }

    #[test]
    fn dropping_the_shards_stops_their_tasks_and_threads() {
        let shards = Shards::start(2, ThreadScheduling::Normal).unwrap();
        let (alive, mut gone) = tokio::sync::mpsc::channel::<()>(1);
        shards.spawner().spawn_each(|_| {
            let alive = alive.clone();
            async move {
                let _keep = alive;
                std::future::pending::<()>().await;
            }
        });
        drop(alive);
        drop(shards);
        // Every task (and with it every sender) was dropped with its runtime.
        assert!(gone.blocking_recv().is_none());
    }
}
