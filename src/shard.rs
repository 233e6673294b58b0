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
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::warn;

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
}

impl Shards {
    /// Starts `count` shards (at least one), threads named `ztund-shard<N>`.
    pub fn start(count: usize) -> io::Result<Shards> {
        let mut handles = Vec::new();
        let mut shards = Shards {
            spawner: Spawner(Arc::from([])),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            shards.stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("ztund-shard{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(index));
                    // A current-thread runtime runs its spawned tasks only inside `block_on`.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            shards.threads.push(thread);
        }
        shards.spawner = Spawner(Arc::from(handles));
        Ok(shards)
    }

    /// Spawns onto these shards; cheap to clone, and holding one keeps no thread alive.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }
}

/// Spawns tasks onto the shards.
#[derive(Debug, Clone)]
pub struct Spawner(Arc<[Handle]>);

impl Spawner {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs `make(shard)` on each shard. The future is built on the caller's thread but first
    /// polled on its shard, so sockets it registers belong to that shard's reactor.
    pub fn spawn_each<F, Fut>(&self, mut make: F) -> Vec<JoinHandle<()>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.0
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
        self.0
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

impl Drop for Shards {
    fn drop(&mut self) {
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

    use super::*;

    #[test]
    fn each_shard_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let shards = Shards::start(3).unwrap();
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
    fn dropping_the_shards_stops_their_tasks_and_threads() {
        let shards = Shards::start(2).unwrap();
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
