//! Readiness: the set of start-up tasks still pending (PROTOCOL.md §6.2). The daemon is ready
//! when the set is empty. It knows nothing of what the tasks are; the components that own them
//! register and complete them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Shared, cloneable view of the pending start-up tasks.
#[derive(Debug, Clone)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<String>>>,
    /// Set once the daemon starts draining; never cleared.
    draining: Arc<AtomicBool>,
    /// The number of pending tasks after each change, for whoever waits on readiness (systemd's
    /// `READY=1`) without polling.
    changes: Arc<watch::Sender<usize>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            pending: Arc::default(),
            draining: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }
}

impl Readiness {
    /// Nothing pending: ready until a task registers.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // The set stays consistent even if a holder panicked: every operation is one insert or
        // remove.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `task` pending and returns a guard that marks it ready when completed or dropped.
    pub fn register(&self, task: &str) -> ReadyGuard {
        self.mark_pending(task);
        ReadyGuard {
            readiness: self.clone(),
            task: task.to_string(),
        }
    }

    /// Marks `task` pending (again).
    pub fn mark_pending(&self, task: &str) {
        let mut pending = self.lock();
        if pending.insert(task.to_string()) {
            self.changes.send_replace(pending.len());
        }
    }

    /// Marks `task` ready; unknown tasks are ignored.
    pub fn mark_ready(&self, task: &str) {
        let mut pending = self.lock();
        if pending.remove(task) {
            self.changes.send_replace(pending.len());
        }
    }

    /// Changes to the number of pending tasks.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.changes.subscribe()
    }

    /// The tasks still pending, sorted.
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// Whether no task is pending and the daemon is not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.lock().is_empty()
    }

    /// The daemon stops: not ready from now on, whatever the tasks say.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Readiness::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// A pending task; ready when [`ReadyGuard::ready`] is called or the guard is dropped (so a
/// task that ends by an early return does not keep the daemon unready forever).
#[derive(Debug)]
#[must_use = "dropping the guard marks the task ready at once"]
pub struct ReadyGuard {
    readiness: Readiness,
    task: String,
}

impl ReadyGuard {
    /// Marks the task ready.
    pub fn ready(self) {
        drop(self);
    }

    /// The task's name.
    pub fn task(&self) -> &str {
        &self.task
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness.mark_ready(&self.task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_every_task_completes() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready());
        let proxy = readiness.register("proxy");
        let state = readiness.register("state manager");
        assert_eq!(readiness.pending(), vec!["proxy", "state manager"]);
        proxy.ready();
        assert_eq!(readiness.pending(), vec!["state manager"]);
        assert!(!readiness.is_ready());
        drop(state);
        assert!(readiness.is_ready());
    }

    #[test]
    fn mark_pending_and_ready_by_name() {
        let readiness = Readiness::new();
        readiness.mark_pending("workload proxy manager");
        readiness.mark_pending("workload proxy manager");
        assert_eq!(readiness.pending(), vec!["workload proxy manager"]);
        readiness.mark_ready("not registered");
        assert!(!readiness.is_ready());
        readiness.mark_ready("workload proxy manager");
        assert!(readiness.is_ready());
    }

    #[test]
    fn draining_is_never_ready() {
        let readiness = Readiness::new();
        readiness.start_draining();
        assert!(readiness.is_draining());
        assert!(!readiness.is_ready());
        assert!(
            readiness.pending().is_empty(),
            "draining is no pending task"
        );
    }
}
