//! The reply routing of the redirection (PROTOCOL.md §5.5): connmarked replies (0x111) are
//! routed locally, to ztund's transparent sockets, through route table 100. One rule and one
//! route per family; IPv6's only where the namespace has IPv6 (the kernel refuses a v6 route
//! on a device with IPv6 disabled, and such a namespace has no v6 traffic to route).

use super::CaptureError;
use super::nft::run_in;
use crate::net::{Netns, TPROXY_CONNMARK};

/// Routing table that delivers connmarked replies locally.
const ROUTE_TABLE: &str = "100";
const RULE_PREF: &str = "32764";

/// (`ip` family flag, default route) of each family.
const V4: (&str, &str) = ("-4", "0.0.0.0/0");
const V6: (&str, &str) = ("-6", "::/0");

fn rule_mark() -> String {
    format!("{TPROXY_CONNMARK:#x}/0xfff")
}

/// The families whose routing `netns` can hold.
fn families(netns: &Netns) -> Vec<(&'static str, &'static str)> {
    if crate::net::ipv6_enabled(Some(netns)) {
        vec![V4, V6]
    } else {
        vec![V4]
    }
}

/// Installs (or keeps) the rule and route of each family the namespace has.
pub(super) fn install(netns: &Netns) -> Result<(), CaptureError> {
    for (family, default) in families(netns) {
        let route = [
            family,
            "route",
            "replace",
            "local",
            default,
            "dev",
            "lo",
            "table",
            ROUTE_TABLE,
        ];
        run_in(netns, "ip", &route, None)?;
        if !rule_present(netns, family)? {
            let mark = rule_mark();
            let rule = [
                family,
                "rule",
                "add",
                "fwmark",
                &mark,
                "pref",
                RULE_PREF,
                "lookup",
                ROUTE_TABLE,
            ];
            run_in(netns, "ip", &rule, None)?;
        }
    }
    Ok(())
}

/// Removes the rules and routes of both families; succeeds when they are already gone.
pub(super) fn remove(netns: &Netns) -> Result<(), CaptureError> {
    for (family, default) in families(netns) {
        while rule_present(netns, family)? {
            let mark = rule_mark();
            let rule = [
                family,
                "rule",
                "del",
                "pref",
                RULE_PREF,
                "fwmark",
                &mark,
                "lookup",
                ROUTE_TABLE,
            ];
            run_in(netns, "ip", &rule, None)?;
        }
        let route = [
            family,
            "route",
            "del",
            "local",
            default,
            "dev",
            "lo",
            "table",
            ROUTE_TABLE,
        ];
        match run_in(netns, "ip", &route, None) {
            // Already gone: IPv4 says "No such process", IPv6 "No such file or directory".
            Err(CaptureError::Command { stderr, .. })
                if stderr.contains("No such process") || stderr.contains("No such file") => {}
            other => other.map(drop)?,
        }
    }
    Ok(())
}

fn rule_present(netns: &Netns, family: &str) -> Result<bool, CaptureError> {
    let rules = run_in(
        netns,
        "ip",
        &[family, "rule", "show", "pref", RULE_PREF],
        None,
    )?;
    let wanted = format!("fwmark {} lookup {ROUTE_TABLE}", rule_mark());
    Ok(rules.lines().any(|line| line.contains(&wanted)))
}
