//! The demo playing istio-cni's node agent on each node, as Kubernetes would: it listens on the
//! node's ZDS socket before ztund starts, hands ztund the node's pods (their namespace fds) in the
//! snapshot, then installs each pod's redirection rules once ztund acknowledged it. The
//! connection stays open for the demo's life: without its CNI agent ztund is not ready.

use std::path::Path;
use std::time::Duration;

use super::DemoError;
use super::scenario::{self, PODS};
use crate::capture::cni::{CniConnection, CniServer, SnapshotPod};
use crate::capture::nft::{self, RedirectPorts};
use crate::capture::{CaptureError, PodInfo, ZdsError};
use crate::config::CaptureBackend;
use crate::topology::{Topology, TopologyError};

/// Why a node's ztund did not take its pods; the demo reports it with the daemon's log, after
/// "ztund on NODE".
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    #[error("did not connect to its ZDS socket within {}s", .0.as_secs())]
    NoConnection(Duration),
    #[error("failed the ZDS hello: {0}")]
    Hello(#[source] ZdsError),
    #[error("(pod {pod}) {source}")]
    Netns {
        pod: &'static str,
        #[source]
        source: TopologyError,
    },
    #[error("refused the ZDS snapshot: {0}")]
    Snapshot(#[source] ZdsError),
    #[error("(redirecting pod {pod}) {source}")]
    Redirect {
        pod: String,
        #[source]
        source: CaptureError,
    },
}

/// How long ztund may take to connect to its ZDS socket.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// One node's istio-cni agent: listening, then connected to that node's ztund.
pub struct CniAgent {
    pub node: usize,
    server: CniServer,
    /// Held open: ztund stays ready only while its CNI agent is connected.
    #[allow(dead_code)]
    connection: Option<CniConnection>,
}

impl CniAgent {
    /// Listens on node `n`'s ZDS socket (before its ztund starts, as istio-cni does).
    pub fn listen(n: usize, dir: &Path) -> Result<CniAgent, DemoError> {
        let path = scenario::zds_socket(n, dir);
        let server = CniServer::bind(&path).map_err(|e| {
            DemoError::Setup(format!("listening on {} as istio-cni: {e}", path.display()))
        })?;
        Ok(CniAgent {
            node: n,
            server,
            connection: None,
        })
    }

    /// Accepts the node's ztund, sends it the snapshot of the node's pods and then, for the
    /// nftables backend, redirects each pod's traffic to it (the eBPF backend's ztund captures
    /// the pods itself). `Err(reason)` for the caller to report with the daemon's log.
    pub async fn hand_over_pods(
        &mut self,
        topology: &Topology,
        backend: CaptureBackend,
    ) -> Result<(), HandOverError> {
        let connection = tokio::time::timeout(CONNECT_DEADLINE, self.server.accept())
            .await
            .map_err(|_| HandOverError::NoConnection(CONNECT_DEADLINE))?
            .map_err(HandOverError::Hello)?;
        let pods: Vec<_> = PODS.iter().filter(|p| p.node == self.node).collect();
        let mut handed = Vec::new();
        for pod in &pods {
            let netns = topology
                .netns(pod.place())
                .map_err(|source| HandOverError::Netns {
                    pod: pod.name,
                    source,
                })?;
            let info = PodInfo {
                uid: scenario::pod_uid(pod),
                name: pod.name.into(),
                namespace: "default".into(),
                service_account: pod.name.into(),
            };
            handed.push((info, netns));
        }
        let snapshot: Vec<SnapshotPod> = handed
            .iter()
            .map(|(info, netns)| SnapshotPod::Add(info, netns))
            .collect();
        connection
            .send_snapshot(&snapshot)
            .await
            .map_err(HandOverError::Snapshot)?;
        // istio-cni redirects a pod's traffic once ztund has acknowledged the pod.
        let ports = RedirectPorts::default();
        let redirected = match backend {
            CaptureBackend::Nftables => &handed[..],
            CaptureBackend::Ebpf => &[],
        };
        for (info, netns) in redirected {
            nft::install_pod_redirection(netns, &ports).map_err(|source| {
                HandOverError::Redirect {
                    pod: info.name.clone(),
                    source,
                }
            })?;
        }
        self.connection = Some(connection);
        Ok(())
    }
}
