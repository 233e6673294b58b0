//! The registry of open inbound connections (HBONE streams and plaintext) with what they were
//! authorized on, and the re-check that closes the ones a new snapshot denies (PROTOCOL.md §4.2,
//! "Re-evaluation"). A connection holds a [`TrackedConnection`] while it copies and stops copying
//! when it is told to close; dropping the guard unregisters it. Knows nothing about sockets.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::sync::watch;
use tracing::info;

use super::copy::Transferred;
use crate::admin::Metrics;
use crate::mesh::{MeshStore, Snapshot, Workload};
use crate::policy::{self, ConnectionFacts, Decision};

/// A connection the policy denies, with the reason (which policy) for the log and the denial
/// metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Every open inbound connection of the daemon.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Registration>>>,
}

/// What one open connection was authorized on, shared by the tracker and the connection: one
/// small allocation per connection (it lives as long as the connection).
#[derive(Debug)]
struct Registration {
    workload: Arc<Workload>,
    facts: ConnectionFacts,
    /// The client's socket, for the log line of a policy close.
    client: SocketAddr,
    /// Set once, to the denial reason, to close the connection.
    close: OnceLock<String>,
    /// The connection's task, woken after `close` is set. Not a `Notify`: its waiting future
    /// (~100 bytes) would sit on every connection's task for the connection's whole life, and
    /// polling it takes a mutex; `close` keeps the decision for a task not waiting yet.
    wake: AtomicWaker,
}

/// One connection closed by a re-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub workload_uid: String,
    pub workload_name: String,
    pub facts: ConnectionFacts,
    /// The client's address and port (its node's word for it, on HBONE).
    pub client: SocketAddr,
    /// The denial, naming the policy.
    pub reason: String,
}

/// A registered connection; unregisters itself when dropped.
#[derive(Debug)]
pub struct TrackedConnection {
    id: u64,
    tracker: Weak<ConnectionTracker>,
    registration: Arc<Registration>,
}

impl TrackedConnection {
    /// What the connection was authorized on.
    pub fn facts(&self) -> &ConnectionFacts {
        &self.registration.facts
    }

    /// The workload the connection reaches.
    pub fn workload(&self) -> &Arc<Workload> {
        &self.registration.workload
    }

    /// The client's socket, as registered.
    pub fn client(&self) -> SocketAddr {
        self.registration.client
    }

    /// Resolves with the denial once the connection must close; never while it may stay (nor
    /// once the tracker is gone: the daemon is stopping and nothing will close it). One task
    /// at a time may wait.
    pub async fn closed(&self) -> String {
        poll_fn(|cx| self.poll_closed(cx)).await
    }

    fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<String> {
        if let Some(reason) = self.registration.close.get() {
            return Poll::Ready(reason.clone());
        }
        self.registration.wake.register(cx.waker());
        // Checked again: a close between the first check and the register woke no one.
        match self.registration.close.get() {
            Some(reason) => Poll::Ready(reason.clone()),
            None => Poll::Pending,
        }
    }

