//! HARDENING.md §8 `rbac_diff`: fuzzed AuthorizationPolicies (every scope and action, dry-run,
//! every match field, CIDRs written as IPv4, IPv6 or IPv4-mapped IPv6) and one connection,
//! decided by ztund's [`policy::authorize`] and by a reference model written here from Istio's
//! documented semantics. The two must agree.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ztund::identity::SpiffeId;
use ztund::mesh::{HealthStatus, TunnelProtocol, Workload};
use ztund::policy::{
    self, Action, Authorization, Cidr, Clause, ConnectionFacts, Decision, Match, PolicySetBuilder,
    Rule, Scope, ServiceAccountMatch, StringMatch,
};

const ROOT: &str = "istio-system";
const NAMESPACES: [&str; 4] = ["default", "prod", ROOT, "de"];
const ACCOUNTS: [&str; 3] = ["sleep", "api", "default"];
const TRUST_DOMAINS: [&str; 2] = ["cluster.local", "example.org"];
const PORTS: [u16; 4] = [80, 8080, 15008, 0];
const LABELS: [(&str, &str); 3] = [("app", "api"), ("app", "web"), ("tier", "db")];

#[derive(Debug, Arbitrary)]
struct Input {
    policies: Vec<FuzzPolicy>,
    /// Workload namespace (index into NAMESPACES) and label bits.
    workload_namespace: u8,
    workload_labels: u8,
    /// Policies the workload names (xDS `authorization_policies`), by index.
    referenced: Vec<u8>,
    source: FuzzIp,
    destination: FuzzIp,
    /// (trust domain, namespace, account) indexes; `None` for plaintext.
    identity: Option<(u8, u8, u8)>,
    port: u8,
}

#[derive(Debug, Arbitrary)]
struct FuzzPolicy {
    namespace: u8,
    scope: u8,
    /// Label bits of the selector (WORKLOAD_SELECTOR with a selector).
    selector: u8,
    deny: bool,
    dry_run: bool,
    rules: Vec<Vec<Vec<FuzzMatch>>>,
}

#[derive(Debug, Arbitrary)]
struct FuzzMatch {
    namespaces: Vec<FuzzString>,
    not_namespaces: Vec<FuzzString>,
    principals: Vec<FuzzString>,
    not_principals: Vec<FuzzString>,
    source_ips: Vec<(FuzzIp, u8)>,
    not_source_ips: Vec<(FuzzIp, u8)>,
    destination_ips: Vec<(FuzzIp, u8)>,
    not_destination_ips: Vec<(FuzzIp, u8)>,
    destination_ports: Vec<u8>,
    not_destination_ports: Vec<u8>,
    service_accounts: Vec<(u8, u8)>,
    not_service_accounts: Vec<(u8, u8)>,
}

#[derive(Debug, Arbitrary)]
enum FuzzString {
    Exact(u8),
    Prefix(u8),
    Suffix(u8),
    Presence,
}

/// Addresses from a small set, in every spelling.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum FuzzIp {
    V4(u8, u8),
    V6(u8),
    Mapped(u8, u8),
}

impl FuzzIp {
    fn ip(self) -> IpAddr {
        match self {
            FuzzIp::V4(a, b) => IpAddr::V4(Ipv4Addr::new(10, a % 3, 0, b % 4)),
            FuzzIp::V6(a) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(a % 4))),
            FuzzIp::Mapped(a, b) => IpAddr::V6(Ipv4Addr::new(10, a % 3, 0, b % 4).to_ipv6_mapped()),
        }
    }
}

/// Strings from which principals and namespaces can be built, so patterns hit.
fn text(index: u8) -> &'static str {
    const TEXTS: [&str; 8] = [
        "default",
        "prod",
        "cluster.local/ns/default/sa/sleep",
        "cluster.local/",
        "/sa/sleep",
        "",
        "de",
        "spiffe://cluster.local/ns/default/sa/sleep",
    ];
    TEXTS[usize::from(index) % TEXTS.len()]
}

