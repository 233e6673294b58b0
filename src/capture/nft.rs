//! The traffic redirection ztund installs itself: per pod namespace in standalone mode (the same
//! effect as istio-cni's rules, PROTOCOL.md §5.5, in the nftables form TESTBED.md verified), and
//! in the host namespace on a VM host. Runs `nft` and `ip` inside a given namespace; knows nothing
//! about pods or listeners.
//!
//! Both families in one `inet` table: `tproxy` and `redirect` work for IPv6 there on the
//! kernels ztund runs on (checked by hand, TESTBED.md, and by the v6 tests on the testbed). The
//! IPv6 rules are harmless in a namespace with IPv6 disabled (no v6 packet ever matches); only
//! the reply routing (`super::routing`) has to know whether the namespace has IPv6.
//! Other tables (the DNS rules, anyone else's) are never touched: only `ztund` is replaced.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use super::CaptureError;
use super::routing;
use crate::net::{Netns, TPROXY_CONNMARK, ZTUND_MARK};

/// nftables table holding every ztund rule of a namespace.
const TABLE: &str = "ztund";
/// The nftables sets (in [`TABLE`]) of the addresses a VM host's outbound traffic is redirected
/// for: every mesh workload address and service VIP, one set per family (a set holds one type).
pub const MESH_SET: &str = "mesh_destinations";
pub const MESH_SET_V6: &str = "mesh_destinations6";
/// kubelet probes arrive SNATed to this address and must reach the app directly; the second is
/// Istio's IPv6 probe source (PROTOCOL.md §5.5).
const PROBE_SOURCE: &str = "169.254.7.127";
const PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// The ports traffic is redirected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectPorts {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
}

impl Default for RedirectPorts {
    fn default() -> Self {
        RedirectPorts {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: 15008,
        }
    }
}

impl From<&crate::config::Ports> for RedirectPorts {
    fn from(ports: &crate::config::Ports) -> Self {
        RedirectPorts {
            outbound: ports.outbound,
            inbound_plaintext: ports.inbound_plaintext,
            hbone: ports.hbone,
        }
    }
}

/// Host mode: the host's own processes are the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRedirection {
    pub ports: RedirectPorts,
    /// Inbound ports left alone (besides HBONE), so that a stopped ztund does not lock
    /// operators out; 22 by default.
    pub exempt_inbound_ports: Vec<u16>,
}

impl Default for HostRedirection {
    fn default() -> Self {
        HostRedirection {
            ports: RedirectPorts::default(),
            exempt_inbound_ports: vec![22],
        }
    }
}

/// Fails with a message naming the package when `nft` or `ip` is missing.
pub fn check_tools() -> Result<(), CaptureError> {
    for (binary, package) in [("nft", "nftables"), ("ip", "iproute2")] {
        match Command::new(binary)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CaptureError::MissingTool { binary, package });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The nftables script for a pod namespace, both families. Applying it replaces any earlier
/// ztund table (also the `ip` table older ztund versions installed).
/// Each `tproxy` rule is followed by a `drop` of the same packets: `tproxy` finds no socket when
/// ztund is down (a crash, between a stop and a restart) and then falls through, which would
/// hand the app plaintext past a STRICT policy; dropped, the pod fails closed.
pub fn pod_ruleset(ports: &RedirectPorts) -> String {
    let RedirectPorts {
        outbound,
        inbound_plaintext,
        hbone,
    } = *ports;
    let m = Marks::default();
    let Marks {
        is_ztund,
        not_ztund,
        set_tproxy,
        is_tproxy,
        tag_connection,
    } = &m;
    // `tproxy to :port` without a family follows the packet's family in an `inet` table; after
    // an `ip`/`ip6` match nft wants the family named.
    let [not_local4, not_local6] = NOT_LOOPBACK;
    format!(
        "{replace}
table inet {TABLE} {{
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    {is_ztund} {tag_connection}
    ip saddr {PROBE_SOURCE} meta l4proto tcp accept
    ip6 saddr {PROBE_SOURCE_V6} meta l4proto tcp accept
    iifname \"lo\" {not_local4} meta l4proto tcp accept
    iifname \"lo\" {not_local6} meta l4proto tcp accept
    tcp dport {hbone} {not_ztund} {set_tproxy} tproxy to :{hbone} accept
    tcp dport {hbone} {not_ztund} drop
    meta l4proto tcp ct state established,related accept
    {not_local4} meta l4proto tcp {not_ztund} {set_tproxy} tproxy ip to :{inbound_plaintext} accept
    {not_local4} meta l4proto tcp {not_ztund} drop
    {not_local6} meta l4proto tcp {not_ztund} {set_tproxy} tproxy ip6 to :{inbound_plaintext} accept
    {not_local6} meta l4proto tcp {not_ztund} drop
  }}
  chain output_mangle {{
    type route hook output priority mangle; policy accept;
    {is_tproxy_ct} meta mark set ct mark
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    ip daddr {PROBE_SOURCE} meta l4proto tcp accept
    ip6 daddr {PROBE_SOURCE_V6} meta l4proto tcp accept
    meta l4proto tcp {is_tproxy} accept
    oifname \"lo\" {not_local4} accept
    oifname \"lo\" {not_local6} accept
    {not_local4} meta l4proto tcp {not_ztund} redirect to :{outbound}
    {not_local6} meta l4proto tcp {not_ztund} redirect to :{outbound}
  }}
}}
",
        replace = replace_table(),
        is_tproxy_ct = m.is_tproxy_ct(),
    )
}

