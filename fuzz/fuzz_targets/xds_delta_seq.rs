//! HARDENING.md §8 `xds_delta_seq`: a fuzzed sequence of delta xDS responses (workloads and
//! services that share names and addresses, Authorizations, removals, bad resources, a type
//! ztund did not subscribe to) applied to ztund's [`XdsState`], next to a reference model of
//! what must be held. After every response: exactly the bad resources are rejected, the held
//! names and versions are the model's (a bad update keeps the last good version), the
//! generation moves exactly when a held value changed, and the snapshot's indexes point only at
//! held workloads and services that really carry the address they are found by.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_types::Any;
use ztund::proto::istio::security as pb_sec;
use ztund::proto::istio::workload as pb;
use ztund::proto::type_url;
use ztund::xds::state::XdsState;
use ztund::xds::{RawResource, ResourceSink};

#[derive(Debug, Arbitrary)]
struct Response {
    kind: Kind,
    added: Vec<Resource>,
    removed: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Kind {
    Address,
    Authorization,
    Unsubscribed,
}

#[derive(Debug, Arbitrary)]
struct Resource {
    /// Index into the names of the response's kind.
    name: u8,
    version: u8,
    body: Body,
    /// Sent under another name than its content implies, or with an unknown enum value.
    bad: Option<Bad>,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Bad {
    WrongName,
    UnknownEnum,
}

#[derive(Debug, Clone, Arbitrary)]
enum Body {
    Workload { addresses: Vec<u8>, healthy: bool },
    Service { vips: Vec<u8>, port: u8 },
    Authorization { deny: bool, port: u8 },
}

const WORKLOADS: [&str; 3] = [
    "Kubernetes//Pod/a/w0",
    "Kubernetes//Pod/a/w1",
    "Kubernetes//Pod/b/w2",
];
const SERVICES: [(&str, &str); 2] = [
    ("a", "s0.a.svc.cluster.local"),
    ("b", "s1.b.svc.cluster.local"),
];
const POLICIES: [(&str, &str); 3] = [("a", "p0"), ("a", "p1"), ("istio-system", "p2")];

fn ip(index: u8) -> IpAddr {
    match index % 6 {
        i @ 0..=3 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
        4 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
        _ => IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The resource name of `index` for `kind` and `body`; the body decides workload or service.
fn name_of(kind: Kind, body: &Body, index: u8) -> String {
    let i = usize::from(index);
    match (kind, body) {
        (Kind::Address, Body::Service { .. }) => {
            let (ns, host) = SERVICES[i % SERVICES.len()];
            format!("{ns}/{host}")
        }
        (Kind::Address, _) => WORKLOADS[i % WORKLOADS.len()].to_string(),
        (Kind::Authorization, _) => {
            let (ns, name) = POLICIES[i % POLICIES.len()];
            format!("{ns}/{name}")
        }
        (Kind::Unsubscribed, _) => format!("other-{index}"),
    }
}

/// Every name a removal may use for `kind`, plus one never sent.
fn removal_name(kind: Kind, index: u8) -> String {
    let mut names: Vec<String> = match kind {
        Kind::Address => (WORKLOADS.iter().map(|w| w.to_string()))
            .chain(SERVICES.iter().map(|(ns, h)| format!("{ns}/{h}")))
            .collect(),
        Kind::Authorization => POLICIES.iter().map(|(ns, n)| format!("{ns}/{n}")).collect(),
        Kind::Unsubscribed => Vec::new(),
    };
    names.push("never/sent".into());
    names[usize::from(index) % names.len()].clone()
}

/// The protobuf for a resource of `kind` named `name`; `None` when body and kind disagree.
fn encode(kind: Kind, name: &str, body: &Body, bad: Option<Bad>) -> Option<Any> {
    let content_name = match bad {
        Some(Bad::WrongName) => format!("{name}-renamed"),
        _ => name.to_string(),
    };
    let unknown = matches!(bad, Some(Bad::UnknownEnum));
    let (url, value) = match (kind, body) {
        (Kind::Address | Kind::Unsubscribed, Body::Workload { addresses, healthy }) => {
            let workload = pb::Workload {
                uid: content_name,
                name: "w".into(),
                namespace: "a".into(),
                addresses: addresses.iter().take(3).map(|i| ip_bytes(ip(*i))).collect(),
                tunnel_protocol: if unknown {
                    77
                } else {
                    pb::TunnelProtocol::Hbone as i32
                },
                status: if *healthy { 0 } else { 1 },
                node: "node".into(),
                ..Default::default()
            };
            let address = pb::Address {
                r#type: Some(pb::address::Type::Workload(workload)),
            };
            (type_url::ADDRESS, address.encode_to_vec())
        }
        (Kind::Address | Kind::Unsubscribed, Body::Service { vips, port }) => {
            let (namespace, hostname) = content_name.split_once('/').unwrap_or(("", &content_name));
            let service = pb::Service {
                name: "s".into(),
                namespace: namespace.into(),
                hostname: hostname.into(),
                addresses: (vips.iter().take(3))
                    .map(|i| pb::NetworkAddress {
                        network: String::new(),
                        address: ip_bytes(ip(*i)),
                        length: None,
                    })
                    .collect(),
                ports: vec![pb::Port {
                    service_port: u32::from(*port) + 1,
                    target_port: if unknown { 1 << 20 } else { 8080 },
                    app_protocol: 0,
                }],
                ..Default::default()
            };
            let address = pb::Address {
                r#type: Some(pb::address::Type::Service(service)),
            };
            (type_url::ADDRESS, address.encode_to_vec())
        }
        (Kind::Authorization, Body::Authorization { deny, port }) => {
            let (namespace, policy) = content_name.split_once('/').unwrap_or(("", &content_name));
            let authorization = pb_sec::Authorization {
                name: policy.into(),
                namespace: namespace.into(),
                scope: if unknown {
                    9
                } else {
                    pb_sec::Scope::Namespace as i32
                },
                action: if *deny { 1 } else { 0 },
                rules: vec![pb_sec::Rule {
                    clauses: vec![pb_sec::Clause {
                        matches: vec![pb_sec::Match {
                            destination_ports: vec![u32::from(*port)],
                            ..Default::default()
                        }],
                    }],
                }],
                dry_run: false,
                ..Default::default()
            };
            (type_url::AUTHORIZATION, authorization.encode_to_vec())
        }
        _ => return None,
    };
    Some(Any {
        type_url: url.to_string(),
        value,
    })
}

fn url_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Address => type_url::ADDRESS,
        Kind::Authorization => type_url::AUTHORIZATION,
        Kind::Unsubscribed => "type.googleapis.com/istio.workload.Unknown",
    }
}

/// name → (version, protobuf bytes): what must be held, by type.
type Model = BTreeMap<&'static str, BTreeMap<String, (String, Vec<u8>)>>;

fuzz_target!(|responses: Vec<Response>| {
    let mut state = XdsState::new();
    let mut model: Model = BTreeMap::new();
    for response in responses.into_iter().take(16) {
        let url = url_of(response.kind);
        let held = model.entry(url).or_default();
        let before = state.generation();
        let mut changed = false;

        let removed: Vec<String> = (response.removed.iter().take(3))
            .map(|i| removal_name(response.kind, *i))
            .collect();
        let mut added = Vec::new();
        let mut expect_rejected = Vec::new();
        let subscribed = !matches!(response.kind, Kind::Unsubscribed);
        if subscribed {
            for name in &removed {
                changed |= held.remove(name).is_some();
            }
        }
        for resource in response.added.into_iter().take(4) {
            let name = name_of(response.kind, &resource.body, resource.name);
            let Some(any) = encode(response.kind, &name, &resource.body, resource.bad) else {
                continue;
            };
            let version = format!("v{}", resource.version);
            if subscribed {
                if resource.bad.is_some() {
                    expect_rejected.push(name.clone());
                } else {
                    // The bytes sent, not the fuzzed body: two bodies can encode the same
                    // resource (addresses are picked modulo a small set, lists are cut).
                    let same = held.get(&name).is_some_and(|(_, sent)| *sent == any.value);
                    changed |= !same;
                    held.insert(name.clone(), (version.clone(), any.value.clone()));
                }
            }
            added.push(RawResource {
                name,
                version,
                resource: Some(any),
            });
        }

        let rejected = state.apply(url, added, removed);
        let rejected: Vec<String> = rejected.into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            rejected, expect_rejected,
            "rejected other resources than the bad ones"
        );
        for (url, held) in &model {
            let versions: BTreeMap<String, String> = state.versions(url).into_iter().collect();
            let expected: BTreeMap<String, String> = held
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect();
            assert_eq!(versions, expected, "held versions of {url}");
        }
        assert_eq!(
            state.generation() != before,
            changed,
            "the generation moved {} -> {} but a held value changed: {changed}",
            before,
            state.generation()
        );
        snapshot_is_consistent(&state, &model);
    }
});

fn snapshot_is_consistent(state: &XdsState, model: &Model) {
    let addresses = model.get(type_url::ADDRESS);
    let held = |name: &str| addresses.is_some_and(|held| held.contains_key(name));
    let snapshot = state.snapshot(None, "istio-system");
    for workload in snapshot.workloads() {
        assert!(
            held(&workload.uid),
            "the snapshot has {} that is not held",
            workload.uid
        );
        let by_uid = snapshot
            .workload_by_uid(&workload.uid)
            .expect("indexed by uid");
        assert_eq!(by_uid.uid, workload.uid);
        for ip in &workload.addresses {
            let found = snapshot.workload_by_ip(*ip).expect("every address indexed");
            assert!(found.addresses.contains(ip), "{ip} leads to {}", found.uid);
        }
    }
    for service in snapshot.services() {
        assert!(
            held(&ztund::mesh::service_key(service)),
            "{} is not held",
            service.hostname
        );
        for vip in &service.vips {
            let found = snapshot.service_by_vip(*vip).expect("every VIP indexed");
            assert!(
                found.vips.contains(vip),
                "{vip} leads to {}",
                found.hostname
            );
        }
    }
    let policies = model.get(type_url::AUTHORIZATION).map_or(0, BTreeMap::len);
    assert_eq!(
        snapshot.policies.authorizations().count(),
        policies,
        "Authorizations held"
    );
}
