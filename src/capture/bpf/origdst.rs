//! The accept side of outbound capture: the sockops program filed each redirected connection's
//! original destination under {netns cookie, the app's address and port} before its SYN left, so
//! the connection ztund accepts on 15001 finds it with one lookup keyed by what it already knows
//! (its peer address and its netns), then removes it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};

use aya::Ebpf;
use aya::maps::{HashMap, MapData};

use super::BpfError;
use super::loader::{Slot, take_map};

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `struct ztund_orig` of bpf/ztund.h.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(super) struct Orig {
    addr: [u32; 4],
    port: u16,
    family: u16,
}

/// `struct ztund_tuple` of bpf/ztund.h.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(super) struct Tuple {
    netns_cookie: u64,
    addr: [u32; 4],
    port: u16,
    family: u16,
    pad: u32,
}

/// `struct ztund_slot` of bpf/ztund.h.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct SlotKey {
    netns_cookie: u64,
    slot: u32,
    pad: u32,
}

impl SlotKey {
    pub(super) fn new(netns_cookie: u64, slot: Slot) -> SlotKey {
        SlotKey {
            netns_cookie,
            slot: slot as u32,
            pad: 0,
        }
    }
}

// SAFETY: plain #[repr(C)] integers with explicit padding fields, so every byte is initialised.
unsafe impl aya::Pod for Orig {}
// SAFETY: as above.
unsafe impl aya::Pod for Tuple {}
// SAFETY: as above.
unsafe impl aya::Pod for SlotKey {}

impl Tuple {
    /// The key of a connection whose peer (the app's socket) is `peer`; v4-mapped peers are
    /// filed as IPv4, as the program does.
    fn new(netns_cookie: u64, peer: SocketAddr) -> Tuple {
        let (family, addr) = match crate::net::canonical(peer).ip() {
            IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => (AF_INET6, words(v6)),
        };
        Tuple {
            netns_cookie,
            addr,
            port: peer.port(),
            family,
            pad: 0,
        }
    }
}

/// An IPv6 address as four network-order words, as the kernel's `__u32 ip6[4]`.
fn words(v6: Ipv6Addr) -> [u32; 4] {
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

impl Orig {
    fn addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            AF_INET => IpAddr::V4(Ipv4Addr::from(self.addr[0].to_ne_bytes())),
            AF_INET6 => {
                let mut octets = [0u8; 16];
                for (i, word) in self.addr.iter().enumerate() {
                    octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// The pinned `orig_by_tuple` map.
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, Tuple, Orig>>,
}

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrigDstTable").finish_non_exhaustive()
    }
}

impl OrigDstTable {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<OrigDstTable, BpfError> {
        let map = take_map(ebpf, "orig_by_tuple")?;
        let map = HashMap::try_from(map).map_err(|e| BpfError::map("orig_by_tuple", e))?;
        Ok(OrigDstTable {
            map: Mutex::new(map),
        })
    }

    /// Where the app's connection from `peer` in the netns with `netns_cookie` was headed, and
    /// forgets it (each connection is accepted once). `None`: not a redirected connection.
    pub fn take_destination(
        &self,
        netns_cookie: u64,
        peer: SocketAddr,
    ) -> Result<Option<SocketAddr>, BpfError> {
        let key = Tuple::new(netns_cookie, peer);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key, 0) {
            Ok(orig) => {
                // Best effort: the LRU map evicts it anyway if this fails.
                let _ = map.remove(&key);
                Ok(orig.addr())
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(BpfError::map("orig_by_tuple", e)),
        }
    }
}

/// The table the accept side consults; set while the eBPF backend runs.
static TABLE: RwLock<Option<Arc<OrigDstTable>>> = RwLock::new(None);

/// Makes [`original_destination`] (and so `crate::net::original_destination`) consult `table`;
/// `None` stops it.
pub fn register(table: Option<Arc<OrigDstTable>>) {
    *TABLE.write().unwrap_or_else(|e| e.into_inner()) = table;
}

/// The original destination of an accepted connection that the eBPF programs redirected;
/// `None` when the backend is not running or the connection was not redirected by it (the
/// caller then falls back to `SO_ORIGINAL_DST` and the local address).
pub fn original_destination(stream: &tokio::net::TcpStream) -> Option<io::Result<SocketAddr>> {
    let table = TABLE.read().unwrap_or_else(|e| e.into_inner()).clone()?;
    let found = netns_cookie(stream).and_then(|cookie| Ok((cookie, stream.peer_addr()?)));
    let (cookie, peer) = match found {
        Ok(found) => found,
        Err(e) => return Some(Err(e)),
    };
    table
        .take_destination(cookie, peer)
        .map_err(io::Error::other)
        .transpose()
}

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`).
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call and `len` is `cookie`'s size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<Orig>(), 20);
        assert_eq!(std::mem::size_of::<Tuple>(), 32);
        assert_eq!(std::mem::size_of::<SlotKey>(), 16);
    }

    #[test]
    fn a_v4_mapped_peer_is_keyed_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        let plain: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let (a, b) = (Tuple::new(7, mapped), Tuple::new(7, plain));
        assert_eq!((a.family, a.addr, a.port), (b.family, b.addr, b.port));
        assert_eq!(a.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
    }

    #[test]
    fn an_ipv6_destination_round_trips() {
        let v6: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let orig = Orig {
            addr: words(v6),
            port: 443,
            family: AF_INET6,
        };
        assert_eq!(orig.addr(), Some(SocketAddr::new(IpAddr::V6(v6), 443)));
    }
}
