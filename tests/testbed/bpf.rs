//! What tests of the eBPF capture backend need besides namespaces: a private bpffs, cgroup2
//! directories (never the root), the number of programs attached to a cgroup or netns, and a
//! pod sandbox: a process in the pod's netns and cgroup, as Kubernetes' pause container, which
//! also makes the "app" sockets of the test (a socket belongs to the cgroup of the process that
//! created it, and the eBPF programs capture by cgroup).
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use ztund::net::Netns;

/// A private bpffs, unmounted on drop (its pins, and the links only they held, go with it).
pub struct Bpffs(tempfile::TempDir);

impl Bpffs {
    pub fn new() -> Bpffs {
        let dir = tempfile::tempdir().expect("temp dir");
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t bpf bpf {}: {e}", dir.path().display()));
        Bpffs(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A cgroup2 directory below the hierarchy's root (`name` under the mount), removed on drop
/// (after its processes are gone).
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new(name: &str) -> Cgroup {
        let mount = ztund::capture::bpf::cgroup::mount().expect("a cgroup2 hierarchy");
        let dir = mount.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Cgroup(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Children first (a test may make `pod/ctr`).
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        // A process just reaped may still count for a moment (EBUSY): retry briefly.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.0) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
}

/// `BPF_CGROUP_INET4_CONNECT`, `BPF_CGROUP_SOCK_OPS`, `BPF_SK_LOOKUP` (uapi `bpf_attach_type`).
pub const INET4_CONNECT: u32 = 10;
pub const SOCK_OPS: u32 = 3;
pub const SK_LOOKUP: u32 = 36;

/// How many programs of `attach_type` are attached right at `target` (a cgroup directory or a
/// netns fd): `BPF_PROG_QUERY` with no id buffer returns the count.
pub fn attached(target: &impl AsFd, attach_type: u32) -> u32 {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(target.as_fd().as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    // SAFETY: `attr` is a zeroed bpf_attr prefix of the size passed, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", io::Error::last_os_error());
    u32::from_ne_bytes(attr[24..28].try_into().unwrap())
}

/// Runs `command` in `cgroup` (its first act after fork: "0" into `cgroup.procs`).
pub fn in_cgroup(command: &mut Command, cgroup: &Path) -> File {
    use std::os::unix::process::CommandExt;
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("opening {}/cgroup.procs: {e}", cgroup.display()));
    let fd = procs.as_raw_fd();
    // SAFETY: between fork and exec the child only makes one write(2) on an inherited fd.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    procs
}

/// The sandbox: reads a family byte on the fd its first argument names, answers with a new TCP
/// socket of it (SCM_RIGHTS).
const SANDBOX: &str = r#"
import socket, sys
ctl = socket.socket(fileno=int(sys.argv[1]))
while True:
    want = ctl.recv(1)
    if not want:
        break
    s = socket.socket(socket.AF_INET6 if want == b"6" else socket.AF_INET, socket.SOCK_STREAM)
    socket.send_fds(ctl, [b"k"], [s.fileno()])
    s.close()
"#;

/// A pod's sandbox process: in its netns and its own cgroup `bpf2-<name>`.
pub struct Sandbox {
    child: Child,
    ctl: Mutex<UnixStream>,
    pub cgroup: Cgroup,
}

impl Sandbox {
    pub fn start(netns: &Netns, name: &str) -> Sandbox {
        use std::os::unix::process::CommandExt;
        let cgroup = Cgroup::new(&format!("bpf2-{name}"));
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut command = Command::new("python3");
        let fd = theirs.as_raw_fd();
        // The socket keeps its number and only loses close-on-exec: moving it to a fixed number
        // (dup2 onto 3) would overwrite whatever this process had there, such as the netns or
        // cgroup fd that the hooks below still need.
        command
            .args(["-c", SANDBOX, &fd.to_string()])
            .stdin(Stdio::null());
        // SAFETY: between fork and exec the child only calls fcntl on an inherited fd.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        ztund::net::enter_before_exec(&mut command, netns);
        let procs = in_cgroup(&mut command, &cgroup.0);
        let child = command
            .spawn()
            .expect("python3 is needed for the pod sandbox");
        drop((procs, theirs));
        Sandbox {
            child,
            ctl: Mutex::new(ours),
            cgroup,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new unconnected TCP socket made by the sandbox: in the pod's netns and cgroup.
    pub fn socket(&self, ipv6: bool) -> io::Result<socket2::Socket> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        ctl.write_all(if ipv6 { b"6" } else { b"4" })?;
        let mut byte = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        // Close-on-exec, as every socket Rust makes: processes the test starts later (a
        // successor ztund) must not hold the app's connections open.
        let flags = MsgFlags::MSG_CMSG_CLOEXEC;
        let msg = recvmsg::<()>(ctl.as_raw_fd(), &mut iov, Some(&mut space), flags)
            .map_err(io::Error::from)?;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(&fd) = fds.first()
            {
                // SAFETY: the fd just arrived with SCM_RIGHTS: it is ours alone.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(socket2::Socket::from(owned));
            }
        }
        let _ = ctl.read(&mut byte);
        Err(io::Error::other("the sandbox sent no socket"))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
