//! The registry of open inbound connections (HBONE streams and plaintext) with what they were
//! authorized on, and the re-check that closes the ones a new snapshot denies (PROTOCOL.md §4.2,
//! "Re-evaluation"). A connection holds a [`TrackedConnection`] while it copies and stops copying
//! when it is told to close; dropping the guard unregisters it. Knows nothing about sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tracing::info;

use crate::admin::Metrics;
use crate::mesh::{MeshStore, Snapshot, Workload};
use crate::policy::{self, ConnectionFacts, Decision};

/// Every open inbound connection of the daemon.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

#[derive(Debug)]
struct Entry {
    workload_uid: String,
    workload_name: String,
    facts: ConnectionFacts,
    /// Set to the denial reason to close the connection.
    close: watch::Sender<Option<String>>,
}

/// One connection closed by a re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub workload_uid: String,
    pub workload_name: String,
    pub facts: ConnectionFacts,
    /// The denial, naming the policy.
    pub reason: String,
}

/// A registered connection; unregisters itself when dropped.
#[derive(Debug)]
pub struct TrackedConnection {
    id: u64,
    tracker: Weak<ConnectionTracker>,
    close: watch::Receiver<Option<String>>,
}

impl TrackedConnection {
    /// Resolves with the denial once the connection must close; never while it may stay.
    pub async fn closed(&mut self) -> String {
        let reason = match self.close.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            // The tracker is gone (the daemon is stopping): nothing will ever close us.
            None => std::future::pending().await,
        }
    }

    /// Runs `copy` until it ends or policy closes the connection. Dropping the copy drops both
    /// sockets, so after a policy close the app gets no further byte.
    pub async fn guard(
        &mut self,
        copy: impl std::future::Future<Output = std::io::Result<super::copy::Transferred>>,
    ) -> std::io::Result<super::copy::Transferred> {
        tokio::select! {
            result = copy => result,
            reason = self.closed() => Err(std::io::Error::other(format!("closed by policy: {reason}"))),
        }
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if let Some(tracker) = self.tracker.upgrade()
            && let Ok(mut open) = tracker.open.lock()
        {
            open.remove(&self.id);
        }
    }
}

impl ConnectionTracker {
    pub fn new() -> Arc<ConnectionTracker> {
        Arc::new(ConnectionTracker::default())
    }

