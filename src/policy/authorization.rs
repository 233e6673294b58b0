//! The L4 authorization model exactly as istiod sends it to ztunnel (`istio.security.Authorization`,
//! PROTOCOL.md §3.5), and how one connection is matched against it (§4.2). Knows nothing about YAML:
//! the reader in `mesh::k8s::security` and a future xDS client both produce these types.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::identity::SpiffeId;

/// Which workloads a policy reaches, as in `istio.security.Scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every workload in the mesh (an AuthorizationPolicy without selector in the root namespace).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Only the workloads that reference the policy (by label selector, or for PeerAuthentication).
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// One authorization policy: matches when any of its rules matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// OR; a policy without rules never matches.
    pub rules: Vec<Rule>,
    /// Only logged, never enforced.
    pub dry_run: bool,
    /// What the source policy asked that cannot be seen at L4 (HTTP attributes), each as
    /// `field: how it was applied`, for `ztund check`. Empty for policies from xDS: istiod has
    /// already applied them the same way.
    pub not_enforced: Vec<String>,
}

impl Authorization {
    /// The xDS key, `namespace/name`, which deny reasons and `ztund check` print.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the connection matches this policy (regardless of its action).
    pub fn matches(&self, conn: &ConnectionFacts) -> bool {
        self.matches_facts(&conn.facts())
    }

    /// A policy without rules never matches.
    pub(crate) fn matches_facts(&self, facts: &Facts<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(facts))
    }
}

/// A rule holds when all of its clauses hold; a rule without clauses always holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

impl Rule {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        self.clauses.iter().all(|clause| clause.matches(facts))
    }
}

/// A clause holds when any of its non-empty matches holds; a clause without matches holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clause {
    pub matches: Vec<Match>,
}

impl Clause {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        // An all-empty match is skipped rather than counted as true: ztunnel does the same, so a
        // clause made only of empty matches never holds.
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| !m.is_empty() && m.matches(facts))
    }
}

/// Conditions on one connection; every non-empty field must hold. Positive lists need one entry
/// to match, `not_*` lists need none to match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Cidr>,
    pub not_source_ips: Vec<Cidr>,
    pub destination_ips: Vec<Cidr>,
    pub not_destination_ips: Vec<Cidr>,
    /// Compared with the target port (the application's port), never 15008.
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

impl Match {
    /// True when no field is set; such a match is skipped by its clause.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }

    fn matches(&self, facts: &Facts<'_>) -> bool {
        holds(&self.namespaces, &self.not_namespaces, |m| {
            facts.namespace.is_some_and(|ns| m.matches(ns))
        }) && holds(&self.principals, &self.not_principals, |m| {
            facts.principal.as_deref().is_some_and(|p| m.matches(p))
        }) && holds(&self.source_ips, &self.not_source_ips, |c| {
            c.contains(facts.source_ip)
        }) && holds(&self.destination_ips, &self.not_destination_ips, |c| {
            c.contains(facts.destination_ip)
        }) && holds(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == facts.destination_port
        }) && holds(&self.service_accounts, &self.not_service_accounts, |sa| {
            facts.identity.is_some_and(|id| sa.matches(id))
        })
    }
}

/// An empty positive list holds; a non-empty one needs a hit. A `not_` list needs no hit.
fn holds<T>(positive: &[T], negative: &[T], test: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&test)) && !negative.iter().any(&test)
}

/// `istio.security.StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// The AuthorizationPolicy value syntax: `*` presence, `*x` suffix, `x*` prefix, else exact.
    pub fn from_pattern(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(v) => write!(f, "{v}"),
            StringMatch::Prefix(v) => write!(f, "{v}*"),
            StringMatch::Suffix(v) => write!(f, "*{v}"),
            StringMatch::Presence => write!(f, "*"),
        }
    }
}

/// `istio.security.ServiceAccountMatch`: namespace and service account; the trust domain is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.service_account
    }
}

/// An address block: `10.0.0.0/8`, or one address (`10.1.2.3` is `/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    address: IpAddr,
    prefix_len: u8,
}

/// Why a string is not an address block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not an IP address or CIDR block")]
pub struct CidrError {
    pub value: String,
}

