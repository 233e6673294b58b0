//! What `ztund demo --capture-backend ebpf` adds to the world: the eBPF backend captures a pod's
//! outbound connections by cgroup and finds that cgroup from the processes in the pod's netns,
//! but the demo's apps are sockets of the demo process (in no pod's cgroup) and its pods have no
//! process at all. So each pod gets a sandbox, as kubelet's pause container: this binary
//! re-executed as `ztund demo-pod-sandbox`, placed by the demo in the pod's netns and in a cgroup
//! of its own (`<cgroup2>/ztdemo/pod<uid>`, named so ztund's pod-uid walk finds it), which makes
//! the pod's client sockets on request. The daemons pin their state on a bpffs the demo mounts
//! in its work dir. Everything here is removed on drop (the sandboxes' processes, then their
//! cgroups; the bpffs is unmounted), and [`remove_leftovers`] clears what a killed demo left.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use socket2::{Domain, Protocol, Socket, Type};

use super::DemoError;
use super::scenario::{self, PODS, Pod};
use super::world;
use crate::capture::bpf::cgroup;
use crate::topology::{ChildGuard, Place, Topology, TopologyError};

/// The cgroup2 directory (below the hierarchy's root) holding the demo pods' cgroups; the same
/// name as the demo's namespaces, so a user finds both.
pub const CGROUP_PARENT: &str = world::PREFIX;

/// The hidden subcommand the sandboxes run (`ztund demo-pod-sandbox --fd N`).
pub const SUBCOMMAND: &str = "demo-pod-sandbox";

/// How long a sandbox may take to hand over a socket: it does nothing else.
const SOCKET_DEADLINE: Duration = Duration::from_secs(3);

/// The request bytes of the sandbox protocol: a TCP socket of this family, please.
const WANT_V4: u8 = b'4';
const WANT_V6: u8 = b'6';

/// Why the eBPF demo's sandboxes or bpffs could not be set up (or a sandbox could not serve).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no cgroup2 hierarchy is mounted (the eBPF backend captures pods by cgroup2): {0}")]
    NoCgroup2(#[source] io::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs on {path} (mount -t bpf): {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("starting the sandbox of pod {pod}: {source}")]
    Spawn {
        pod: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("starting the sandbox of pod {pod}: {source}")]
    Start {
        pod: &'static str,
        #[source]
        source: TopologyError,
    },
    #[error("fd {0} is not open: `ztund {SUBCOMMAND}` is started by `ztund demo` only")]
    NoControlFd(RawFd),
    #[error("serving sockets: {0}")]
    Serve(#[source] io::Error),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io { what, path, source }
}

/// The pods' cgroups: `<cgroup2>/ztdemo/pod<uid>`, removed on drop (after the sandboxes).
pub struct PodCgroups {
    parent: PathBuf,
}

impl PodCgroups {
    pub fn create() -> Result<PodCgroups, SandboxError> {
        let mount = cgroup::mount().map_err(SandboxError::NoCgroup2)?;
        let parent = mount.join(CGROUP_PARENT);
        std::fs::create_dir_all(&parent).map_err(io_error("creating the cgroup", &parent))?;
        Ok(PodCgroups { parent })
    }

    /// Pod `pod`'s cgroup, created: named after its uid as kubelet's `pod<uid>`.
    fn pod(&self, pod: &Pod) -> Result<PathBuf, SandboxError> {
        let dir = self.parent.join(format!("pod{}", scenario::pod_uid(pod)));
        std::fs::create_dir_all(&dir).map_err(io_error("creating the cgroup", &dir))?;
        Ok(dir)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        remove_cgroups(&self.parent);
    }
}

/// Removes `parent` and the cgroups below it (their processes must be gone).
fn remove_cgroups(parent: &Path) {
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                remove_cgroup(&entry.path());
            }
        }
    }
    remove_cgroup(parent);
}

fn remove_cgroup(dir: &Path) {
    // A process just reaped may still count for a moment (EBUSY): retry briefly.
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                eprintln!("ztund demo: could not remove cgroup {}: {e}", dir.display());
                return;
            }
            _ => return,
        }
    }
    eprintln!("ztund demo: cgroup {} stayed busy", dir.display());
}

/// A private bpffs in the demo's work dir for the daemons' pins; unmounted on drop, which
/// removes the pins (and the links only they held).
pub struct Bpffs(PathBuf);

