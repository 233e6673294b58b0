//! Supervision of the daemon's long-lived background tasks (the mesh watcher, the xDS client,
//! the certificate follower, the ZDS client, the admin servers, ...). A task that panics or
//! ends while the daemon is not stopping is never silent: it is logged at error, counted in
//! `ztund_task_failures_total{task}`, and readiness answers 500 naming it. Then, per task, it
//! is either restarted after a backoff, or the daemon stops and exits non-zero.
//!
//! Restart suits tasks whose state lives outside them (the mesh store, the xDS state, the pod
//! manager): a fresh copy picks up where the dead one left. A task that owns something it
//! cannot get back (a listening socket) stops the daemon instead, so that its own supervisor
//! (kubelet, systemd) starts a whole one. Why each task got its policy is written where it is
//! spawned.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info};

use crate::admin::Readiness;

/// What the supervisor does when a task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Start a fresh copy of the task after a backoff.
    Restart(RestartBackoff),
    /// Stop the daemon: it drains and exits non-zero naming the task.
    StopDaemon,
}

/// The wait before each restart of a failing task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    /// The wait before the first restart.
    pub initial: Duration,
    /// The longest wait; each consecutive failure doubles it up to this.
    pub max: Duration,
    /// A restarted task that has run this long is healthy again: readiness no longer names
    /// it and the next failure waits `initial` again.
    pub healthy_after: Duration,
}

impl Default for RestartBackoff {
    /// Long enough that a task failing at once does not spin a core; short enough that a
    /// passing fault (a directory briefly gone) heals within seconds.
    fn default() -> Self {
        RestartBackoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(2),
        }
    }
}

/// Why a supervised task stopped running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskFailure {
    #[error("panicked: {0}")]
    Panicked(String),
    #[error("ended although the daemon is not stopping")]
    Ended,
    #[error("failed: {0}")]
    Failed(String),
}

/// A task asked the daemon to stop by failing with [`OnFailure::StopDaemon`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatalFailure {
    pub task: &'static str,
    pub failure: TaskFailure,
}

/// Spawns and watches the daemon's background tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    readiness: Readiness,
    failures: Family<TaskLabels, Counter>,
    /// Turns true once the daemon stops: a task ending then is no failure.
    stopping: watch::Receiver<bool>,
    fatal: Arc<watch::Sender<Option<FatalFailure>>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
}

impl Supervisor {
    /// A supervisor reporting into `readiness`; tasks ending once `stopping` is true are done.
    pub fn new(readiness: Readiness, stopping: watch::Receiver<bool>) -> Supervisor {
        Supervisor {
            readiness,
            failures: Family::default(),
            stopping,
            fatal: Arc::new(watch::channel(None).0),
        }
    }

    /// Registers `ztund_task_failures_total{task}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztund_task_failures",
            "Background tasks that panicked or ended unexpectedly, by task",
            self.failures.clone(),
        );
    }

    /// How often `task` has failed so far.
    pub fn failures(&self, task: &'static str) -> u64 {
        self.failures.get_or_create(&TaskLabels { task }).get()
    }

    /// Resolves with the first failure of a [`OnFailure::StopDaemon`] task.
    pub async fn fatal(&self) -> FatalFailure {
        let mut fatal = self.fatal.subscribe();
        let failure = fatal.wait_for(Option::is_some).await;
        match failure {
            Ok(failure) => failure.clone().expect("waited for Some"),
            // The sender lives in `self`, so it cannot be gone while this runs.
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs `start()` as task `task`, and again after each failure under `Restart`. `start`
    /// builds a fresh copy of the task each time.
    pub fn spawn<F, Fut, E>(&self, task: &'static str, on_failure: OnFailure, mut start: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            let mut backoff = None::<Duration>;
            loop {
                let started = Instant::now();
                let running = tokio::spawn(start());
                let healthy = async {
                    if let OnFailure::Restart(policy) = on_failure {
                        tokio::time::sleep(policy.healthy_after).await;
                        supervisor.readiness.mark_ready(&readiness_task(task));
                    }
                    std::future::pending::<()>().await
                };
                let joined = tokio::select! {
                    joined = running => joined,
                    () = healthy => unreachable!("never resolves"),
                };
                let failure = match joined {
                    Ok(_) if supervisor.is_stopping() => return,
                    // The runtime is shutting down after the daemon stopped.
                    Err(e) if e.is_cancelled() => return,
                    Ok(Ok(())) => TaskFailure::Ended,
                    Ok(Err(e)) => TaskFailure::Failed(e.to_string()),
                    Err(e) => TaskFailure::Panicked(panic_text(e.into_panic())),
                };
                let policy = match on_failure {
                    OnFailure::Restart(policy) => policy,
                    OnFailure::StopDaemon => {
                        supervisor.report(task, &failure, "stopping the daemon");
                        let fatal = FatalFailure { task, failure };
                        // The first fatal failure is the one the daemon exits with.
                        supervisor.fatal.send_if_modified(|held| match held {
                            Some(_) => false,
                            None => {
                                *held = Some(fatal);
                                true
                            }
                        });
                        return;
                    }
                };
                let delay = match backoff {
                    Some(last) if started.elapsed() < policy.healthy_after => {
                        (last * 2).min(policy.max)
                    }
                    _ => policy.initial,
                };
                backoff = Some(delay);
                supervisor.report(task, &failure, &format!("restarting in {delay:?}"));
                let mut stopping = supervisor.stopping.clone();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                info!(task, "restarting the background task");
            }
        });
    }

    /// Runs one future as task `task` under [`OnFailure::StopDaemon`]: for tasks that own what
    /// a fresh copy could not get back.
    pub fn spawn_once<Fut, E>(&self, task: &'static str, future: Fut)
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let mut future = Some(future);
        self.spawn(task, OnFailure::StopDaemon, move || {
            future.take().expect("StopDaemon starts a task once")
        });
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn report(&self, task: &'static str, failure: &TaskFailure, then: &str) {
        error!(task, error = %failure, "background task {task} failed; {then}");
        self.failures.get_or_create(&TaskLabels { task }).inc();
        self.readiness.mark_pending(&readiness_task(task));
    }
}

/// How readiness names a failed task (`/healthz/ready` lists it in its 500).
pub fn readiness_task(task: &str) -> String {
    format!("task failed: {task}")
}

/// For tasks whose own end is always unexpected: their `Result` to hand the supervisor.
pub async fn never_fails(future: impl Future<Output = ()>) -> Result<(), std::convert::Infallible> {
    future.await;
    Ok(())
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        return (*text).to_string();
    }
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(_) => "(no message)".to_string(),
    }
}

#[cfg(test)]
#[path = "supervise_tests.rs"]
mod tests;