fn string_match(m: &FuzzString) -> StringMatch {
    match m {
        FuzzString::Exact(i) => StringMatch::Exact(text(*i).into()),
        FuzzString::Prefix(i) => StringMatch::Prefix(text(*i).into()),
        FuzzString::Suffix(i) => StringMatch::Suffix(text(*i).into()),
        FuzzString::Presence => StringMatch::Presence,
    }
}

fn labels(bits: u8) -> BTreeMap<String, String> {
    (LABELS.iter().enumerate())
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, (k, v))| (k.to_string(), v.to_string()))
        .collect()
}

fn pick<T: Copy>(list: &[T], index: u8) -> T {
    list[usize::from(index) % list.len()]
}

/// The fuzzed match as ztund's type; a CIDR longer than its address is left out (ztund's
/// readers refuse such a policy).
fn to_match(m: &FuzzMatch) -> Match {
    let strings = |list: &[FuzzString]| list.iter().take(3).map(string_match).collect();
    let cidrs = |list: &[(FuzzIp, u8)]| {
        (list.iter().take(3))
            .filter_map(|(ip, len)| Cidr::new(ip.ip(), *len))
            .collect()
    };
    let ports = |list: &[u8]| list.iter().take(3).map(|p| pick(&PORTS, *p)).collect();
    let accounts = |list: &[(u8, u8)]| {
        (list.iter().take(3))
            .map(|(ns, sa)| ServiceAccountMatch {
                namespace: pick(&NAMESPACES, *ns).into(),
                service_account: pick(&ACCOUNTS, *sa).into(),
            })
            .collect()
    };
    Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    }
}

struct Policy {
    authorization: Authorization,
    selector: Option<BTreeMap<String, String>>,
    /// The fuzzed matches, for the reference model.
    rules: Vec<Vec<Vec<FuzzMatch>>>,
}

fn policies(input: Input) -> (Vec<Policy>, Input) {
    let mut input = input;
    let fuzzed = std::mem::take(&mut input.policies);
    let built = (fuzzed.into_iter().take(6).enumerate())
        .map(|(i, p)| {
            let namespace = pick(&NAMESPACES, p.namespace);
            let (scope, selector) = match p.scope % 4 {
                0 => (Scope::Global, None),
                1 => (Scope::Namespace, None),
                2 if p.selector % 8 != 0 => (Scope::WorkloadSelector, Some(labels(p.selector))),
                _ => (Scope::WorkloadSelector, None),
            };
            let rules: Vec<Vec<Vec<FuzzMatch>>> = (p.rules.into_iter().take(3))
                .map(|clauses| {
                    (clauses.into_iter().take(3))
                        .map(|matches| matches.into_iter().take(3).collect())
                        .collect()
                })
                .collect();
            let authorization = Authorization {
                name: format!("p{i}"),
                namespace: namespace.into(),
                scope,
                action: if p.deny { Action::Deny } else { Action::Allow },
                rules: (rules.iter())
                    .map(|clauses| Rule {
                        clauses: (clauses.iter())
                            .map(|matches| Clause {
                                matches: matches.iter().map(to_match).collect(),
                            })
                            .collect(),
                    })
                    .collect(),
                dry_run: p.dry_run,
                not_enforced: Vec::new(),
            };
            Policy {
                authorization,
                selector,
                rules,
            }
        })
        .collect();
    (built, input)
}

// ---- The reference model ----

/// A block as written: IPv4-mapped IPv6 with a prefix of 96 or more is the IPv4 block it
/// spells; otherwise the family is the address's. An address is compared in its canonical form
/// and a block never contains an address of the other family.
fn block_contains(network: IpAddr, len: u8, ip: IpAddr) -> bool {
    let (network, len) = match network {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && len >= 96 => {
            (IpAddr::V4(v6.to_ipv4_mapped().unwrap()), len - 96)
        }
        other => (other, len),
    };
    let bits = |a: &[u8], b: &[u8], len: u8| {
        (0..usize::from(len))
            .all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
    };
    match (network, ip.to_canonical()) {
        (IpAddr::V4(n), IpAddr::V4(a)) => len <= 32 && bits(&n.octets(), &a.octets(), len),
        (IpAddr::V6(n), IpAddr::V6(a)) => len <= 128 && bits(&n.octets(), &a.octets(), len),
        _ => false,
    }
}