    /// Registers a connection to `workload` that `seen` authorized. If the mesh moved on since
    /// `seen` (a re-check may have run before this registration), it is authorized again against
    /// the current snapshot; `Err` carries the denial and nothing stays registered.
    pub fn register(
        self: &Arc<Self>,
        workload: &Workload,
        facts: ConnectionFacts,
        seen: &Snapshot,
        mesh: &MeshStore,
    ) -> Result<TrackedConnection, String> {
        let (close, receiver) = watch::channel(None);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = TrackedConnection {
            id,
            tracker: Arc::downgrade(self),
            close: receiver,
        };
        if let Ok(mut open) = self.open.lock() {
            open.insert(
                id,
                Entry {
                    workload_uid: workload.uid.clone(),
                    workload_name: workload.name.clone(),
                    facts: facts.clone(),
                    close,
                },
            );
        }
        let now = mesh.load();
        if now.generation != seen.generation
            && let Some(current) = now.workload_by_uid(&workload.uid)
            && let Decision::Deny(reason) = policy::authorize(&now.policies, current, &facts)
        {
            return Err(reason);
        }
        Ok(tracked)
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Authorizes every open connection again against `snapshot` and tells the denied ones to
    /// close. A connection whose workload left the snapshot is left to the pod's own drain.
    pub fn recheck(&self, snapshot: &Snapshot) -> Vec<Closed> {
        let Ok(mut open) = self.open.lock() else {
            return Vec::new();
        };
        let mut closed = Vec::new();
        open.retain(|_, entry| {
            let Some(workload) = snapshot.workload_by_uid(&entry.workload_uid) else {
                return true;
            };
            match policy::authorize(&snapshot.policies, workload, &entry.facts) {
                Decision::Allow => true,
                Decision::Deny(reason) => {
                    entry.close.send_replace(Some(reason.clone()));
                    closed.push(Closed {
                        workload_uid: entry.workload_uid.clone(),
                        workload_name: entry.workload_name.clone(),
                        facts: entry.facts.clone(),
                        reason,
                    });
                    false
                }
            }
        });
        closed
    }
}

/// Re-checks the open connections on every snapshot change until `drain` turns true.
pub async fn watch_policies(
    tracker: Arc<ConnectionTracker>,
    mesh: Arc<MeshStore>,
    metrics: Arc<Metrics>,
    mut drain: watch::Receiver<bool>,
) {
    let mut changes = mesh.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = drain.wait_for(|d| *d) => return,
        }
        let snapshot = mesh.load();
        for closed in tracker.recheck(&snapshot) {
            metrics.policy_denial(&closed.reason);
            let identity = closed
                .facts
                .source_identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            info!(
                target: "access",
                direction = "inbound",
                src.addr = %closed.facts.source_ip,
                src.identity = %identity,
                dst.addr = %std::net::SocketAddr::new(closed.facts.destination_ip, closed.facts.destination_port),
                dst.workload = %closed.workload_name,
                generation = snapshot.generation,
                reason = %closed.reason,
                "connection closed by policy"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{conn, policies, workload};

    const DENY_SLEEP: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-sleep, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
";

    fn snapshot(yaml: &str) -> Snapshot {
        let echo = workload("default", "echo", "echo", "10.0.0.2", "app=echo");
        Snapshot::build(vec![echo], vec![], policies(yaml))
    }

    #[tokio::test]
    async fn a_new_deny_policy_closes_only_the_connections_it_matches() {
        let mesh = MeshStore::new(snapshot(""));
        let seen = mesh.load();
        let echo = seen.workloads()[0].clone();
        let tracker = ConnectionTracker::new();
        let sleep = conn("10.0.0.1", Some("default/sleep"), "10.0.0.2", 8080);
        let other = conn("10.0.0.3", Some("default/web"), "10.0.0.2", 8080);
        let mut denied = tracker.register(&echo, sleep, &seen, &mesh).unwrap();
        let mut kept = tracker.register(&echo, other, &seen, &mesh).unwrap();
        assert_eq!(tracker.len(), 2);

        assert!(tracker.recheck(&seen).is_empty(), "nothing changed");
        mesh.replace(snapshot(DENY_SLEEP));
        let closed = tracker.recheck(&mesh.load());
        assert_eq!(closed.len(), 1);
        assert!(closed[0].reason.contains("default/no-sleep"), "{closed:?}");
        assert_eq!(tracker.len(), 1);

        let reason = tokio::time::timeout(std::time::Duration::from_secs(1), denied.closed())
            .await
            .expect("the denied connection is told to close");
        assert!(reason.contains("default/no-sleep"));
        let still_open =
            tokio::time::timeout(std::time::Duration::from_millis(50), kept.closed()).await;
        assert!(still_open.is_err(), "an allowed connection was closed");
        drop(kept);
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_registration_after_a_policy_change_is_checked_against_the_new_snapshot() {
        let mesh = MeshStore::new(snapshot(""));
        let seen = mesh.load();
        let echo = seen.workloads()[0].clone();
        mesh.replace(snapshot(DENY_SLEEP));
        let tracker = ConnectionTracker::new();
        let sleep = conn("10.0.0.1", Some("default/sleep"), "10.0.0.2", 8080);
        let denied = tracker.register(&echo, sleep, &seen, &mesh);
        assert!(matches!(denied, Err(reason) if reason.contains("default/no-sleep")));
        assert!(tracker.is_empty());
    }
}
