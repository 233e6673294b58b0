//! Making sockets where they belong: in a pod's network namespace (entered on the calling thread
//! with `setns` and left straight after), carrying ztund's mark so the redirection rules let them
//! pass. Everything in `proxy` creates its sockets through a [`SocketFactory`].
//!
//! Knows nothing about pods, policy or the mesh: a [`Netns`] is just a namespace file descriptor
//! and a [`SocketFactory`] just a (namespace, mark) pair.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// ztund's socket mark: the redirection rules let packets with it through (PROTOCOL.md §5.5).
pub const ZTUND_MARK: u32 = 0x539;
/// Connection mark for replies that must come back to ztund's transparent sockets.
pub const TPROXY_CONNMARK: u32 = 0x111;

/// Where named namespaces live (`ip netns add NAME`).
const NAMED_NETNS_DIR: &str = "/var/run/netns";
/// How long an outgoing connect may take before it is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LISTEN_BACKLOG: i32 = 1024;

/// The identity of a network namespace: two fds name the same namespace exactly when their
/// nsfs inodes match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}] (dev {})", self.ino, self.dev)
    }
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NetnsId,
    /// Where it was opened from, for messages; `None` for fds received over ZDS.
    origin: Option<PathBuf>,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for Netns {}

impl Netns {
    /// Opens `NAME` (under /var/run/netns) or a path such as `/proc/<pid>/ns/net`.
    pub fn open(name_or_path: &str) -> io::Result<Netns> {
        let path = if name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            Path::new(NAMED_NETNS_DIR).join(name_or_path)
        };
        let file = File::open(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening netns {}: {e}", path.display()))
        })?;
        let mut netns = Netns::from_fd(file.into())?;
        netns.origin = Some(path);
        Ok(netns)
    }

    /// Takes ownership of a namespace fd (for example one received over ZDS).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Netns> {
        let meta = File::from(fd.try_clone()?).metadata()?;
        let id = NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(Netns {
            fd,
            id,
            origin: None,
        })
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> io::Result<Netns> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// The (st_dev, st_ino) identity.
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Whether the fd really names a network namespace (`NS_GET_NSTYPE`); false for any other
    /// file. Callers only log a mismatch, as the kernel refuses `setns` into anything else.
    pub fn is_network_namespace(&self) -> bool {
        // NS_GET_NSTYPE = _IO(0xb7, 0x3)
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: the ioctl takes no argument and only reads the fd.
        let kind = unsafe { libc::ioctl(self.fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        kind == libc::CLONE_NEWNET
    }

    /// A printable name: the path it was opened from, or the inode.
    pub fn describe(&self) -> String {
        match &self.origin {
            Some(path) => format!("{} ({})", path.display(), self.id),
            None => self.id.to_string(),
        }
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back to the
    /// namespace it was in. Sockets created by `f` stay in this namespace. `f` must not yield to
    /// other work on this thread (no `.await` inside). Costs about 6 µs (measured: 20,000 round
    /// trips into another namespace), cheap enough for every socket.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        if INSIDE.get() {
            // Nested: "home" is the namespace the outer call entered, not the thread's own.
            let home = File::open("/proc/thread-self/ns/net")?;
            return self.enter_from(home.as_fd(), f);
        }
        let home = home_namespace()?;
        let _inside = Inside::now();
        // SAFETY: the thread's home namespace fd stays open for the thread's whole life.
        self.enter_from(unsafe { BorrowedFd::borrow_raw(home) }, f)
    }

    /// [`Netns::enter`], returning to `home`; a panic in `f` is passed on once back home.
    fn enter_from<T>(&self, home: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.fd.as_fd())?;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        if let Err(e) = setns(home) {
            // A thread left in a pod's namespace would silently create every later socket there;
            // nothing can recover from that safely.
            eprintln!("ztund: cannot return thread to its network namespace: {e}; aborting");
            std::process::abort();
        }
        match outcome {
            Ok(value) => Ok(value),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

thread_local! {
    /// The namespace this thread lives in, opened on its first [`Netns::enter`]: a thread visits
    /// another namespace only inside `enter`, so this never changes, and a socket made in a pod
    /// costs two `setns` instead of also an `open` and a `close` of procfs (issue 16, item 3).
    static HOME: std::cell::OnceCell<OwnedFd> = const { std::cell::OnceCell::new() };
    /// Whether this thread is inside [`Netns::enter`] now.
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the thread as inside [`Netns::enter`] until dropped (also when `f` panics).
struct Inside;

impl Inside {
    fn now() -> Inside {
        INSIDE.set(true);
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.set(false);
    }
}

/// The calling thread's own namespace fd (open for the thread's life), opened on first use.
fn home_namespace() -> io::Result<std::os::fd::RawFd> {
    HOME.with(|home| {
        if let Some(fd) = home.get() {
            return Ok(fd.as_raw_fd());
        }
        let opened: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
        Ok(home.get_or_init(|| opened).as_raw_fd())
    })
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves the calling thread into the namespace behind `fd`.
pub fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid borrowed fd.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `command`'s child enter the namespace of `netns` before it runs (the `nft` and `ip`
/// ztund runs in a pod, the processes of the test topology). The child gets its own copy of the
/// fd at fork, so `netns` only has to outlive the spawn, which the borrow ensures for callers
/// that spawn before dropping it.
pub fn enter_before_exec(command: &mut std::process::Command, netns: &Netns) {
    use std::os::unix::process::CommandExt;
    let fd = netns.as_fd().as_raw_fd();
    // SAFETY: between fork and exec the child only makes the async-signal-safe setns syscall,
    // on an fd it inherited open from the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Creates TCP sockets in one namespace with one mark. `netns: None` means the daemon's own
/// namespace; `mark: None` leaves the socket unmarked.
#[derive(Debug, Clone, Default)]
pub struct SocketFactory {
    pub netns: Option<Arc<Netns>>,
    pub mark: Option<u32>,
}

impl SocketFactory {
    /// A factory for a namespace with ztund's mark.
    pub fn in_netns(netns: Arc<Netns>) -> SocketFactory {
        SocketFactory {
            netns: Some(netns),
            mark: Some(ZTUND_MARK),
        }
    }

    /// Runs `f` inside the factory's namespace (or right here without one).
    fn inside<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match &self.netns {
            Some(netns) => netns.enter(f)?,
            None => f(),
        }
    }

    fn create(&self, domain: Domain) -> io::Result<Socket> {
        // Non-blocking from the start: no fcntl pair per connection.
        let socket = Socket::new(
            domain,
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        Ok(socket)
    }

    /// A listening socket bound at `addr` inside the namespace (SO_REUSEADDR, SO_REUSEPORT,
    /// SO_MARK; IP_TRANSPARENT when `transparent`, best effort). `[::]` listens dual stack.
    /// TCP_NODELAY too: accepted sockets inherit it, which saves a system call per connection.
    /// Must be called within a tokio runtime.
    pub fn listener(&self, addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
        let socket = self.inside(|| {
            let socket = self.create(Domain::for_address(addr))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_tcp_nodelay(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(false)?;
            }
            if transparent {
                // Best effort: without CAP_NET_ADMIN the listener still takes REDIRECTed traffic.
                let _ = socket.set_ip_transparent_v4(true);
                if addr.is_ipv6() {
                    let _ = socket.set_ip_transparent_v6(true);
                }
            }
            socket
                .bind(&addr.into())
                .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
            socket.listen(LISTEN_BACKLOG)?;
            Ok(socket)
        })?;
        TcpListener::from_std(socket.into())
    }

    /// Connects to `dst` from inside the namespace (SO_MARK, TCP_NODELAY). With `spoof_source`,
    /// the socket is transparent and bound to that address, so the peer sees it as the source.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        spoof_source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        let socket = self.inside(|| self.create(Domain::for_address(dst)))?;
        socket.set_tcp_nodelay(true)?;
        // The eBPF backend delivers from the pod's own address (capture::bpf::delivers_from_pod).
        let spoof_source = spoof_source.filter(|_| !crate::capture::bpf::delivers_from_pod());
        if let Some(source) = spoof_source {
            let source = match (source, dst) {
                (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
                (source, _) => source,
            };
            // IP_TRANSPARENT alone lets the socket bind a foreign address (the kernel's
            // non-local bind check accepts transparent or freebind): no IP_FREEBIND call.
            if dst.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                socket.set_ip_transparent_v6(true)?;
            }
            // Choose the source port at connect time, per 4-tuple: an eager bind(port 0) would
            // give every connection a port of its own, and short connections (TIME_WAIT on this
            // side) would run the namespace out of ports at a few thousand per second.
            set_bind_address_no_port(&socket);
            let local = SockAddr::from(SocketAddr::new(source, 0));
            socket.bind(&local).map_err(|e| {
                io::Error::new(e.kind(), format!("binding spoofed source {source}: {e}"))
            })?;
        }
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst}: no answer within {CONNECT_TIMEOUT:?}"),
            )),
        }
    }
}

