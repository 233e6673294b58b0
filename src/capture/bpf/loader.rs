//! Loading `bpf/ztund.bpf.o` once per node and enrolling pods: the outbound programs on a pod's
//! cgroup, `sk_lookup` on its netns, each link pinned under `<pin dir>/pods/<uid>/` so capture
//! stays in place (failing closed) while ztund is away, and ztund's listeners in the SOCKHASH.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};

use super::origdst::{OrigDstTable, SlotKey};
use super::{BpfError, OBJECT};
use crate::net::Netns;

/// The cgroup programs, in attach order, with the pin name of each link.
const CGROUP_SOCK_ADDR: [(&str, &str); 4] = [
    ("ztund_connect4", "connect4"),
    ("ztund_connect6", "connect6"),
    ("ztund_getpeername4", "getpeername4"),
    ("ztund_getpeername6", "getpeername6"),
];
const SOCKOPS: (&str, &str) = ("ztund_sockops", "sockops");
const SK_LOOKUP: (&str, &str) = ("ztund_sk_lookup", "sk_lookup");

/// What the programs are told at load time (their `volatile const` globals).
#[derive(Debug, Clone, Copy)]
pub struct BpfSettings {
    /// Where outbound connections are sent (127.0.0.1 / ::1 in the pod's netns).
    pub outbound_port: u16,
    /// Inbound connections to this port go to the HBONE slot, every other one to plaintext.
    pub hbone_port: u16,
    /// Sockets with this mark (under `mark_mask`) are never captured.
    pub mark: u32,
    pub mark_mask: u32,
}

impl Default for BpfSettings {
    fn default() -> Self {
        BpfSettings {
            outbound_port: 15001,
            hbone_port: 15008,
            mark: crate::net::ZTUND_MARK,
            mark_mask: 0xfff,
        }
    }
}

/// Which of a pod's listeners an inbound connection is steered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Slot {
    /// Plaintext inbound (15006).
    Inbound = 0,
    /// HBONE (15008).
    Hbone = 1,
}

/// The loaded object: its programs (verified at load, so a verifier refusal stops ztund at
/// start) and its maps, pinned by name under `<pin dir>/maps` and reused by the next ztund.
pub struct BpfCapture {
    ebpf: Ebpf,
    object: &'static [u8],
    settings: BpfSettings,
    pin_dir: PathBuf,
    listeners: aya::maps::SockHash<aya::maps::MapData, SlotKey>,
}