impl Cidr {
    /// A block from an address and a prefix length no longer than the address (HARDENING Y4).
    /// Host bits are cleared (`10.0.0.1/8` is `10.0.0.0/8`, as Istio reads it). An IPv4-mapped
    /// block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps, its length less 96: kept at 104
    /// against an IPv4 address, its mask would be all zeros and it would contain every address.
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return None;
        }
        let (address, prefix_len) = match address {
            IpAddr::V6(v6) if prefix_len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (address.to_canonical(), prefix_len - 96)
            }
            other => (other, prefix_len),
        };
        let address = match address {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask_v4(prefix_len))),
            IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask_v6(prefix_len))),
        };
        Some(Cidr {
            address,
            prefix_len,
        })
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies in the block; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(net) == u32::from(ip) & mask_v4(self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(net) == u128::from(ip) & mask_v6(self.prefix_len)
            }
            _ => false,
        }
    }
}

/// The netmask of an IPv4 prefix length (0..=32).
fn mask_v4(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix_len)))
        .unwrap_or(0)
}

/// The netmask of an IPv6 prefix length (0..=128).
fn mask_v6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix_len)))
        .unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = || CidrError {
            value: value.to_string(),
        };
        let (address, prefix_len) = match value.split_once('/') {
            Some((address, len)) => {
                let address: IpAddr = address.parse().map_err(|_| error())?;
                let len: u8 = len.parse().map_err(|_| error())?;
                (address, len)
            }
            None => {
                let address: IpAddr = value.parse().map_err(|_| error())?;
                (address, if address.is_ipv4() { 32 } else { 128 })
            }
        };
        Cidr::new(address, prefix_len).ok_or_else(error)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// What is known about one connection when it is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// The TCP peer.
    pub source_ip: IpAddr,
    /// The peer's proven identity; `None` for plaintext.
    pub source_identity: Option<SpiffeId>,
    /// The destination workload's address.
    pub destination_ip: IpAddr,
    /// The target port (the application's), not 15008.
    pub destination_port: u16,
}

impl ConnectionFacts {
    /// The attributes in the shape matches compare them, computed once per decision.
    pub(crate) fn facts(&self) -> Facts<'_> {
        Facts::of(self)
    }
}

