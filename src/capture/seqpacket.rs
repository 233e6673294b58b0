//! A `SOCK_SEQPACKET` unix socket on tokio: one message per packet, file descriptors passed as
//! `SCM_RIGHTS`. Both ZDS sides use it; it knows nothing about what the packets mean.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The largest message either side accepts (PROTOCOL.md §5.1).
pub const MAX_PACKET: usize = 1024;
/// Room for every fd one message can carry: Linux caps SCM_RIGHTS at 253 (SCM_MAX_FD) per
/// message. With less room the kernel cuts the list (MSG_CTRUNC) and the control data no longer
/// parses, so the fds it did install could not be closed and the session ended; with this
/// room every fd arrives, is counted by `zds::validate`, and is closed on refusal.
const MAX_FDS: usize = 253;

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// The message or its control data did not fit (MSG_TRUNC / MSG_CTRUNC).
    pub truncated: bool,
}

/// A connected SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and unchanged while registered.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn new_socket() -> io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)
}

impl SeqPacket {
    /// Connects to a listening SEQPACKET socket at `path`.
    pub fn connect(path: &Path) -> io::Result<SeqPacket> {
        let fd = new_socket()?;
        let addr = UnixAddr::new(path).map_err(errno)?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(errno)?;
        Ok(SeqPacket { fd: register(fd)? })
    }

    fn from_fd(fd: OwnedFd) -> io::Result<SeqPacket> {
        Ok(SeqPacket { fd: register(fd)? })
    }

    /// The uid of the process at the other end (`SO_PEERCRED`, taken when it connected).
    pub fn peer_uid(&self) -> io::Result<u32> {
        let credentials = socket::getsockopt(self.fd.get_ref(), socket::sockopt::PeerCredentials)
            .map_err(errno)?;
        Ok(credentials.uid())
    }

    /// Sends one packet with `fds` attached.
    pub async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [IoSlice::new(bytes)];
                let rights = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
                socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(errno)
            })
            .await
            .map(drop)
    }

    /// Receives one packet; `None` when the peer closed the connection.
    pub async fn recv(&self) -> io::Result<Option<Packet>> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                let mut buffer = vec![0u8; MAX_PACKET];
                let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let message = socket::recvmsg::<()>(
                    fd.as_raw_fd(),
                    &mut iov,
                    Some(&mut control),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(errno)?;
                let mut fds = Vec::new();
                for cmsg in message.cmsgs().map_err(errno)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just installed these fds for us; nobody else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let truncated = message
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                let len = message.bytes;
                Ok((len, fds, truncated, buffer))
            })
            .await
            .map(|(len, fds, truncated, mut buffer)| {
                if len == 0 && fds.is_empty() && !truncated {
                    return None;
                }
                buffer.truncate(len);
                Some(Packet {
                    bytes: buffer,
                    fds,
                    truncated,
                })
            })
    }
}

/// A listening SEQPACKET socket (the CNI side).
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    /// Binds `path`, replacing a stale socket file left by an earlier run.
    pub fn bind(path: &Path) -> io::Result<SeqPacketListener> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let fd = new_socket()?;
        let addr = UnixAddr::new(path).map_err(errno)?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(errno)?;
        socket::listen(&fd, Backlog::new(16).map_err(errno)?).map_err(errno)?;
        Ok(SeqPacketListener { fd: register(fd)? })
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<SeqPacket> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |fd| {
                socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )
                .map_err(errno)
            })
            .await?;
        // SAFETY: accept4 returned a fresh fd that nothing else owns.
        SeqPacket::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