/// The sysctl that moves a closed `SO_REUSEPORT` listener's queued connections (accept queue
/// and half-open handshakes) to another listener of its group instead of resetting them
/// (Linux >= 5.14). `/proc/sys/net` shows the namespace of the thread that opens it.
const MIGRATE_REQUESTS_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns on `net.ipv4.tcp_migrate_req` in `netns` (`None`: this thread's namespace), so that
/// when a stopping ztund closes its listeners, connections the kernel queued on them go to the
/// successor's listeners on the same ports rather than being reset.
pub fn enable_request_migration(netns: Option<&Netns>) -> io::Result<()> {
    let write = || {
        std::fs::write(MIGRATE_REQUESTS_SYSCTL, b"1").map_err(|e| {
            io::Error::new(e.kind(), format!("writing {MIGRATE_REQUESTS_SYSCTL}: {e}"))
        })
    };
    match netns {
        Some(netns) => netns.enter(write)?,
        None => write(),
    }
}

/// Whether `net.ipv4.tcp_migrate_req` is on in `netns` (`None`: this thread's namespace).
pub fn request_migration_enabled(netns: Option<&Netns>) -> io::Result<bool> {
    let read = || std::fs::read_to_string(MIGRATE_REQUESTS_SYSCTL).map(|v| v.trim() == "1");
    match netns {
        Some(netns) => netns.enter(read)?,
        None => read(),
    }
}

/// Whether a namespace's loopback has IPv6. `/proc/sys/net` shows the namespace of the thread
/// that opens it. Missing (a kernel without IPv6) or unreadable counts as no IPv6.
const LOOPBACK_IPV6_DISABLED: &str = "/proc/sys/net/ipv6/conf/lo/disable_ipv6";
const ALL_IPV6_DISABLED: &str = "/proc/sys/net/ipv6/conf/all/disable_ipv6";

/// Whether `netns` (`None`: this thread's namespace) has IPv6: neither
/// `net.ipv6.conf.all.disable_ipv6` nor the loopback's is set. A namespace without it gets
/// IPv4 listeners and IPv4 reply routing only (PROTOCOL.md §5.4, `IPV6_ENABLED`).
pub fn ipv6_enabled(netns: Option<&Netns>) -> bool {
    let read = || {
        [ALL_IPV6_DISABLED, LOOPBACK_IPV6_DISABLED]
            .iter()
            .all(|path| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0"))
    };
    match netns {
        Some(netns) => netns.enter(read).unwrap_or(false),
        None => read(),
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`, best effort (the connect still works without it).
fn set_bind_address_no_port(socket: &Socket) {
    let on: libc::c_int = 1;
    // SAFETY: `on` outlives the call and its size is passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Where a redirected connection was headed: the eBPF backend's table when it runs (it knows
/// the connections its programs redirected), SO_ORIGINAL_DST (REDIRECT), then
/// IP6T_SO_ORIGINAL_DST, else the local address (TPROXY and sk_lookup keep the original
/// destination there).
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    if let Some(found) = crate::capture::bpf::original_destination(stream) {
        return found.map(canonical);
    }
    let socket = socket2::SockRef::from(stream);
    let found = socket
        .original_dst_v4()
        .or_else(|_| socket.original_dst_v6())
        .ok()
        .and_then(|addr| addr.as_socket());
    let addr = match found {
        Some(addr) => addr,
        None => stream.local_addr()?,
    };
    Ok(canonical(addr))
}

/// Turns `::ffff:a.b.c.d` (a v4 peer on a dual-stack socket) into `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The wildcard address of a family, for listeners.
pub fn unspecified(ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_netns_equals_itself_and_enter_returns() {
        let a = Netns::current().unwrap();
        let b = Netns::current().unwrap();
        assert_eq!(a, b);
        assert!(a.is_network_namespace());
        let value = a.enter(|| 42).unwrap();
        assert_eq!(value, 42);
        assert_eq!(Netns::current().unwrap(), a);
    }

    #[test]
    fn a_plain_file_is_not_a_network_namespace() {
        let file = File::open("/proc/self/status").unwrap();
        let netns = Netns::from_fd(file.into()).unwrap();
        assert!(!netns.is_network_namespace());
        assert!(netns.enter(|| ()).is_err());
    }

    #[test]
    fn open_names_the_missing_path() {
        let err = Netns::open("ztund-no-such-netns").unwrap_err().to_string();
        assert!(err.contains("/var/run/netns/ztund-no-such-netns"), "{err}");
    }

    #[test]
    fn panics_inside_enter_leave_the_thread_home() {
        let home = Netns::current().unwrap();
        let result = std::panic::catch_unwind(|| home.enter(|| panic!("inside")));
        assert!(result.is_err());
        assert_eq!(Netns::current().unwrap(), home);
    }

    /// A namespace of its own, made on a passing thread (`unshare` moves only that thread).
    fn another_namespace() -> Netns {
        std::thread::spawn(|| {
            // SAFETY: unshare only changes the calling thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            Netns::current().unwrap()
        })
        .join()
        .unwrap()
    }

    /// The home namespace is remembered per thread; a nested `enter` still returns to the
    /// namespace the outer one entered, and a panic inside leaves no trace for the next call.
    #[test]
    fn enter_returns_home_every_time_nested_or_after_a_panic() {
        let home = Netns::current().unwrap();
        let other = another_namespace();
        assert_ne!(home, other);
        for _ in 0..3 {
            let (inside, nested, after_nested) = other
                .enter(|| {
                    let inside = Netns::current().unwrap();
                    let nested = home.enter(|| Netns::current().unwrap()).unwrap();
                    (inside, nested, Netns::current().unwrap())
                })
                .unwrap();
            assert_eq!(inside, other);
            assert_eq!(nested, home);
            assert_eq!(
                after_nested, other,
                "a nested enter went back to the wrong one"
            );
            assert_eq!(Netns::current().unwrap(), home);
        }
        let panicked = std::panic::catch_unwind(|| other.enter(|| panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(Netns::current().unwrap(), home);
        let after_panic = other
            .enter(|| home.enter(|| Netns::current().unwrap()).unwrap())
            .unwrap();
        assert_eq!(after_panic, home);
        assert_eq!(Netns::current().unwrap(), home);
    }

    #[test]
    fn mapped_addresses_become_v4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn listener_and_connect_in_own_namespace_carry_the_mark_and_nodelay() {
        let factory = SocketFactory {
            netns: Some(Arc::new(Netns::current().unwrap())),
            mark: Some(ZTUND_MARK),
        };
        let listener = factory
            .listener("127.0.0.1:0".parse().unwrap(), true)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = factory.connect(addr, None).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(socket2::SockRef::from(&client).mark().unwrap(), ZTUND_MARK);
        assert!(client.nodelay().unwrap());
        assert!(
            server.nodelay().unwrap(),
            "accepted without the listener's TCP_NODELAY"
        );
        assert_eq!(original_destination(&server).unwrap(), addr);
    }
}
