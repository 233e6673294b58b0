//! The ztund side of ZDS (PROTOCOL.md §5): connect to istio-cni's SEQPACKET socket, say hello,
//! then turn each request into a [`PodEvent`] for a [`PodEvents`] consumer and answer with its
//! Ack. Validates every message; a violation is answered with an error Ack (and, for the
//! snapshot-order violations, a reconnect), never a panic. Knows nothing about what a pod's
//! proxy does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message;

use super::pods::{PodError, PodInfo};
use super::seqpacket::{MAX_PACKET, Packet, SeqPacket};
use crate::net::Netns;

/// The generated ZDS messages (package `istio.workload.zds`).
pub use crate::proto::istio::workload::zds as proto;

use proto::workload_request::Payload as Request;

const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// What went wrong on the ZDS socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("connecting to the ZDS socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ZDS socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ZDS peer closed the connection")]
    Closed,
    #[error("ZDS message or its file descriptors did not fit in {MAX_PACKET} bytes")]
    Truncated,
    #[error("undecodable ZDS {message}: {source}")]
    Decode {
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("ZDS hello has version {0}; only V1 is supported")]
    Version(i32),
    #[error("WorkloadRequest without a payload")]
    EmptyRequest,
    #[error("WorkloadResponse without an Ack")]
    EmptyResponse,
    #[error(
        "Add for pod {uid:?} carries {count} file descriptors; exactly one netns fd is required"
    )]
    AddFds { uid: String, count: usize },
    #[error("Add for pod {uid:?} has no workload_info")]
    MissingWorkloadInfo { uid: String },
    #[error("{kind} has an empty uid")]
    EmptyUid { kind: &'static str },
    #[error("{kind} carries {count} file descriptor(s); only Add may carry one")]
    UnexpectedFds { kind: &'static str, count: usize },
    #[error("Keep for pod {uid:?} after the snapshot was complete")]
    KeepAfterSnapshot { uid: String },
    #[error("a second SnapshotSent")]
    DuplicateSnapshotSent,
    // istio-cni sends the whole snapshot before any change, so a Del inside it means the two
    // sides disagree on the session's state; ztunnel refuses it the same way.
    #[error("Del for pod {uid:?} before the snapshot was complete")]
    DelBeforeSnapshot { uid: String },
    #[error("netns fd of pod {uid:?}: {source}")]
    Netns {
        uid: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Add for pod {uid:?} carries an fd that is not a network namespace")]
    NotNetns { uid: String },
    #[error("Add for pod {uid:?} carries ztund's own network namespace")]
    OwnNetns { uid: String },
    #[error("ZDS peer runs as uid {uid}; only root or ztund's own uid may hand over pods")]
    UntrustedPeer { uid: u32 },
    #[error(
        "ZDS socket directory {dir} is writable by anyone (mode {mode:o}): another user could stand in for istio-cni"
    )]
    UnsafeDirectory { dir: String, mode: u32 },
    #[error("ztund refused {request}: {error}")]
    Refused { request: String, error: String },
}

impl ZdsError {
    /// Violations that leave the two sides disagreeing about the snapshot: the session ends.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            ZdsError::KeepAfterSnapshot { .. }
                | ZdsError::DuplicateSnapshotSent
                | ZdsError::DelBeforeSnapshot { .. }
        )
    }
}

/// One validated request from the CNI.
#[derive(Debug)]
pub enum PodEvent {
    /// Serve this pod in this namespace.
    Add { pod: PodInfo, netns: Netns },
    /// Snapshot only: the pod exists but its netns could not be opened; keep what runs.
    Keep { uid: String },
    /// The pod is gone.
    Del { uid: String },
    /// Every pod that exists was named: drop the others.
    SnapshotSent,
}

/// Whoever acts on pod events (the pod lifecycle).
pub trait PodEvents: Send + Sync {
    /// A new connection said hello; a fresh snapshot follows.
    fn session_started(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Handles one event; `Err` becomes the Ack's error text.
    fn handle(&self, event: PodEvent) -> BoxFuture<'_, Result<(), PodError>>;
    /// The connection ended (readiness drops until the next snapshot).
    fn session_ended(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Checks one received packet against the protocol rules and turns it into an event.
/// `snapshot_done` says whether this session already saw SnapshotSent.
pub fn validate(packet: Packet, snapshot_done: bool) -> Result<PodEvent, ZdsError> {
    if packet.truncated {
        return Err(ZdsError::Truncated);
    }
    let request = proto::WorkloadRequest::decode(packet.bytes.as_slice()).map_err(|source| {
        ZdsError::Decode {
            message: "WorkloadRequest",
            source,
        }
    })?;
    let mut fds = packet.fds;
    let no_fds = |kind: &'static str, count: usize| match count {
        0 => Ok(()),
        count => Err(ZdsError::UnexpectedFds { kind, count }),
    };
    let non_empty = |kind: &'static str, uid: String| match uid.is_empty() {
        true => Err(ZdsError::EmptyUid { kind }),
        false => Ok(uid),
    };
    match request.payload {
        None => {
            no_fds("WorkloadRequest", fds.len())?;
            Err(ZdsError::EmptyRequest)
        }
        Some(Request::Add(add)) => {
            let uid = non_empty("Add", add.uid)?;
            if fds.len() != 1 {
                return Err(ZdsError::AddFds {
                    uid,
                    count: fds.len(),
                });
            }
            let Some(info) = add.workload_info else {
                return Err(ZdsError::MissingWorkloadInfo { uid });
            };
            let fd = fds.remove(0);
            let netns = Netns::from_fd(fd).map_err(|source| ZdsError::Netns {
                uid: uid.clone(),
                source,
            })?;
            // The kernel would refuse setns into anything else, but only later and less
            // clearly; ztund's own namespace would put a pod's listeners on the node itself.
            if !netns.is_network_namespace() {
                return Err(ZdsError::NotNetns { uid });
            }
            if own_netns() == Some(netns.id()) {
                return Err(ZdsError::OwnNetns { uid });
            }
            let pod = PodInfo {
                uid,
                name: info.name,
                namespace: info.namespace,
                service_account: info.service_account,
            };
            Ok(PodEvent::Add { pod, netns })
        }
        Some(Request::Keep(keep)) => {
            no_fds("Keep", fds.len())?;
            let uid = non_empty("Keep", keep.uid)?;
            if snapshot_done {
                return Err(ZdsError::KeepAfterSnapshot { uid });
            }
            Ok(PodEvent::Keep { uid })
        }
        Some(Request::Del(del)) => {
            no_fds("Del", fds.len())?;
            let uid = non_empty("Del", del.uid)?;
            if !snapshot_done {
                return Err(ZdsError::DelBeforeSnapshot { uid });
            }
            Ok(PodEvent::Del { uid })
        }
        Some(Request::SnapshotSent(_)) => {
            no_fds("SnapshotSent", fds.len())?;
            if snapshot_done {
                return Err(ZdsError::DuplicateSnapshotSent);
            }
            Ok(PodEvent::SnapshotSent)
        }
    }
}

/// The namespace ztund itself runs in (the process's, not a thread's that may be inside a pod).
fn own_netns() -> Option<crate::net::NetnsId> {
    static OWN: std::sync::OnceLock<Option<crate::net::NetnsId>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| Netns::open("/proc/self/ns/net").ok().map(|ns| ns.id()))
}