/// The connection attributes in the shape the matches compare them.
pub(crate) struct Facts<'a> {
    identity: Option<&'a SpiffeId>,
    principal: Option<String>,
    namespace: Option<&'a str>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Facts<'a> {
    fn of(conn: &'a ConnectionFacts) -> Facts<'a> {
        let identity = conn.source_identity.as_ref();
        Facts {
            identity,
            principal: identity.map(SpiffeId::principal),
            namespace: identity.map(SpiffeId::namespace),
            source_ip: conn.source_ip,
            destination_ip: conn.destination_ip,
            destination_port: conn.destination_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plaintext() -> ConnectionFacts {
        ConnectionFacts {
            source_ip: "10.0.0.1".parse().unwrap(),
            source_identity: None,
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8080,
        }
    }

    fn with_identity() -> ConnectionFacts {
        ConnectionFacts {
            source_identity: Some(SpiffeId::new("cluster.local", "default", "sleep").unwrap()),
            ..plaintext()
        }
    }

    fn policy(rules: Vec<Rule>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action: Action::Allow,
            rules,
            dry_run: false,
            not_enforced: Vec::new(),
        }
    }

    fn one_clause(matches: Vec<Match>) -> Authorization {
        policy(vec![Rule {
            clauses: vec![Clause { matches }],
        }])
    }

    #[test]
    fn xds_shapes_match_as_ztunnel_does() {
        let conn = with_identity();
        assert!(!policy(vec![]).matches(&conn), "no rules never matches");
        assert!(
            policy(vec![Rule::default()]).matches(&conn),
            "a rule without clauses matches"
        );
        assert!(
            one_clause(vec![]).matches(&conn),
            "a clause without matches holds"
        );
        assert!(
            !one_clause(vec![Match::default()]).matches(&conn),
            "an all-empty match is skipped"
        );
        let port = Match {
            destination_ports: vec![8080],
            ..Match::default()
        };
        assert!(one_clause(vec![Match::default(), port]).matches(&conn));
    }

    #[test]
    fn identity_fields_without_identity() {
        let presence = vec![StringMatch::Presence];
        let no_principal = one_clause(vec![Match {
            not_principals: presence.clone(),
            ..Match::default()
        }]);
        assert!(no_principal.matches(&plaintext()));
        assert!(!no_principal.matches(&with_identity()));
        let any_namespace = one_clause(vec![Match {
            namespaces: presence,
            ..Match::default()
        }]);
        assert!(!any_namespace.matches(&plaintext()));
        assert!(any_namespace.matches(&with_identity()));
        let not_sleep = one_clause(vec![Match {
            not_service_accounts: vec![ServiceAccountMatch {
                namespace: "default".into(),
                service_account: "sleep".into(),
            }],
            ..Match::default()
        }]);
        assert!(not_sleep.matches(&plaintext()));
        assert!(!not_sleep.matches(&with_identity()));
    }

    #[test]
    fn principals_are_compared_without_the_scheme() {
        let exact = |p: &str| {
            one_clause(vec![Match {
                principals: vec![StringMatch::from_pattern(p)],
                ..Match::default()
            }])
        };
        assert!(exact("cluster.local/ns/default/sa/sleep").matches(&with_identity()));
        assert!(!exact("spiffe://cluster.local/ns/default/sa/sleep").matches(&with_identity()));
        assert!(exact("*/sa/sleep").matches(&with_identity()));
        assert!(exact("cluster.local/*").matches(&with_identity()));
    }

    // HARDENING T2 (and ISTIO-SECURITY-2026-003): principals and namespaces match literally; a
    // dot, a regex or glob character in a policy value is itself, never a pattern.
    #[test]
    fn principals_and_namespaces_never_match_as_regex_or_glob() {
        let principal = |p: &str| {
            one_clause(vec![Match {
                principals: vec![StringMatch::from_pattern(p)],
                ..Match::default()
            }])
        };
        let namespace = |n: &str| {
            one_clause(vec![Match {
                namespaces: vec![StringMatch::from_pattern(n)],
                ..Match::default()
            }])
        };
        let sleep = with_identity();
        for pattern in [
            "cluster.local/ns/default/sa/sle.p",
            "cluster.local/ns/default/sa/sle?p",
            "cluster.local/ns/default/sa/[s]leep",
            "cluster.local/ns/def*ult/sa/sleep",
            "cluster.local/ns/default/sa/sleep$",
            "^cluster.local/ns/default/sa/sleep",
            "cluster.local/ns/default/sa/sleep.*",
            "cluster.local/ns/default/sa/SLEEP",
        ] {
            assert!(!principal(pattern).matches(&sleep), "{pattern} matched");
        }
        for pattern in [
            "d.fault",
            "def*ult",
            "de[f]ault",
            "default.*",
            "DEFAULT",
            "^default$",
        ] {
            assert!(!namespace(pattern).matches(&sleep), "{pattern} matched");
        }
        assert!(namespace("default").matches(&sleep));
        assert!(namespace("def*").matches(&sleep));
        assert!(namespace("*ault").matches(&sleep));
    }

    #[test]
    fn cidrs_contain_what_they_should() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("10.0.0.0/24", "::ffff:10.0.0.9", true),
            ("fd00::/64", "fd00::abcd", true),
            ("fd00::/64", "fd00:0:0:1::1", false),
            ("::/0", "2001:db8::1", true),
            // Found with the rbac_diff fuzz target: mapped blocks are the IPv4 blocks they spell.
            ("::ffff:10.0.0.0/104", "10.255.1.1", true),
            ("::ffff:10.0.0.0/104", "11.0.0.1", false),
            ("::ffff:10.1.2.3/128", "10.1.2.3", true),
            ("::ffff:10.1.2.3/128", "10.1.2.4", false),
            ("::ffff:10.1.2.3/128", "::ffff:10.1.2.3", true),
            ("::ffff:0:0/95", "10.1.2.3", false),
        ];
        for (cidr, ip, inside) in cases {
            let block: Cidr = cidr.parse().unwrap();
            assert_eq!(block.contains(ip.parse().unwrap()), inside, "{cidr} ∋ {ip}");
        }
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        for bad in [
            "10.0.0.0/33",
            "::ffff:10.0.0.0/129",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }
}