    /// Runs `copy` until it ends or policy closes the connection. Dropping the copy drops both
    /// sockets, so after a policy close the app gets no further byte. `copy` stays where it is
    /// (polled in place, not moved into a second slot): this future lives as long as the
    /// connection, and holds nothing but `copy` and `self`.
    pub fn guard<'a, C>(
        &'a self,
        mut copy: C,
    ) -> impl Future<Output = std::io::Result<Transferred>> + Send + 'a
    where
        C: Future<Output = std::io::Result<Transferred>> + Unpin + Send + 'a,
    {
        poll_fn(move |cx| {
            if let Poll::Ready(result) = Pin::new(&mut copy).poll(cx) {
                return Poll::Ready(result);
            }
            self.poll_closed(cx)
                .map(|reason| Err(std::io::Error::other(format!("closed by policy: {reason}"))))
        })
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

    /// Authorizes a new connection against `seen` and, if allowed, registers it for re-checks
    /// (see [`ConnectionTracker::register`]); a denial is counted in `metrics` and returned.
    pub fn admit(
        self: &Arc<Self>,
        workload: &Arc<Workload>,
        facts: ConnectionFacts,
        client: SocketAddr,
        seen: &Snapshot,
        mesh: &MeshStore,
        metrics: &Metrics,
    ) -> Result<TrackedConnection, Denied> {
        let admitted = match policy::authorize(&seen.policies, workload, &facts) {
            Decision::Allow => self.register(workload, facts, client, seen, mesh),
            Decision::Deny(reason) => Err(Denied(reason)),
        };
        if let Err(Denied(reason)) = &admitted {
            metrics.policy_denial(reason);
        }
        admitted
    }

    /// Registers a connection from `client` to `workload` that `seen` authorized. If the mesh
    /// moved on since
    /// `seen` (a re-check may have run before this registration), it is authorized again against
    /// the current snapshot; `Err` carries the denial and nothing stays registered.
    pub fn register(
        self: &Arc<Self>,
        workload: &Arc<Workload>,
        facts: ConnectionFacts,
        client: SocketAddr,
        seen: &Snapshot,
        mesh: &MeshStore,
    ) -> Result<TrackedConnection, Denied> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registration = Arc::new(Registration {
            workload: workload.clone(),
            facts,
            client,
            close: OnceLock::new(),
            wake: AtomicWaker::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, registration.clone());
        }
        let tracked = TrackedConnection {
            id,
            tracker: Arc::downgrade(self),
            registration,
        };
        let now = mesh.load();
        if now.generation != seen.generation
            && let Some(current) = now.workload_by_uid(&workload.uid)
            && let Decision::Deny(reason) =
                policy::authorize(&now.policies, current, tracked.facts())
        {
            return Err(Denied(reason));
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
            let Some(workload) = snapshot.workload_by_uid(&entry.workload.uid) else {
                return true;
            };
            match policy::authorize(&snapshot.policies, workload, &entry.facts) {
                Decision::Allow => true,
                Decision::Deny(reason) => {
                    let _ = entry.close.set(reason.clone());
                    entry.wake.wake();
                    closed.push(Closed {
                        workload_uid: entry.workload.uid.clone(),
                        workload_name: entry.workload.name.clone(),
                        facts: entry.facts.clone(),
                        client: entry.client,
                        reason,
                    });
                    false
                }
            }
        });
        closed
    }
}

/// Re-checks the open connections at start (a restarted copy catches up on a change made while
/// none ran) and on every snapshot change until `drain` turns true.
pub async fn watch_policies(
    tracker: Arc<ConnectionTracker>,
    mesh: Arc<MeshStore>,
    metrics: Arc<Metrics>,
    mut drain: watch::Receiver<bool>,
) {
    let mut changes = mesh.subscribe();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = drain.wait_for(|d| *d) => return,
            }
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
                src.addr = %closed.client,
                src.identity = %identity,
                dst.addr = %SocketAddr::new(closed.facts.destination_ip, closed.facts.destination_port),
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

    fn client() -> SocketAddr {
        "10.0.0.1:40000".parse().unwrap()
    }

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
        let denied = tracker
            .register(&echo, sleep, client(), &seen, &mesh)
            .unwrap();
        let kept = tracker
            .register(&echo, other, client(), &seen, &mesh)
            .unwrap();
        assert_eq!(tracker.len(), 2);

        assert!(tracker.recheck(&seen).is_empty(), "nothing changed");
        mesh.replace(snapshot(DENY_SLEEP));
        let closed = tracker.recheck(&mesh.load());
        assert_eq!(closed.len(), 1);
        assert!(closed[0].reason.contains("default/no-sleep"), "{closed:?}");
        assert_eq!(
            closed[0].client,
            client(),
            "the close names the client's port"
        );
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
        let denied = tracker.register(&echo, sleep, client(), &seen, &mesh);
        assert!(matches!(denied, Err(Denied(reason)) if reason.contains("default/no-sleep")));
        assert!(tracker.is_empty());
    }
}