/// Only istio-cni may hand over pods (ISTIO-SECURITY-2023-005): the peer runs as root or as
/// ztund's own user, and the socket's directory is not writable by everyone (or anyone could
/// bind the path first and stand in for it).
fn check_peer(socket: &SeqPacket, path: &Path) -> Result<(), ZdsError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(meta) = std::fs::metadata(dir)
    {
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(ZdsError::UnsafeDirectory {
                dir: dir.display().to_string(),
                mode,
            });
        }
    }
    let uid = socket.peer_uid().map_err(|source| ZdsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if uid != 0 && uid != own {
        return Err(ZdsError::UntrustedPeer { uid });
    }
    Ok(())
}

/// Encodes the answer to one request: an error's text, or an empty one for success.
pub fn ack<E: std::fmt::Display>(result: &Result<(), E>) -> Vec<u8> {
    let error = match result {
        Ok(()) => String::new(),
        Err(e) => e.to_string(),
    };
    proto::WorkloadResponse {
        payload: Some(proto::workload_response::Payload::Ack(proto::Ack { error })),
    }
    .encode_to_vec()
}

/// The ztund side: keeps a session with the CNI agent open, reconnecting with backoff.
pub struct ZdsClient {
    path: PathBuf,
    events: Arc<dyn PodEvents>,
}

impl ZdsClient {
    /// A client for the socket at `path` (config `zdsSocket`) feeding `events`.
    pub fn new(path: impl Into<PathBuf>, events: Arc<dyn PodEvents>) -> ZdsClient {
        ZdsClient {
            path: path.into(),
            events,
        }
    }

    /// Runs sessions forever: 10 ms backoff doubling to 15 s between failed connects, reset
    /// after a session that got going. Cancel by dropping the future.
    pub async fn run(&self) {
        let mut backoff = BACKOFF_START;
        loop {
            match self.session().await {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(), "ZDS session closed by the CNI agent");
                    backoff = BACKOFF_START;
                }
                Err(e @ ZdsError::Connect { .. }) => {
                    tracing::debug!(error = %e, ?backoff, "ZDS connect failed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ZDS session ended");
                    backoff = BACKOFF_START;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: hello, then requests until the peer closes (`Ok`) or a fatal error.
    pub async fn session(&self) -> Result<(), ZdsError> {
        let socket = SeqPacket::connect(&self.path).map_err(|source| ZdsError::Connect {
            path: self.path.display().to_string(),
            source,
        })?;
        check_peer(&socket, &self.path)?;
        let hello = proto::ZdsHello {
            version: proto::Version::V1 as i32,
        };
        self.send(&socket, &hello.encode_to_vec()).await?;
        self.events.session_started().await;
        let outcome = self.serve(&socket).await;
        self.events.session_ended().await;
        outcome
    }

    async fn serve(&self, socket: &SeqPacket) -> Result<(), ZdsError> {
        let mut snapshot_done = false;
        loop {
            let packet = match socket.recv().await.map_err(|e| self.io(e))? {
                Some(packet) => packet,
                None => return Ok(()),
            };
            let event = match validate(packet, snapshot_done) {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "refusing ZDS request");
                    self.send(socket, &ack(&Err(&e))).await?;
                    if e.ends_session() {
                        return Err(e);
                    }
                    continue;
                }
            };
            if matches!(event, PodEvent::SnapshotSent) {
                snapshot_done = true;
            }
            let result = self.events.handle(event).await;
            if let Err(error) = &result {
                tracing::warn!(%error, "ZDS request failed");
            }
            self.send(socket, &ack(&result)).await?;
        }
    }

    async fn send(&self, socket: &SeqPacket, bytes: &[u8]) -> Result<(), ZdsError> {
        socket.send(bytes, &[]).await.map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> ZdsError {
        ZdsError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The socket path this client connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[path = "zds_tests.rs"]
mod tests;