impl std::fmt::Debug for BpfCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfCapture")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl BpfCapture {
    /// Loads and verifies every program; `pin_dir` must be on a bpffs (`/sys/fs/bpf/ztund/v1`
    /// in a node). Returns the original-destination table for the accept side.
    pub fn load(
        pin_dir: &Path,
        settings: &BpfSettings,
    ) -> Result<(BpfCapture, OrigDstTable), BpfError> {
        let object = OBJECT.ok_or(BpfError::Unavailable)?;
        check_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        create_dir(&maps_dir)?;
        let mut ebpf = open_object(object, &maps_dir, settings, 0)?;
        for (name, _) in CGROUP_SOCK_ADDR {
            sock_addr(&mut ebpf, name)?
                .load()
                .map_err(|e| BpfError::program(name, e))?;
        }
        let (name, _) = SOCKOPS;
        program::<SockOps>(&mut ebpf, name)?
            .load()
            .map_err(|e| BpfError::program(name, e))?;
        // Each pod gets its own sk_lookup instance (attach_inbound); this one is only verified,
        // so a program the kernel refuses stops ztund at start, not at its first pod.
        let (name, _) = SK_LOOKUP;
        program::<SkLookup>(&mut ebpf, name)?
            .load()
            .map_err(|e| BpfError::program(name, e))?;
        let table = OrigDstTable::take(&mut ebpf)?;
        let listeners = take_map(&mut ebpf, "listeners")?;
        let listeners =
            aya::maps::SockHash::try_from(listeners).map_err(|e| BpfError::map("listeners", e))?;
        let capture = BpfCapture {
            ebpf,
            object,
            settings: *settings,
            pin_dir: pin_dir.to_path_buf(),
            listeners,
        };
        Ok((capture, table))
    }

    /// Where a pod's links are pinned: one directory per pod, its uid made one path component.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.pin_dir.join("pods").join(pin_name(uid))
    }

    /// Captures the outbound connections of every process in `cgroup` (a cgroup2 directory,
    /// never a hierarchy's root): connect4/6, sockops, getpeername4/6, each link pinned.
    pub fn attach_outbound(&mut self, uid: &str, cgroup: &Path) -> Result<(), BpfError> {
        if super::cgroup::is_root(cgroup).map_err(|source| BpfError::Io {
            what: "reading the cgroup2 mounts for",
            path: cgroup.to_path_buf(),
            source,
        })? {
            return Err(BpfError::RootCgroup {
                path: cgroup.to_path_buf(),
            });
        }
        let dir = File::open(cgroup).map_err(|source| BpfError::Io {
            what: "opening cgroup",
            path: cgroup.to_path_buf(),
            source,
        })?;
        let pod_dir = self.pod_dir(uid);
        create_dir(&pod_dir)?;
        for (name, pin) in CGROUP_SOCK_ADDR {
            let program = sock_addr(&mut self.ebpf, name)?;
            let id = program
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| BpfError::program(name, e))?;
            let link = program
                .take_link(id)
                .map_err(|e| BpfError::program(name, e))?;
            let link = FdLink::try_from(link).map_err(|e| BpfError::link(name, e))?;
            pin_link(link, &pod_dir.join(pin))?;
        }
        let (name, pin) = SOCKOPS;
        let program = program::<SockOps>(&mut self.ebpf, name)?;
        let id = program
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| BpfError::program(name, e))?;
        let link = program
            .take_link(id)
            .map_err(|e| BpfError::program(name, e))?;
        let link = FdLink::try_from(link).map_err(|e| BpfError::link(name, e))?;
        pin_link(link, &pod_dir.join(pin))
    }

    /// Steers the inbound TCP connections of `netns` to the pod's listeners ([`Self::set_listener`]);
    /// until a slot is filled, connections to it are dropped. Returns the netns cookie that keys
    /// the pod's slots.
    pub fn attach_inbound(&mut self, uid: &str, netns: &Netns) -> Result<u64, BpfError> {
        let pod_dir = self.pod_dir(uid);
        create_dir(&pod_dir)?;
        let cookie = netns_cookie_of(netns)?;
        // The pod's own instance, with its netns cookie as a constant; the maps are the pinned
        // ones. Dropped once its link is pinned: the link keeps the program.
        let mut instance = open_object(
            self.object,
            &self.pin_dir.join("maps"),
            &self.settings,
            cookie,
        )?;
        let (name, pin) = SK_LOOKUP;
        let program = program::<SkLookup>(&mut instance, name)?;
        program.load().map_err(|e| BpfError::program(name, e))?;
        let id = program
            .attach(netns.as_fd())
            .map_err(|e| BpfError::program(name, e))?;
        let link = program
            .take_link(id)
            .map_err(|e| BpfError::program(name, e))?;
        pin_link(FdLink::from(link), &pod_dir.join(pin))?;
        Ok(cookie)
    }

    /// Puts `listener` (a listening TCP socket in the pod's netns, bound to any port) in the
    /// pod's `slot`, replacing what was there: the switch is atomic for new connections.
    pub fn set_listener(
        &mut self,
        netns_cookie: u64,
        slot: Slot,
        listener: &impl AsRawFd,
    ) -> Result<(), BpfError> {
        let key = SlotKey::new(netns_cookie, slot);
        self.listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|e| BpfError::map("listeners", e))
    }

    /// Empties the pod's `slot`: new connections to it are dropped (the client's SYN retries).
    pub fn clear_listener(&mut self, netns_cookie: u64, slot: Slot) -> Result<(), BpfError> {
        let key = SlotKey::new(netns_cookie, slot);
        self.listeners
            .remove(&key)
            .map_err(|e| BpfError::map("listeners", e))
    }

    /// Removes the pod's pinned links, which detaches its programs (the pins are their last
    /// reference once ztund's own fds are closed). A pod without pins is not an error.
    pub fn detach(&self, uid: &str) -> Result<(), BpfError> {
        let dir = self.pod_dir(uid);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BpfError::Io {
                what: "removing the pins in",
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// A uid as one file name: ztund's uids hold slashes (`Kubernetes//Pod/ns/name` for mesh-file
/// pods), so `%` and `/` are percent-encoded. [`uid_of_pin`] undoes it.
pub fn pin_name(uid: &str) -> String {
    uid.replace('%', "%25").replace('/', "%2F")
}

/// The uid a pod's pin directory was named after.
pub fn uid_of_pin(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

/// Parses the object and creates (or reuses, by their pins) its maps; `netns_cookie` is the
/// constant of an sk_lookup instance (0 for the node-wide programs).
fn open_object(
    object: &[u8],
    maps_dir: &Path,
    settings: &BpfSettings,
    netns_cookie: u64,
) -> Result<Ebpf, BpfError> {
    EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .override_global("ZTUND_OUTBOUND_PORT", &settings.outbound_port, true)
        .override_global("ZTUND_HBONE_PORT", &settings.hbone_port, true)
        .override_global("ZTUND_MARK", &settings.mark, true)
        .override_global("ZTUND_MARK_MASK", &settings.mark_mask, true)
        .override_global("ZTUND_NETNS_COOKIE", &netns_cookie, true)
        .load(object)
        .map_err(|e| BpfError::Object(Box::new(e)))
}

/// The cookie of `netns`, read from a socket made inside it.
pub fn netns_cookie_of(netns: &Netns) -> Result<u64, BpfError> {
    let io = |source| BpfError::Io {
        what: "reading the netns cookie of",
        path: PathBuf::from(netns.describe()),
        source,
    };
    let socket = netns
        .enter(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None))
        .and_then(|s| s)
        .map_err(io)?;
    super::origdst::netns_cookie(&socket).map_err(io)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(BpfError::program(
        name,
        aya::programs::ProgramError::NotLoaded,
    ))?;
    program.try_into().map_err(|e| BpfError::program(name, e))
}

fn sock_addr<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    program::<CgroupSockAddr>(ebpf, name)
}

pub(super) fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name).ok_or(BpfError::map(
        name,
        aya::maps::MapError::InvalidName {
            name: name.to_string(),
        },
    ))
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), BpfError> {
    // A pin left by an earlier ztund for the same pod is replaced: the new link is attached
    // already, so the old one can go (cgroup links are multi-attach; both ran for a moment and
    // both send to the same place).
    if let Ok(old) = PinnedLink::from_pin(path) {
        let _ = old.unpin();
    }
    link.pin(path).map(drop).map_err(|e| BpfError::Pin {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

fn create_dir(dir: &Path) -> Result<(), BpfError> {
    std::fs::create_dir_all(dir).map_err(|source| BpfError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

/// Pins only work on a bpffs: say so up front rather than with a later EPERM.
fn check_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match nix::sys::statfs::statfs(&probe) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => Ok(()),
        _ => Err(BpfError::NotBpffs {
            dir: dir.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_uid_with_slashes_is_one_pin_name() {
        let uid = "Kubernetes//Pod/default/pod%1";
        let name = super::pin_name(uid);
        assert!(!name.contains('/'), "{name}");
        assert_eq!(super::uid_of_pin(&name), uid);
    }
}