impl Bpffs {
    pub fn mount(work_dir: &Path) -> Result<Bpffs, SandboxError> {
        let path = bpffs_path(work_dir);
        std::fs::create_dir(&path).map_err(io_error("creating", &path))?;
        nix::mount::mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| SandboxError::Mount {
            path: path.clone(),
            source,
        })?;
        Ok(Bpffs(path))
    }

    /// Node `n`'s `bpfDir`.
    pub fn node_dir(&self, n: usize) -> PathBuf {
        self.0.join(scenario::node_name(n))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

fn bpffs_path(work_dir: &Path) -> PathBuf {
    work_dir.join("bpf")
}

fn unmount(path: &Path) {
    // Lazy: the daemons are gone, but a link fd of theirs may still be closing.
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// What a demo killed outright left of this module in `work_dir` and the cgroup2 hierarchy: its
/// bpffs is unmounted and its cgroups removed (their processes died with it,
/// PR_SET_PDEATHSIG). The caller holds the demo lock.
pub fn remove_leftovers(work_dir: &Path) {
    let path = bpffs_path(work_dir);
    if is_bpffs(&path) {
        unmount(&path);
    }
    if let Ok(mount) = cgroup::mount() {
        let parent = mount.join(CGROUP_PARENT);
        if parent.exists() {
            remove_cgroups(&parent);
        }
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Everything the eBPF backend needs of the demo: the daemons' bpffs, the pods' cgroups and a
/// sandbox per pod. Dropped in that field order: the sandboxes' processes, then their cgroups,
/// then the bpffs (after the daemons, which the world drops first).
pub struct EbpfPods {
    sandboxes: Vec<PodSandbox>,
    #[allow(dead_code)] // Held: its drop removes the cgroups.
    cgroups: PodCgroups,
    pub bpffs: Bpffs,
}

impl EbpfPods {
    /// Mounts the bpffs in `work_dir`, creates the pods' cgroups and starts their sandboxes
    /// (their logs in `work_dir`). What was made before a failure is removed again.
    pub fn start(topology: &Topology, work_dir: &Path) -> Result<EbpfPods, DemoError> {
        let bpffs = Bpffs::mount(work_dir)?;
        let cgroups = PodCgroups::create()?;
        let mut sandboxes = Vec::new();
        for pod in PODS {
            let log_path = work_dir.join(format!("sandbox-{}.log", pod.name));
            let log = File::create(&log_path).map_err(|source| DemoError::File {
                path: log_path,
                source,
            })?;
            sandboxes.push(PodSandbox::start(topology, &cgroups, pod, log)?);
        }
        Ok(EbpfPods {
            sandboxes,
            cgroups,
            bpffs,
        })
    }

    /// The sandbox of the pod at `place`.
    pub fn sandbox(&self, place: Place) -> Option<&PodSandbox> {
        self.sandboxes.iter().find(|s| s.pod.place() == place)
    }
}

/// One pod's sandbox process (killed on drop) and the demo's end of its control socket.
pub struct PodSandbox {
    pub pod: Pod,
    ctl: Mutex<UnixStream>,
    #[allow(dead_code)] // Held: its drop kills the process.
    child: ChildGuard,
}

impl PodSandbox {
    /// Starts pod `pod`'s sandbox in its netns and its cgroup (created under `cgroups`), its
    /// stderr to `log`.
    pub fn start(
        topology: &Topology,
        cgroups: &PodCgroups,
        pod: Pod,
        log: File,
    ) -> Result<PodSandbox, DemoError> {
        let spawn_error = |source| SandboxError::Spawn {
            pod: pod.name,
            source,
        };
        let cgroup = cgroups.pod(&pod)?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs = File::options()
            .write(true)
            .open(&procs_path)
            .map_err(io_error("opening", &procs_path))?;
        let (ours, theirs) = UnixStream::pair().map_err(spawn_error)?;
        ours.set_read_timeout(Some(SOCKET_DEADLINE))
            .map_err(spawn_error)?;
        let mut command = world::daemon_command(log)?;
        let (ctl_fd, procs_fd) = (theirs.as_raw_fd(), procs.as_raw_fd());
        command.arg(SUBCOMMAND).arg("--fd").arg(ctl_fd.to_string());
        // SAFETY: between fork and exec the child only makes async-signal-safe calls (fcntl,
        // write) on fds it inherited open: its control socket stays open across exec, and it
        // moves itself into the pod's cgroup before it runs anything, so every socket it
        // makes belongs to the pod.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(ctl_fd, libc::F_SETFD, 0) != 0
                    || libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Enters the pod's netns (after the hook above, which needs none of it).
        let child =
            topology
                .spawn_in(pod.place(), command)
                .map_err(|source| SandboxError::Start {
                    pod: pod.name,
                    source,
                })?;
        drop((procs, theirs));
        Ok(PodSandbox {
            pod,
            ctl: Mutex::new(ours),
            child,
        })
    }

    /// A new unconnected TCP socket of `ipv6`'s family, made by the sandbox: in the pod's netns
    /// and cgroup, so the eBPF programs capture what it connects to.
    pub fn socket(&self, ipv6: bool) -> io::Result<Socket> {
        let mut ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        ctl.write_all(&[if ipv6 { WANT_V6 } else { WANT_V4 }])?;
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        // Close-on-exec, as every socket Rust makes: the daemons the demo starts must not hold
        // the apps' connections open.
        let msg = recvmsg::<()>(
            ctl.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        if msg.bytes == 0 {
            return Err(io::Error::other("the pod's sandbox exited"));
        }
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(&fd) = fds.first()
            {
                // SAFETY: the fd just arrived with SCM_RIGHTS: it is ours alone.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(Socket::from(owned));
            }
        }
        Err(io::Error::other(
            "the pod's sandbox could not make a socket",
        ))
    }
}

/// `ztund demo-pod-sandbox --fd N`: the sandbox's side. It enters nothing itself (the demo
/// started it in the pod's netns and cgroup); for each request byte on the control socket `fd`
/// it answers with a new TCP socket of that family (SCM_RIGHTS), and returns when the demo
/// closes the socket.
pub fn serve(fd: RawFd) -> Result<(), SandboxError> {
    // SAFETY: F_GETFD only reads the flags of whatever `fd` is, if anything.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(SandboxError::NoControlFd(fd));
    }
    // SAFETY: the demo handed this fd over to this process alone, which owns it from here.
    let mut ctl = unsafe { UnixStream::from_raw_fd(fd) };
    let mut want = [0u8; 1];
    loop {
        match ctl.read(&mut want) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SandboxError::Serve(e)),
        }
        let domain = if want[0] == WANT_V6 {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        // A failed socket() is answered without an fd: the demo reports it for that flow.
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).ok();
        let fds: Vec<RawFd> = socket.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            ctl.as_raw_fd(),
            &[IoSlice::new(b"k")],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| SandboxError::Serve(e.into()))?;
    }
}
