//! The port-53 redirection to the DNS proxy, in its own nftables table (`inet ztund_dns`)
//! beside ztund's main table (`capture::nft`), installed and removed on its own: DNS capture can
//! be turned on and off without touching the traffic rules, and one `inet` table covers both
//! families.
//!
//! What it does (PROTOCOL.md §5.5, istio-cni's DNS rules): UDP and TCP to port 53 leaving
//! through any interface but `lo` go to the DNS proxy's port (the kernel's `redirect` picks
//! `127.0.0.1` or `::1`), except ztund's own sockets (mark 0x539): the proxy's upstream queries
//! go out as they are. Its NAT chain runs at priority -110, before the main table's (-100), so a
//! TCP query is redirected to the DNS proxy, never to the outbound listener: the first NAT
//! chain that maps a connection decides it.
//!
//! In a pod, queries to a resolver on loopback stay where they go (a sidecar's own resolver). On
//! a VM host ([`install_host_dns_redirection`]) they are captured too: the host's resolv.conf
//! usually names a stub on loopback (systemd-resolved's `127.0.0.53`, or `::1`), so every query
//! of the host's processes goes there; ztund's own forwards to that stub carry the mark and
//! still reach it.

use super::CaptureError;
use crate::net::{Netns, ZTUND_MARK};

/// The table's name (family `inet`).
pub const DNS_TABLE: &str = "ztund_dns";
/// Runs before the main table's `output_nat` (priority -100).
const NAT_PRIORITY: i32 = -110;

/// The nftables script redirecting a pod's port 53 to `dns_port`; replaces any earlier copy.
pub fn dns_ruleset(dns_port: u16) -> String {
    ruleset(dns_port, "oifname != \"lo\" ")
}

/// [`dns_ruleset`] for a VM host: loopback-destined queries (the stub resolver) too.
pub fn host_dns_ruleset(dns_port: u16) -> String {
    ruleset(dns_port, "")
}

fn ruleset(dns_port: u16, interfaces: &str) -> String {
    format!(
        "{replace}
table inet {DNS_TABLE} {{
  chain output_nat {{
    type nat hook output priority {NAT_PRIORITY}; policy accept;
    meta mark & 0xfff == {ZTUND_MARK:#x} accept
    {interfaces}meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
  }}
}}
",
        replace = replace_table(),
    )
}

/// Creating then deleting the table first makes one atomic `nft -f` replace whatever was there.
fn replace_table() -> String {
    format!("table inet {DNS_TABLE} {{}}\ndelete table inet {DNS_TABLE}")
}

/// Installs (or replaces) the DNS redirection in `netns`.
pub fn install_dns_redirection(netns: &Netns, dns_port: u16) -> Result<(), CaptureError> {
    super::nft::apply_nft(netns, &dns_ruleset(dns_port))
}

/// Installs (or replaces) a VM host's DNS redirection in `netns`, loopback stubs included.
pub fn install_host_dns_redirection(netns: &Netns, dns_port: u16) -> Result<(), CaptureError> {
    super::nft::apply_nft(netns, &host_dns_ruleset(dns_port))
}

/// Removes the DNS redirection from `netns`; succeeds when it is already gone.
pub fn remove_dns_redirection(netns: &Netns) -> Result<(), CaptureError> {
    super::nft::apply_nft(netns, &replace_table())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_exempts_ztund_and_runs_before_the_main_table() {
        let rules = dns_ruleset(15053);
        assert!(rules.starts_with("table inet ztund_dns {}\ndelete table inet ztund_dns\n"));
        assert!(rules.contains("priority -110;"));
        let exempt = rules.find("== 0x539 accept").unwrap();
        let redirect = rules.find("redirect to :15053").unwrap();
        assert!(
            exempt < redirect,
            "ztund's own queries must be exempt first"
        );
        assert!(rules.contains("oifname != \"lo\" meta l4proto"), "{rules}");
    }

    #[test]
    fn the_host_ruleset_also_captures_loopback_and_still_exempts_ztund() {
        let rules = host_dns_ruleset(15053);
        assert!(!rules.contains("oifname"), "{rules}");
        let exempt = rules.find("== 0x539 accept").unwrap();
        let redirect = rules
            .find("meta l4proto { tcp, udp } th dport 53 redirect to :15053")
            .unwrap();
        assert!(exempt < redirect, "{rules}");
    }
}