/// The loopback address of each family, excluded from capture.
const NOT_LOOPBACK: [&str; 2] = ["ip daddr != 127.0.0.1", "ip6 daddr != ::1"];

/// The nftables script for a VM host's own namespace: outbound TCP of the host's processes to a
/// mesh destination (an address in the `mesh_destinations` sets, [`MESH_SET`] and
/// [`MESH_SET_V6`]) goes to the outbound listener, except ztund's marked sockets and
/// local/loopback traffic; new TCP connections to the host's own addresses go to the inbound
/// plaintext listener (except HBONE and the exempt ports); forwarded traffic is left alone.
///
/// Only mesh destinations are redirected because for any other address the outbound proxy's
/// plan is a plain passthrough anyway (`proxy::route::plan`); redirecting it gains nothing and,
/// when ztund dies with its rules in place, refuses every connection the host makes. With the
/// set, a crashed ztund fails closed only for the traffic policy governs.
///
/// Inbound, the `tproxy` rule is followed by a `drop` as in [`pod_ruleset`]: with no ztund
/// listening it finds no socket and would fall through, handing the host's apps plaintext past
/// a STRICT policy. The exempt ports (SSH by default) stay reachable whatever happens to ztund.
/// Both act on connection openings only: the host's connections already open when the table
/// arrives (ztund's own xDS stream among them) are picked up by conntrack mid-stream, their
/// first packet not yet `established`; `tproxy` does not match a non-transparent socket, so the
/// drop would cut them.
pub fn host_ruleset(host: &HostRedirection, mesh_destinations: &[IpAddr]) -> String {
    let RedirectPorts {
        outbound,
        inbound_plaintext,
        hbone,
    } = host.ports;
    let m = Marks::default();
    let Marks {
        is_ztund,
        not_ztund,
        set_tproxy,
        is_tproxy,
        tag_connection,
    } = &m;
    let mut exempt: Vec<String> = vec![hbone.to_string()];
    exempt.extend(host.exempt_inbound_ports.iter().map(u16::to_string));
    let exempt = exempt.join(", ");
    let elements = |v6: bool| match element_list(mesh_destinations, v6) {
        Some(list) => format!("\n    elements = {{ {list} }}"),
        None => String::new(),
    };
    format!(
        "{replace}
table inet {TABLE} {{
  set {MESH_SET} {{
    type ipv4_addr;{elements4}
  }}
  set {MESH_SET_V6} {{
    type ipv6_addr;{elements6}
  }}
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    {is_ztund} {tag_connection}
    iifname \"lo\" accept
    fib daddr type != local accept
    meta l4proto tcp ct state established,related accept
    tcp dport {{ {exempt} }} accept
    {new_connection} {not_ztund} {set_tproxy} tproxy to :{inbound_plaintext} accept
    {new_connection} {not_ztund} drop
  }}
  chain output_mangle {{
    type route hook output priority mangle; policy accept;
    {is_tproxy_ct} meta mark set ct mark
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta l4proto tcp {is_tproxy} accept
    {is_ztund} accept
    oifname \"lo\" accept
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    ip daddr @{MESH_SET} meta l4proto tcp redirect to :{outbound}
    ip6 daddr @{MESH_SET_V6} meta l4proto tcp redirect to :{outbound}
  }}
}}
",
        replace = replace_table(),
        is_tproxy_ct = m.is_tproxy_ct(),
        new_connection = "tcp flags & (fin | syn | rst | ack) == syn",
        elements4 = elements(false),
        elements6 = elements(true),
    )
}

/// The script that replaces the host's sets of mesh destinations in one transaction (a
/// connection never sees a half-updated set).
pub fn mesh_destinations_update(mesh_destinations: &[IpAddr]) -> String {
    let mut script = String::new();
    for (set, v6) in [(MESH_SET, false), (MESH_SET_V6, true)] {
        script.push_str(&format!("flush set inet {TABLE} {set}\n"));
        if let Some(list) = element_list(mesh_destinations, v6) {
            script.push_str(&format!("add element inet {TABLE} {set} {{ {list} }}\n"));
        }
    }
    script
}

