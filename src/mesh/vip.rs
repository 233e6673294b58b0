//! Virtual IPs for ServiceEntry hosts that declare no `addresses`: the DNS proxy must answer
//! something an app can connect to, the outbound path must route that address like the
//! ServiceEntry's own, and both must agree on every node and after every restart, or a pod's
//! cached answer would point at nothing once ztund restarts. [`Snapshot`](super::Snapshot)
//! allocates them once per mesh view; the DNS proxy and the route lookup read the same map.
//!
//! **How a VIP is chosen.** Each host name (a wildcard host `*.example.com` as written, so all
//! its subdomains share one VIP) gets a 16-bit slot from an FNV-1a hash of its lowercase name;
//! the VIPs are `240.240.<slot>` (Istio's auto-allocation range `240.240.0.0/16`) and
//! `2001:2::<slot>` (inside `2001:2::/48`). Slots 0 and 65535 are never used (the range's
//! network and broadcast forms). Nothing is stored: the name alone decides, so every node and
//! every restart compute the same VIP from the same mesh.
//!
//! **Collisions** are settled deterministically too: hosts are taken in lexicographic order and
//! each takes the first free slot of its own probe sequence (the hash of `name`, then of
//! `name#1`, `name#2`, ...); a slot already used by a declared service VIP is not free. A host's
//! VIP therefore changes only when a host that sorts before it starts colliding with it, which
//! with 65,534 slots and a few hundred hosts is rare, and then it changes the same way on every
//! node. Knows nothing about sockets or DNS messages.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The two VIPs of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoVip {
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl AutoVip {
    fn from_slot(slot: u16) -> AutoVip {
        let [hi, lo] = slot.to_be_bytes();
        AutoVip {
            v4: Ipv4Addr::new(240, 240, hi, lo),
            v6: Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, slot),
        }
    }

    /// Both addresses, IPv4 first.
    pub fn addresses(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }
}

/// How many probes a host gets before the range is considered full; with at most
/// [`MAX_AUTO_HOSTS`] hosts a free slot is found long before.
const MAX_PROBES: u32 = 1 << 20;
/// More hosts than this without addresses are not given VIPs (the range has 65,534 slots;
/// filling it makes every probe sequence long).
pub const MAX_AUTO_HOSTS: usize = 32_768;

/// 64-bit FNV-1a: tiny, and its output is fixed by its definition (std's `DefaultHasher` is
/// allowed to change between Rust releases, which would move every VIP).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The `attempt`th candidate slot of `host`, never 0 or 65535.
fn candidate(host: &str, attempt: u32) -> u16 {
    let hash = if attempt == 0 {
        fnv1a(host.as_bytes())
    } else {
        fnv1a(format!("{host}#{attempt}").as_bytes())
    };
    // Fold the 64 bits so every bit of the hash counts, then map into 1..=65534.
    let folded = (hash ^ (hash >> 16) ^ (hash >> 32) ^ (hash >> 48)) & 0xffff;
    (folded % 65_534) as u16 + 1
}

/// VIPs for `hosts` (lowercase host names; duplicates are fine), avoiding the slots of the
/// declared VIPs in `taken`. Hosts past [`MAX_AUTO_HOSTS`] (in name order) get none.
pub fn allocate<'a>(
    hosts: impl IntoIterator<Item = &'a str>,
    taken: impl IntoIterator<Item = IpAddr>,
) -> HashMap<String, AutoVip> {
    let hosts: BTreeSet<&str> = hosts.into_iter().collect();
    let mut used: HashSet<u16> = taken.into_iter().filter_map(slot_of).collect();
    let mut out = HashMap::with_capacity(hosts.len());
    for host in hosts.into_iter().take(MAX_AUTO_HOSTS) {
        let free = (0..MAX_PROBES)
            .map(|attempt| candidate(host, attempt))
            .find(|slot| !used.contains(slot));
        if let Some(slot) = free {
            used.insert(slot);
            out.insert(host.to_string(), AutoVip::from_slot(slot));
        }
    }
    out
}

/// The slot an address occupies when it lies in one of the two ranges.
fn slot_of(ip: IpAddr) -> Option<u16> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, hi, lo] = v4.octets();
            (a == 240 && b == 240).then(|| u16::from_be_bytes([hi, lo]))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] == 0x2001 && s[1] == 0x2 && s[2..7] == [0; 5]).then_some(s[7])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_host_gets_the_same_vip_whatever_else_is_asked_with_it() {
        let alone = allocate(["api.example.com"], []);
        let crowd = allocate(["z.example", "api.example.com", "a.example"], []);
        assert_eq!(alone["api.example.com"], crowd["api.example.com"]);
        let vip = alone["api.example.com"];
        assert_eq!(vip.v4.octets()[..2], [240, 240]);
        assert_eq!(vip.v6.segments()[..2], [0x2001, 0x2]);
        assert_eq!(vip.v4.octets()[2..], vip.v6.segments()[7].to_be_bytes());
    }

    #[test]
    fn collisions_are_settled_by_name_order_and_never_share_a_slot() {
        let hosts: Vec<String> = (0..5000).map(|i| format!("h{i}.example")).collect();
        let vips = allocate(hosts.iter().map(String::as_str), []);
        assert_eq!(vips.len(), 5000);
        let distinct: HashSet<Ipv4Addr> = vips.values().map(|v| v.v4).collect();
        assert_eq!(distinct.len(), 5000, "two hosts share a VIP");
        let again = allocate(hosts.iter().rev().map(String::as_str), []);
        assert_eq!(vips, again, "input order changed the allocation");
    }

    #[test]
    fn a_declared_vip_in_the_range_is_never_handed_out() {
        let first = allocate(["db.example"], [])["db.example"];
        let moved = allocate(["db.example"], [IpAddr::V4(first.v4)])["db.example"];
        assert_ne!(first, moved);
        let v6_taken = allocate(["db.example"], [IpAddr::V6(first.v6)])["db.example"];
        assert_eq!(moved, v6_taken);
    }
}