fn text_matches(m: &FuzzString, value: &str) -> bool {
    match m {
        FuzzString::Exact(i) => value == text(*i),
        FuzzString::Prefix(i) => value.starts_with(text(*i)),
        FuzzString::Suffix(i) => value.ends_with(text(*i)),
        FuzzString::Presence => !value.is_empty(),
    }
}

struct Conn {
    identity: Option<SpiffeId>,
    source: IpAddr,
    destination: IpAddr,
    port: u16,
}

/// A list holds when it is empty or one entry hits; a `not_` list holds when no entry hits.
fn field<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

fn reference_match(m: &FuzzMatch, conn: &Conn) -> Option<bool> {
    fn strings(list: &[FuzzString]) -> Vec<&FuzzString> {
        list.iter().take(3).collect()
    }
    // A CIDR longer than its address is left out, as `to_match` does.
    fn cidrs(list: &[(FuzzIp, u8)]) -> Vec<&(FuzzIp, u8)> {
        (list.iter().take(3))
            .filter(|(ip, len)| *len <= if ip.ip().is_ipv4() { 32 } else { 128 })
            .collect()
    }
    let ports = |list: &[u8]| {
        list.iter()
            .take(3)
            .map(|p| pick(&PORTS, *p))
            .collect::<Vec<_>>()
    };
    let accounts = |list: &[(u8, u8)]| {
        (list.iter().take(3))
            .map(|(ns, sa)| (pick(&NAMESPACES, *ns), pick(&ACCOUNTS, *sa)))
            .collect::<Vec<_>>()
    };
    let (namespaces, not_namespaces) = (strings(&m.namespaces), strings(&m.not_namespaces));
    let (principals, not_principals) = (strings(&m.principals), strings(&m.not_principals));
    let (source_ips, not_source_ips) = (cidrs(&m.source_ips), cidrs(&m.not_source_ips));
    let (destination_ips, not_destination_ips) =
        (cidrs(&m.destination_ips), cidrs(&m.not_destination_ips));
    let (dports, not_dports) = (ports(&m.destination_ports), ports(&m.not_destination_ports));
    let (accounts, not_accounts) = (
        accounts(&m.service_accounts),
        accounts(&m.not_service_accounts),
    );
    let empty = namespaces.is_empty()
        && not_namespaces.is_empty()
        && principals.is_empty()
        && not_principals.is_empty()
        && source_ips.is_empty()
        && not_source_ips.is_empty()
        && destination_ips.is_empty()
        && not_destination_ips.is_empty()
        && dports.is_empty()
        && not_dports.is_empty()
        && accounts.is_empty()
        && not_accounts.is_empty();
    if empty {
        // Skipped by its clause, as ztunnel does.
        return None;
    }
    let id = conn.identity.as_ref();
    let principal = id.map(|id| {
        format!(
            "{}/ns/{}/sa/{}",
            id.trust_domain(),
            id.namespace(),
            id.service_account()
        )
    });
    Some(
        field(&namespaces, &not_namespaces, |m| {
            id.is_some_and(|id| text_matches(m, id.namespace()))
        }) && field(&principals, &not_principals, |m| {
            principal.as_deref().is_some_and(|p| text_matches(m, p))
        }) && field(&source_ips, &not_source_ips, |(ip, len)| {
            block_contains(ip.ip(), *len, conn.source)
        }) && field(&destination_ips, &not_destination_ips, |(ip, len)| {
            block_contains(ip.ip(), *len, conn.destination)
        }) && field(&dports, &not_dports, |p| *p == conn.port)
            && field(&accounts, &not_accounts, |(ns, sa)| {
                id.is_some_and(|id| id.namespace() == *ns && id.service_account() == *sa)
            }),
    )
}

