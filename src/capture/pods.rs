//! The pod lifecycle, one code path for both sources: pods handed over by istio-cni (ZDS events)
//! and standalone pods from the mesh file (reconciled against the wanted set, with ztund
//! installing their redirection). Tracks which pod runs in which namespace and asks the daemon's
//! [`PodProxies`] to start and stop the per-pod listeners; knows nothing about what they do.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::CaptureError;
use super::nft::{self, RedirectPorts};
use super::zds::{PodEvent, PodEvents};
use crate::net::{Netns, NetnsId};

/// Why a pod could not be placed: its namespace, its listeners or its redirection. The pod stays
/// tracked and is retried; over ZDS the text becomes the Ack's error.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The namespace a standalone pod names could not be opened (the error names the path).
    #[error(transparent)]
    Netns(std::io::Error),
    /// A listener of the pod's proxy could not be bound inside its namespace.
    #[error("binding port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    /// ztund's redirection rules could not be installed (standalone pods).
    #[error(transparent)]
    Redirect(#[from] CaptureError),
    /// The blocking task that installs the redirection died before it answered.
    #[error("{0}")]
    RedirectTask(#[from] tokio::task::JoinError),
    /// The eBPF backend could not capture the pod (its cgroup not found, an attach refused);
    /// the pod is not served.
    #[error("eBPF capture of pod {uid}: {source}")]
    Bpf {
        uid: String,
        #[source]
        source: super::bpf::BpfError,
    },
}

/// What ZDS (or the mesh file) tells about a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodInfo {
    /// Kubernetes pod UID (standalone: the workload uid).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// The daemon's per-pod listeners (15001/15006/15008 bound inside the pod's namespace).
pub trait PodProxies: Send + Sync {
    /// Starts the pod's listeners in `netns`; `Err` says why (for example a bind error).
    fn start(&self, pod: PodInfo, netns: Arc<Netns>) -> BoxFuture<'_, Result<(), PodError>>;
    /// Stops the pod's listeners and drains its connections.
    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()>;
    /// The complete set of pods is known (a ZDS snapshot arrived, the mesh file was
    /// reconciled): state kept for pods outside `pods` (an earlier ztund's) can go.
    fn settled(&self, _pods: &HashSet<String>) {}
}

/// Where a pod came from; each source only removes its own pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSource {
    Zds,
    /// From the mesh file, with the netns name or path it gave.
    Standalone {
        netns: String,
    },
}

/// One tracked pod, for status output and tests.
#[derive(Debug, Clone)]
pub struct PodStatus {
    pub info: PodInfo,
    pub netns: NetnsId,
    pub source: PodSource,
    /// False while its proxy failed to start (retried by [`PodManager::retry_pending`]).
    pub running: bool,
}

/// What one standalone reconcile did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    /// (uid, reason) of pods that could not be started; they are retried.
    pub failed: Vec<(String, PodError)>,
}

struct Tracked {
    info: PodInfo,
    netns: Arc<Netns>,
    source: PodSource,
    running: bool,
}

#[derive(Default)]
struct State {
    pods: HashMap<String, Tracked>,
    /// uids named (Add or Keep) in the current ZDS snapshot; `None` once it is complete.
    snapshot: Option<HashSet<String>>,
    zds_connected: bool,
    snapshot_received: bool,
}

/// Tracks uid → (namespace, info) and starts/stops the pods' proxies.
pub struct PodManager {
    proxies: Arc<dyn PodProxies>,
    /// Standalone pods get ztund's redirection with these ports; `None` leaves rules alone.
    redirect: Option<RedirectPorts>,
    state: Mutex<State>,
}

