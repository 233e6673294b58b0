//! Pods' network namespaces: the ZDS socket from istio-cni, standalone pods from the mesh file,
//! the per-pod lifecycle and the nftables redirection. Knows nothing about policy, and nothing
//! about what the per-pod listeners do (the daemon supplies them through [`PodProxies`]).

pub mod bpf;
pub mod cni;
pub mod nft;
pub mod nft_dns;
pub mod pods;
mod routing;
pub(crate) mod seqpacket;
pub mod zds;

pub use nft::{HostRedirection, RedirectPorts};
pub use pods::{PodError, PodInfo, PodManager, PodProxies, ReconcileReport};
pub use zds::{PodEvent, PodEvents, ZdsClient, ZdsError};

/// What went wrong setting up a pod's capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "`{binary}` is not installed; it is needed to redirect pod traffic (apt-get install {package})"
    )]
    MissingTool {
        binary: &'static str,
        package: &'static str,
    },
    #[error("`{command}` in netns {netns} failed: {stderr}")]
    Command {
        command: String,
        netns: String,
        stderr: String,
    },
    #[error("running `{command}` in netns {netns}: {source}")]
    Spawn {
        command: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening netns {netns} of pod {uid}: {source}")]
    Netns {
        uid: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
}