/// `a, b, c` of one family (sorted, without duplicates, which nft refuses; v4-mapped IPv6
/// addresses count as IPv4), or `None` for no address (an empty `elements = { }` is a syntax
/// error).
fn element_list(addresses: &[IpAddr], v6: bool) -> Option<String> {
    let unique: std::collections::BTreeSet<IpAddr> = addresses
        .iter()
        .map(|a| a.to_canonical())
        .filter(|a| a.is_ipv6() == v6)
        .collect();
    if unique.is_empty() {
        return None;
    }
    let list: Vec<String> = unique.iter().map(|a| a.to_string()).collect();
    Some(list.join(", "))
}

/// nftables matches on the low 12 bits of marks, leaving the rest to other software.
struct Marks {
    is_ztund: String,
    not_ztund: String,
    set_tproxy: String,
    is_tproxy: String,
    tag_connection: String,
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            is_ztund: format!("meta mark & 0xfff == {ZTUND_MARK:#x}"),
            not_ztund: format!("meta mark & 0xfff != {ZTUND_MARK:#x}"),
            set_tproxy: format!("meta mark set meta mark & 0xfffff000 | {TPROXY_CONNMARK:#x}"),
            is_tproxy: format!("meta mark & 0xfff == {TPROXY_CONNMARK:#x}"),
            tag_connection: format!("ct mark set ct mark & 0xfffff000 | {TPROXY_CONNMARK:#x}"),
        }
    }
}

impl Marks {
    fn is_tproxy_ct(&self) -> String {
        format!("ct mark & 0xfff == {TPROXY_CONNMARK:#x}")
    }
}

/// Creating then deleting the table first makes one atomic `nft -f` replace whatever was there:
/// the `inet` table, and the IPv4-only `ip` table of ztund versions before IPv6 (adopted on an
/// upgrade, never left behind next to the new one).
fn replace_table() -> String {
    format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable inet {TABLE} {{}}\ndelete table inet {TABLE}"
    )
}

/// Installs (or replaces) the pod redirection in `netns`.
pub fn install_pod_redirection(netns: &Netns, ports: &RedirectPorts) -> Result<(), CaptureError> {
    apply_nft(netns, &pod_ruleset(ports))?;
    routing::install(netns)
}

/// Installs (or replaces, adopting what an earlier ztund left) the host-mode redirection in
/// `netns` (the host's own namespace), redirecting `mesh_destinations`.
pub fn install_host_redirection(
    netns: &Netns,
    host: &HostRedirection,
    mesh_destinations: &[IpAddr],
) -> Result<(), CaptureError> {
    apply_nft(netns, &host_ruleset(host, mesh_destinations))?;
    routing::install(netns)
}

/// Replaces the sets of mesh destinations the host redirects (after a mesh change).
pub fn update_mesh_destinations(
    netns: &Netns,
    mesh_destinations: &[IpAddr],
) -> Result<(), CaptureError> {
    apply_nft(netns, &mesh_destinations_update(mesh_destinations))
}

/// Removes everything host mode installed (nft table, ip rules, route tables) so that a stopped
/// ztund leaves the host's network as it found it. Succeeds when it is already gone.
pub fn remove_host_redirection(netns: &Netns) -> Result<(), CaptureError> {
    remove_redirection(netns)
}

/// Removes ztund's table, rules and routes from `netns`; succeeds when they are already gone.
pub fn remove_redirection(netns: &Netns) -> Result<(), CaptureError> {
    apply_nft(netns, &replace_table())?;
    routing::remove(netns)
}

