//! A packet sniffer for tests, so a test can prove what really crossed the wire without tcpdump:
//! an `AF_PACKET` raw socket opened inside one namespace (the switch, where every frame between
//! nodes passes), read on its own thread until stopped (or a time limit), recording the IPv4 TCP
//! flows it saw (IPv4 and IPv6) and whether any frame contained one of a few marker strings. Knows nothing about
//! ztund.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ztund::net::Netns;

/// A sniffer never runs longer than this, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(120);
/// Frames can be GSO super-packets of up to 64 KiB (more with BIG TCP): read them whole.
const FRAME_BUFFER: usize = 512 * 1024;

/// One direction of a TCP connection as seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Flow {
    /// Whether the flow runs between `a` and `b`, in either direction.
    pub fn between(&self, a: IpAddr, b: IpAddr) -> bool {
        (self.src.ip() == a && self.dst.ip() == b) || (self.src.ip() == b && self.dst.ip() == a)
    }

    /// Whether either end uses `port`.
    pub fn uses_port(&self, port: u16) -> bool {
        self.src.port() == port || self.dst.port() == port
    }
}

/// What a sniffer saw.
#[derive(Debug, Default)]
pub struct Capture {
    /// Frames read (all protocols).
    pub frames: usize,
    /// Frames that did not fit the buffer (their tail was not searched).
    pub truncated: usize,
    pub flows: HashSet<Flow>,
    /// For each marker given to [`Sniffer::start`], how many frames contained it.
    pub marker_hits: Vec<usize>,
}

impl Capture {
    /// The TCP flows between two addresses.
    pub fn flows_between(&self, a: IpAddr, b: IpAddr) -> Vec<Flow> {
        let mut flows: Vec<Flow> = self
            .flows
            .iter()
            .filter(|f| f.between(a, b))
            .copied()
            .collect();
        flows.sort_by_key(|f| (f.src, f.dst));
        flows
    }
}

/// A running capture; stopped (and its thread joined) by [`Sniffer::stop`] or on drop.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Capture>>,
}

impl Sniffer {
    /// Starts capturing every frame of every interface in `netns`. The socket exists when this
    /// returns, so nothing sent afterwards is missed (unless the kernel drops frames under load).
    pub fn start(netns: &Netns, markers: Vec<Vec<u8>>) -> Sniffer {
        assert!(markers.iter().all(|m| !m.is_empty()), "empty marker");
        let socket = netns
            .enter(open_packet_socket)
            .expect("entering the sniffer's namespace")
            .expect("opening an AF_PACKET socket");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sniffer".into())
            .spawn(move || read_frames(socket, &markers, &flag))
            .expect("starting the sniffer thread");
        Sniffer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture and returns what it saw.
    pub fn stop(mut self) -> Capture {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("sniffer thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_packet_socket() -> std::io::Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain socket syscall; the fd is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // A short receive timeout lets the thread notice the stop flag.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    set_option(&socket, libc::SO_RCVTIMEO, &timeout)?;
    // A big buffer so bursts of a bulk transfer are not dropped while a frame is searched.
    let buffer: libc::c_int = 32 << 20;
    set_option(&socket, libc::SO_RCVBUFFORCE, &buffer)?;
    Ok(socket)
}

fn set_option<T>(socket: &OwnedFd, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn read_frames(socket: OwnedFd, markers: &[Vec<u8>], stop: &AtomicBool) -> Capture {
    let mut capture = Capture {
        marker_hits: vec![0; markers.len()],
        ..Capture::default()
    };
    let mut buffer = vec![0u8; FRAME_BUFFER];
    let started = Instant::now();
    // After the stop flag, frames already queued are still read: the loop ends at the first
    // receive timeout, so the last frames a test sent before stopping are never missed.
    while started.elapsed() < MAX_RUN {
        // SAFETY: the buffer is valid for its length; MSG_TRUNC makes the return value the
        // frame's real length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            // Timeout (EAGAIN) or EINTR: the queue is empty for now.
            if stop.load(Ordering::SeqCst) {
                break;
            }
            continue;
        }
        let len = n as usize;
        capture.frames += 1;
        if len > buffer.len() {
            capture.truncated += 1;
        }
        let frame = &buffer[..len.min(buffer.len())];
        if let Some(flow) = tcp_flow(frame) {
            capture.flows.insert(flow);
        }
        for (hits, marker) in capture.marker_hits.iter_mut().zip(markers) {
            if contains(frame, marker) {
                *hits += 1;
            }
        }
    }
    capture
}

/// The TCP flow of an Ethernet frame carrying IPv4 or IPv6, if it is one.
fn tcp_flow(frame: &[u8]) -> Option<Flow> {
    let mut offset = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(offset)?, *frame.get(offset + 1)?]);
    if ethertype == 0x8100 {
        offset += 4;
        ethertype = u16::from_be_bytes([*frame.get(offset)?, *frame.get(offset + 1)?]);
    }
    let ip = frame.get(offset + 2..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            if *ip.get(9)? != libc::IPPROTO_TCP as u8 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let tcp = ip.get(header_len..)?;
            (
                IpAddr::from(Ipv4Addr::from(src)),
                IpAddr::from(Ipv4Addr::from(dst)),
                tcp,
            )
        }
        // The kernel's TCP over IPv6 carries no extension headers here: next header is TCP.
        0x86dd => {
            if *ip.get(6)? != libc::IPPROTO_TCP as u8 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let tcp = ip.get(40..)?;
            (
                IpAddr::from(Ipv6Addr::from(src)),
                IpAddr::from(Ipv6Addr::from(dst)),
                tcp,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    Some(Flow {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let first = needle[0];
    let mut start = 0;
    while let Some(at) = haystack[start..].iter().position(|b| *b == first) {
        let at = start + at;
        if haystack[at..].starts_with(needle) {
            return true;
        }
        start = at + 1;
    }
    false
}
