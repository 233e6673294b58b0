//! The eBPF backend as the pod lifecycle uses it: one loaded object per node, each pod enrolled
//! (outbound programs on its cgroup, found from its netns; sk_lookup on its netns; ztund's
//! listeners in its slots) and released, the pins of pods that are gone collected.
//!
//! A restarted ztund enrols its pods again over the pins it finds: each new link is attached
//! before the old pin is replaced (`loader::pin_link`), so capture never lapses and the old
//! links, whose pins were their last reference, detach: never two of the same.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::loader::{BpfCapture, BpfSettings, Slot};
use super::{BpfError, cgroup};
use crate::net::Netns;

/// Set while the eBPF backend runs: ztund then delivers inbound connections to the app from
/// the pod's own address, not the client's. A spoofed source (IP_TRANSPARENT) would need the
/// app's replies routed back to ztund, which the nftables backend does with a connmark and
/// which has no netfilter-free equivalent that spares ztund's own marked sockets in the pod;
/// and sk_lookup recognises ztund's delivery by its source being the destination address.
static FROM_POD: AtomicBool = AtomicBool::new(false);

/// Whether inbound deliveries go from the pod's own address (the eBPF backend runs).
pub fn delivers_from_pod() -> bool {
    FROM_POD.load(Ordering::Relaxed)
}

/// The node's eBPF capture, shared by the pod lifecycle.
pub struct PodCapture {
    capture: Mutex<BpfCapture>,
    cgroup_mount: PathBuf,
    pods_dir: PathBuf,
}

impl std::fmt::Debug for PodCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCapture")
            .field("pods_dir", &self.pods_dir)
            .finish_non_exhaustive()
    }
}

impl PodCapture {
    /// Loads and verifies the programs (pinning or reusing the maps under `pin_dir`) and makes
    /// the accept side consult their original-destination table. Any failure is the reason
    /// ztund cannot capture with eBPF: the caller refuses to start.
    pub fn start(pin_dir: &Path, settings: &BpfSettings) -> Result<Arc<PodCapture>, BpfError> {
        let cgroup_mount = cgroup::mount().map_err(|source| BpfError::Io {
            what: "finding the cgroup2 hierarchy for",
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let (capture, table) = BpfCapture::load(pin_dir, settings)?;
        super::register(Some(Arc::new(table)));
        FROM_POD.store(true, Ordering::Relaxed);
        Ok(Arc::new(PodCapture {
            pods_dir: pin_dir.join("pods"),
            capture: Mutex::new(capture),
            cgroup_mount,
        }))
    }

    /// Captures pod `uid`: its cgroup (found from `netns`) gets the outbound programs, `netns`
    /// its sk_lookup, and the slots `inbound` and `hbone` (listening in `netns`). Idempotent,
    /// and adopts the pins a previous ztund left for the pod.
    pub fn enrol(
        &self,
        uid: &str,
        netns: &Netns,
        inbound: &impl AsRawFd,
        hbone: &impl AsRawFd,
    ) -> Result<PathBuf, BpfError> {
        let dir = cgroup::of_netns(netns, uid, &self.cgroup_mount).map_err(|source| {
            BpfError::PodCgroup {
                netns: netns.describe(),
                source,
            }
        })?;
        let mut capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        let adopted = capture.pod_dir(uid).exists();
        capture.attach_outbound(uid, &dir)?;
        let cookie = capture.attach_inbound(uid, netns)?;
        capture.set_listener(cookie, Slot::Inbound, inbound)?;
        capture.set_listener(cookie, Slot::Hbone, hbone)?;
        tracing::info!(%uid, cgroup = %dir.display(), netns_cookie = cookie, adopted, "pod enrolled in eBPF capture");
        Ok(dir)
    }

    /// Stops capturing pod `uid` (its pinned links go, which detaches them). Its slots empty
    /// themselves when its listeners close.
    pub fn release(&self, uid: &str) {
        let capture = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match capture.detach(uid) {
            Ok(()) => tracing::info!(%uid, "pod released from eBPF capture"),
            Err(e) => tracing::warn!(%uid, error = %e, "removing a pod's eBPF pins"),
        }
    }

    /// The uids with pins (enrolled by this ztund or left by an earlier one).
    pub fn pinned(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.pods_dir) else {
            return Vec::new();
        };
        let mut uids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|name| super::loader::uid_of_pin(&name))
            .collect();
        uids.sort();
        uids
    }

    /// Removes the pins of every pod not in `keep`: leftovers of pods that went away while no
    /// ztund ran (or that a crashed one never released). Returns their uids.
    pub fn collect(&self, keep: &HashSet<String>) -> Vec<String> {
        let stale: Vec<String> = self
            .pinned()
            .into_iter()
            .filter(|uid| !keep.contains(uid))
            .collect();
        for uid in &stale {
            tracing::info!(%uid, "collecting the eBPF pins of a pod that is gone");
            self.release(uid);
        }
        stale
    }
}