fn reference_policy_matches(rules: &[Vec<Vec<FuzzMatch>>], conn: &Conn) -> bool {
    rules.iter().any(|clauses| {
        clauses.iter().all(|matches| {
            matches.is_empty()
                || matches
                    .iter()
                    .any(|m| reference_match(m, conn).unwrap_or(false))
        })
    })
}

/// Istio: a matching DENY denies; else, with ALLOW policies, one must match; else allow.
fn reference_allows(policies: &[Policy], workload: &Workload, conn: &Conn) -> bool {
    let applies = |p: &Policy| {
        let a = &p.authorization;
        let selected = match (a.scope, &p.selector) {
            (Scope::Global, _) => true,
            (Scope::Namespace, _) => a.namespace == workload.namespace,
            (Scope::WorkloadSelector, Some(selector)) => {
                (a.namespace == ROOT || a.namespace == workload.namespace)
                    && selector
                        .iter()
                        .all(|(k, v)| workload.labels.get(k) == Some(v))
            }
            (Scope::WorkloadSelector, None) => false,
        };
        selected || workload.authorization_policies.contains(&a.key())
    };
    let enforced: Vec<&Policy> = (policies.iter())
        .filter(|p| applies(p) && !p.authorization.dry_run)
        .collect();
    let matching = |p: &&&Policy| reference_policy_matches(&p.rules, conn);
    let of = |action| {
        enforced
            .iter()
            .filter(move |p| p.authorization.action == action)
    };
    if of(Action::Deny).any(|p| matching(&p)) {
        return false;
    }
    let mut allows = of(Action::Allow).peekable();
    allows.peek().is_none() || of(Action::Allow).any(|p| matching(&p))
}

fuzz_target!(|input: Input| {
    let (policies, input) = policies(input);
    let namespace = pick(&NAMESPACES, input.workload_namespace);
    let destination = input.destination.ip();
    let workload = Workload {
        uid: "Kubernetes//Pod/x/w".into(),
        name: "w".into(),
        namespace: namespace.into(),
        service_account: "default".into(),
        trust_domain: "cluster.local".into(),
        labels: labels(input.workload_labels),
        addresses: vec![destination],
        node: "node".into(),
        tunnel: TunnelProtocol::Hbone,
        status: HealthStatus::Healthy,
        netns: None,
        creation_timestamp: None,
        authorization_policies: (input.referenced.iter().take(3))
            .filter_map(|i| policies.get(usize::from(*i) % policies.len().max(1)))
            .map(|p| p.authorization.key())
            .collect(),
        service_ports: BTreeMap::new(),
        identity_cache: Default::default(),
    };
    let identity = input.identity.map(|(td, ns, sa)| {
        SpiffeId::new(
            pick(&TRUST_DOMAINS, td),
            pick(&NAMESPACES, ns),
            pick(&ACCOUNTS, sa),
        )
        .unwrap()
    });
    let conn = Conn {
        identity: identity.clone(),
        source: input.source.ip(),
        destination,
        port: pick(&PORTS, input.port),
    };
    let facts = ConnectionFacts {
        source_ip: conn.source,
        source_identity: identity,
        destination_ip: conn.destination,
        destination_port: conn.port,
    };
    let mut builder = PolicySetBuilder::new(ROOT);
    for p in &policies {
        builder.add_authorization(p.authorization.clone(), p.selector.clone());
    }
    let decision = policy::authorize(&builder.build(), &workload, &facts);
    let expected = reference_allows(&policies, &workload, &conn);
    assert_eq!(
        matches!(decision, Decision::Allow),
        expected,
        "ztund decided {decision:?} for {facts:?}, the reference model {}",
        if expected { "allows" } else { "denies" }
    );
});