/// Whether `netns` has ztund's nftables table.
pub fn redirection_installed(netns: &Netns) -> Result<bool, CaptureError> {
    match run_in(netns, "nft", &["list", "table", "inet", TABLE], None) {
        Ok(_) => Ok(true),
        Err(CaptureError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) fn apply_nft(netns: &Netns, script: &str) -> Result<(), CaptureError> {
    run_in(netns, "nft", &["-f", "-"], Some(script)).map(drop)
}

/// Runs a tool inside `netns` (the child `setns`es before exec) and returns its stdout.
pub(super) fn run_in(
    netns: &Netns,
    binary: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CaptureError> {
    let command_text = format!("{binary} {}", args.join(" "));
    let spawn_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CaptureError::MissingTool {
                binary,
                package: package_of(binary),
            }
        } else {
            CaptureError::Spawn {
                command: command_text.clone(),
                netns: netns.describe(),
                source,
            }
        }
    };
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A VM host's namespace is the daemon's own: no setns, so host mode needs neither
    // CAP_SYS_ADMIN nor a seccomp/namespace allowance for it (systemd's RestrictNamespaces).
    let elsewhere = !Netns::current().is_ok_and(|here| here == *netns);
    if elsewhere {
        crate::net::enter_before_exec(&mut command, netns);
    }
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        return Err(CaptureError::Command {
            command: command_text,
            netns: netns.describe(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn package_of(binary: &str) -> &'static str {
    match binary {
        "nft" => "nftables",
        _ => "iproute2",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ruleset_matches_the_verified_shape_in_both_families() {
        let text = pod_ruleset(&RedirectPorts::default());
        for line in [
            "meta mark & 0xfff == 0x539 ct mark set ct mark & 0xfffff000 | 0x111",
            "ip saddr 169.254.7.127 meta l4proto tcp accept",
            "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff meta l4proto tcp accept",
            "iifname \"lo\" ip daddr != 127.0.0.1 meta l4proto tcp accept",
            "iifname \"lo\" ip6 daddr != ::1 meta l4proto tcp accept",
            "tcp dport 15008 meta mark & 0xfff != 0x539 meta mark set meta mark & 0xfffff000 | 0x111 tproxy to :15008 accept",
            "tproxy to :15008 accept\n    tcp dport 15008 meta mark & 0xfff != 0x539 drop",
            "ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 meta mark set meta mark & 0xfffff000 | 0x111 tproxy ip to :15006 accept\n    ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 drop",
            "ip6 daddr != ::1 meta l4proto tcp meta mark & 0xfff != 0x539 meta mark set meta mark & 0xfffff000 | 0x111 tproxy ip6 to :15006 accept\n    ip6 daddr != ::1 meta l4proto tcp meta mark & 0xfff != 0x539 drop",
            "ct mark & 0xfff == 0x111 meta mark set ct mark",
            "ip daddr 169.254.7.127 meta l4proto tcp accept",
            "ip6 daddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff meta l4proto tcp accept",
            "oifname \"lo\" ip6 daddr != ::1 accept",
            "ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001",
            "ip6 daddr != ::1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Replaces the table of either family, and only ztund's (the DNS rules live elsewhere).
        assert!(text.starts_with(
            "table ip ztund {}\ndelete table ip ztund\ntable inet ztund {}\ndelete table inet ztund\ntable inet ztund {"
        ));
        assert!(!text.contains("flush ruleset"), "{text}");
    }

    #[test]
    fn host_ruleset_exempts_hbone_and_listed_ports() {
        let host = HostRedirection {
            ports: RedirectPorts::default(),
            exempt_inbound_ports: vec![22, 9100],
        };
        let text = host_ruleset(&host, &[]);
        assert!(!text.contains("elements"), "{text}");
        assert!(
            text.contains("tcp dport { 15008, 22, 9100 } accept"),
            "{text}"
        );
        assert!(text.contains("meta mark & 0xfff == 0x539 accept"), "{text}");
        for line in [
            "ip daddr @mesh_destinations meta l4proto tcp redirect to :15001",
            "ip6 daddr @mesh_destinations6 meta l4proto tcp redirect to :15001",
            "ip daddr 127.0.0.0/8 accept\n    ip6 daddr ::1 accept",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // With ztund down, inbound fails closed instead of falling through to the apps.
        assert!(
            text.contains(
                "tproxy to :15006 accept\n    tcp flags & (fin | syn | rst | ack) == syn meta mark & 0xfff != 0x539 drop"
            ),
            "{text}"
        );
    }

    #[test]
    fn mesh_destinations_are_split_by_family_listed_once_and_replaced_atomically() {
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.1".parse().unwrap();
        let c: IpAddr = "fd00::3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let text = host_ruleset(&HostRedirection::default(), &[a, b, c, a, mapped]);
        assert!(
            text.contains("type ipv4_addr;\n    elements = { 10.0.0.1, 10.0.0.2 }"),
            "{text}"
        );
        assert!(
            text.contains("type ipv6_addr;\n    elements = { fd00::3 }"),
            "{text}"
        );
        assert_eq!(
            mesh_destinations_update(&[a]),
            "flush set inet ztund mesh_destinations\nadd element inet ztund mesh_destinations { 10.0.0.2 }\nflush set inet ztund mesh_destinations6\n"
        );
        assert_eq!(
            mesh_destinations_update(&[c]),
            "flush set inet ztund mesh_destinations\nflush set inet ztund mesh_destinations6\nadd element inet ztund mesh_destinations6 { fd00::3 }\n"
        );
    }

    #[test]
    fn tools_are_installed_here() {
        check_tools().unwrap();
    }
}