impl PodManager {
    /// A manager that leaves traffic redirection to someone else (istio-cni).
    pub fn new(proxies: Arc<dyn PodProxies>) -> PodManager {
        PodManager {
            proxies,
            redirect: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Standalone pods get ztund's nftables redirection to `ports`.
    pub fn with_redirection(mut self, ports: RedirectPorts) -> PodManager {
        self.redirect = Some(ports);
        self
    }

    /// Every tracked pod.
    pub async fn pods(&self) -> Vec<PodStatus> {
        let state = self.state.lock().await;
        let mut pods: Vec<PodStatus> = state
            .pods
            .values()
            .map(|t| PodStatus {
                info: t.info.clone(),
                netns: t.netns.id(),
                source: t.source.clone(),
                running: t.running,
            })
            .collect();
        pods.sort_by(|a, b| a.info.uid.cmp(&b.info.uid));
        pods
    }

    /// Ready when the ZDS snapshot (if ZDS is used) arrived and no pod waits for a retry.
    pub async fn is_ready(&self, uses_zds: bool) -> bool {
        let state = self.state.lock().await;
        let zds_ok = !uses_zds || (state.zds_connected && state.snapshot_received);
        zds_ok && state.pods.values().all(|t| t.running)
    }

    /// Brings standalone pods in line with `wanted` (pod, netns name or path): starts new ones
    /// and installs their redirection, moves pods whose namespace changed, stops gone ones.
    pub async fn reconcile_standalone(&self, wanted: Vec<(PodInfo, String)>) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let mut state = self.state.lock().await;
        let wanted_uids: HashSet<&str> = wanted.iter().map(|(p, _)| p.uid.as_str()).collect();
        let gone: Vec<String> = state
            .pods
            .iter()
            .filter(|(uid, t)| {
                matches!(t.source, PodSource::Standalone { .. })
                    && !wanted_uids.contains(uid.as_str())
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(tracked) = state.pods.remove(&uid) {
                self.retire(&tracked).await;
                report.stopped.push(uid);
            }
        }
        for (info, path) in wanted {
            let uid = info.uid.clone();
            let netns = match Netns::open(&path) {
                Ok(netns) => Arc::new(netns),
                Err(e) => {
                    report.failed.push((uid, PodError::Netns(e)));
                    continue;
                }
            };
            let source = PodSource::Standalone { netns: path };
            match self.place(&mut state, info, netns, source).await {
                Ok(true) => report.started.push(uid),
                Ok(false) => {}
                Err(e) => report.failed.push((uid, e)),
            }
        }
        self.proxies.settled(&state.pods.keys().cloned().collect());
        report
    }

    /// Retries pods whose proxy failed to start. Returns the uids still failing.
    pub async fn retry_pending(&self) -> Vec<(String, PodError)> {
        let mut state = self.state.lock().await;
        let pending: Vec<String> = state
            .pods
            .iter()
            .filter(|(_, t)| !t.running)
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut failing = Vec::new();
        for uid in pending {
            let Some(tracked) = state.pods.get(&uid) else {
                continue;
            };
            let (info, netns, source) = (
                tracked.info.clone(),
                tracked.netns.clone(),
                tracked.source.clone(),
            );
            match self.launch(&info, &netns, &source).await {
                Ok(()) => {
                    if let Some(t) = state.pods.get_mut(&uid) {
                        t.running = true;
                    }
                }
                Err(e) => failing.push((uid, e)),
            }
        }
        failing
    }

    /// Calls [`PodManager::retry_pending`] every `every` (ztunnel uses 5 s), forever.
    pub async fn run_retries(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            for (uid, error) in self.retry_pending().await {
                tracing::warn!(%uid, %error, "pod proxy still failing to start");
            }
        }
    }

    /// Puts a pod in `netns`: idempotent for the same namespace, replaces the proxy for a new
    /// one. `Ok(true)` when a proxy was started.
    async fn place(
        &self,
        state: &mut State,
        info: PodInfo,
        netns: Arc<Netns>,
        source: PodSource,
    ) -> Result<bool, PodError> {
        if let Some(tracked) = state.pods.get(&info.uid) {
            if tracked.netns.id() == netns.id() && tracked.running {
                return Ok(false);
            }
            if let Some(old) = state.pods.remove(&info.uid) {
                self.retire(&old).await;
            }
        }
        let result = self.launch(&info, &netns, &source).await;
        let running = result.is_ok();
        let uid = info.uid.clone();
        state.pods.insert(
            uid,
            Tracked {
                info,
                netns,
                source,
                running,
            },
        );
        result.map(|()| true)
    }

    /// Starts the proxy, then (standalone) redirects traffic to it: never a window where
    /// traffic is redirected to listeners that do not exist yet.
    async fn launch(
        &self,
        info: &PodInfo,
        netns: &Arc<Netns>,
        source: &PodSource,
    ) -> Result<(), PodError> {
        self.proxies.start(info.clone(), netns.clone()).await?;
        if let (PodSource::Standalone { .. }, Some(ports)) = (source, self.redirect) {
            let ns = netns.clone();
            let installed =
                tokio::task::spawn_blocking(move || nft::install_pod_redirection(&ns, &ports))
                    .await
                    .map_err(PodError::from)
                    .and_then(|r| r.map_err(PodError::from));
            if let Err(e) = installed {
                self.proxies.stop(&info.uid).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes the redirection (standalone) first, then stops the proxy.
    async fn retire(&self, tracked: &Tracked) {
        if let (PodSource::Standalone { netns: path }, Some(_)) = (&tracked.source, self.redirect) {
            let ns = tracked.netns.clone();
            let removed = tokio::task::spawn_blocking(move || nft::remove_redirection(&ns)).await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(uid = %tracked.info.uid, netns = %path, error = %e, "removing redirection")
                }
                Err(e) => {
                    tracing::warn!(uid = %tracked.info.uid, error = %e, "removing redirection")
                }
            }
        }
        if tracked.running {
            self.proxies.stop(&tracked.info.uid).await;
        }
    }

    async fn on_event(&self, event: PodEvent) -> Result<(), PodError> {
        let mut state = self.state.lock().await;
        match event {
            PodEvent::Add { pod, netns } => {
                if let Some(seen) = state.snapshot.as_mut() {
                    seen.insert(pod.uid.clone());
                }
                self.place(&mut state, pod, Arc::new(netns), PodSource::Zds)
                    .await
                    .map(drop)
            }
            PodEvent::Keep { uid } => {
                if let Some(seen) = state.snapshot.as_mut() {
                    seen.insert(uid);
                }
                Ok(())
            }
            PodEvent::Del { uid } => {
                if let Some(tracked) = state.pods.remove(&uid) {
                    self.retire(&tracked).await;
                } else {
                    tracing::debug!(%uid, "ZDS Del for a pod that is not running");
                }
                Ok(())
            }
            PodEvent::SnapshotSent => {
                let seen = state.snapshot.take().unwrap_or_default();
                let stale: Vec<String> = state
                    .pods
                    .iter()
                    .filter(|(uid, t)| t.source == PodSource::Zds && !seen.contains(*uid))
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in stale {
                    if let Some(tracked) = state.pods.remove(&uid) {
                        tracing::info!(%uid, "pod not in the ZDS snapshot: stopping its proxy");
                        self.retire(&tracked).await;
                    }
                }
                state.snapshot_received = true;
                self.proxies.settled(&state.pods.keys().cloned().collect());
                Ok(())
            }
        }
    }
}

impl PodEvents for PodManager {
    fn session_started(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            let mut state = self.state.lock().await;
            state.snapshot = Some(HashSet::new());
            state.zds_connected = true;
            state.snapshot_received = false;
        })
    }

    fn handle(&self, event: PodEvent) -> BoxFuture<'_, Result<(), PodError>> {
        Box::pin(self.on_event(event))
    }

    fn session_ended(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            let mut state = self.state.lock().await;
            state.zds_connected = false;
            state.snapshot = None;
        })
    }
}
