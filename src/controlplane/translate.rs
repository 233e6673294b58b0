//! The mesh (a [`Snapshot`] read from the control plane's directory) as the xDS resources istiod
//! would send for it (PROTOCOL.md §3.4, §3.5, §4.1): `istio.workload.Address` per workload and
//! service, `istio.security.Authorization` per policy (PeerAuthentication conversions included,
//! as `policy` models them), and ztund's own DestinationRule type. Pure: no I/O, no streams.
//!
//! Every resource carries a version that is a hash of its encoding, made deterministic (the
//! `services` map is encoded in key order), so an unchanged resource keeps its version across
//! reloads and restarts, and a reconnecting client's `initial_resource_versions` can be trusted.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use prost::Message;
use prost_types::Any;

use crate::mesh::{
    DocRef, Endpoints, HealthStatus, MeshError, RawDocument, Service, Snapshot, TunnelProtocol,
    Workload, service_key,
};
use crate::policy::{self, Authorization, Cidr, Scope, StringMatch};
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::proto::istio::security as sec;
use crate::proto::istio::workload as wl;
use crate::proto::type_url;
use crate::proto::ztund::config::v1 as ztund_v1;

/// The resources of one type, by xDS name.
pub type Named = BTreeMap<String, Resource>;

/// Everything the control plane serves for one configuration, by type URL then name.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub by_type: BTreeMap<&'static str, Named>,
}

impl Resources {
    /// The resources of `type_url`; `None` for a type this server does not serve.
    pub fn of(&self, type_url: &str) -> Option<&Named> {
        self.by_type.get(type_url)
    }
}

/// The type URLs served.
pub const TYPES: [&str; 3] = [
    type_url::ADDRESS,
    type_url::AUTHORIZATION,
    type_url::DESTINATION_RULE,
];

/// Translates a mesh and its documents (for the DestinationRules' `spec`) into resources.
pub fn translate(snapshot: &Snapshot, docs: &[RawDocument]) -> Result<Resources, MeshError> {
    let mut resources = Resources::default();
    for t in TYPES {
        resources.by_type.insert(t, Named::new());
    }
    let addresses = addresses(snapshot);
    let named = resources.by_type.entry(type_url::ADDRESS).or_default();
    for (name, address) in addresses {
        named.insert(name.clone(), resource(name, type_url::ADDRESS, &address));
    }
    let named = resources
        .by_type
        .entry(type_url::AUTHORIZATION)
        .or_default();
    for policy in snapshot.policies.authorizations() {
        let name = policy.key();
        named.insert(
            name.clone(),
            resource(name, type_url::AUTHORIZATION, &authorization(policy)),
        );
    }
    let named = resources
        .by_type
        .entry(type_url::DESTINATION_RULE)
        .or_default();
    for rule in destination_rules(docs)? {
        let name = format!("{}/{}", rule.namespace, rule.name);
        named.insert(
            name.clone(),
            resource(name, type_url::DESTINATION_RULE, &rule),
        );
    }
    Ok(resources)
}

/// One `Resource`, its version the hash of its (deterministic) encoding.
fn resource<M: Deterministic>(name: String, type_url: &str, message: &M) -> Resource {
    let value = message.encode_sorted();
    Resource {
        name,
        version: format!("{:016x}", fnv1a(&value)),
        resource: Some(Any {
            type_url: type_url.to_string(),
            value,
        }),
        ..Resource::default()
    }
}

/// Messages encoded the same way every time, whatever the order of their maps.
trait Deterministic {
    fn encode_sorted(&self) -> Vec<u8>;
}

impl Deterministic for wl::Address {
    fn encode_sorted(&self) -> Vec<u8> {
        /// Field 22 of Workload with a map in key order: appended after the rest of the
        /// message, it decodes to the same Workload (protobuf fields may come in any order).
        #[derive(Clone, PartialEq, prost::Message)]
        struct SortedServices {
            #[prost(btree_map = "string, message", tag = "22")]
            services: BTreeMap<String, wl::PortList>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct WorkloadAddress {
            #[prost(bytes = "vec", tag = "1")]
            workload: Vec<u8>,
        }
        match &self.r#type {
            Some(wl::address::Type::Workload(workload)) => {
                let mut rest = workload.clone();
                let services = SortedServices {
                    services: std::mem::take(&mut rest.services).into_iter().collect(),
                };
                let mut bytes = rest.encode_to_vec();
                services.encode(&mut bytes).unwrap_or_default();
                WorkloadAddress { workload: bytes }.encode_to_vec()
            }
            _ => self.encode_to_vec(),
        }
    }
}

impl Deterministic for sec::Authorization {
    fn encode_sorted(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

impl Deterministic for ztund_v1::DestinationRule {
    fn encode_sorted(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

/// FNV-1a, 64 bits: stable across builds and runs (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Workloads (by uid) and services (by `namespace/hostname`), with the workloads istiod makes
/// for a ServiceEntry's endpoint addresses that no workload owns.
fn addresses(snapshot: &Snapshot) -> BTreeMap<String, wl::Address> {
    let mut services_of: HashMap<&str, Vec<&Service>> = HashMap::new();
    let mut entry_endpoints: BTreeMap<String, wl::Workload> = BTreeMap::new();
    for service in snapshot.services() {
        for member in snapshot.endpoints(service) {
            services_of.entry(&member.uid).or_default().push(service);
        }
        if let Endpoints::Addresses(ips) = &service.endpoints {
            for ip in ips {
                if snapshot.workload_by_ip(*ip).is_none() {
                    let endpoint = entry_endpoints
                        .entry(entry_endpoint_uid(service, *ip))
                        .or_insert_with(|| entry_endpoint(snapshot, service, *ip));
                    endpoint
                        .services
                        .insert(service_key(service), port_list(service, None));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for w in snapshot.workloads() {
        let services = services_of
            .get(w.uid.as_str())
            .map_or(&[][..], Vec::as_slice);
        let workload = workload(snapshot, w, services);
        out.insert(w.uid.clone(), address_of_workload(workload));
    }
    for (uid, workload) in entry_endpoints {
        out.insert(uid, address_of_workload(workload));
    }
    for s in snapshot.services() {
        out.insert(
            service_key(s),
            wl::Address {
                r#type: Some(wl::address::Type::Service(service(s))),
            },
        );
    }
    out
}

fn address_of_workload(workload: wl::Workload) -> wl::Address {
    wl::Address {
        r#type: Some(wl::address::Type::Workload(workload)),
    }
}

/// `Workload` as istiod fills it for a pod or a WorkloadEntry.
pub fn workload(snapshot: &Snapshot, w: &Workload, services: &[&Service]) -> wl::Workload {
    let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k).cloned());
    let workload_type = if w.uid.contains("//Pod/") {
        wl::WorkloadType::Pod
    } else {
        wl::WorkloadType::Deployment
    };
    wl::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.iter().map(|ip| ip_bytes(*ip)).collect(),
        tunnel_protocol: match w.tunnel {
            TunnelProtocol::Hbone => wl::TunnelProtocol::Hbone,
            TunnelProtocol::None => wl::TunnelProtocol::None,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        canonical_name: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| w.name.clone()),
        canonical_revision: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into()),
        workload_type: workload_type as i32,
        workload_name: w.name.clone(),
        services: services
            .iter()
            .map(|s| (service_key(s), port_list(s, Some(w))))
            .collect(),
        authorization_policies: authorization_policies(&snapshot.policies, w),
        status: match w.status {
            HealthStatus::Healthy => wl::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => wl::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: "Kubernetes".into(),
        ..wl::Workload::default()
    }
}

/// What istiod lists in `Workload.authorization_policies` (§4.1): the selector-scoped
/// AuthorizationPolicies that pick the workload (root or own namespace), sorted, then the
/// PeerAuthentication-derived policy it references (static STRICT or a converted one).
pub fn authorization_policies(policies: &policy::PolicySet, w: &Workload) -> Vec<String> {
    let mut selected = Vec::new();
    let mut derived = Vec::new();
    for (policy, because) in policies.applicable(w) {
        if policy.scope != Scope::WorkloadSelector {
            continue;
        }
        match because {
            None => selected.push(policy.key()),
            Some(_) => derived.push(policy.key()),
        }
    }
    selected.sort();
    selected.extend(derived);
    selected
}

/// A ServiceEntry endpoint address is a workload of its own in istiod's model.
fn entry_endpoint_uid(service: &Service, ip: IpAddr) -> String {
    format!(
        "Kubernetes/networking.istio.io/ServiceEntry/{}/{}/{ip}",
        service.namespace, service.name
    )
}

fn entry_endpoint(snapshot: &Snapshot, service: &Service, ip: IpAddr) -> wl::Workload {
    let trust_domain = snapshot
        .workloads()
        .first()
        .map_or_else(|| "cluster.local".to_string(), |w| w.trust_domain.clone());
    wl::Workload {
        uid: entry_endpoint_uid(service, ip),
        name: service.name.clone(),
        namespace: service.namespace.clone(),
        addresses: vec![ip_bytes(ip)],
        tunnel_protocol: wl::TunnelProtocol::None as i32,
        trust_domain,
        service_account: "default".into(),
        canonical_name: service.name.clone(),
        canonical_revision: "latest".into(),
        workload_name: service.name.clone(),
        cluster_id: "Kubernetes".into(),
        ..wl::Workload::default()
    }
}

/// The service's ports, with this workload's target ports when it has its own.
fn port_list(service: &Service, w: Option<&Workload>) -> wl::PortList {
    wl::PortList {
        ports: service
            .ports
            .iter()
            .map(|p| wl::Port {
                service_port: u32::from(p.port),
                target_port: u32::from(w.map_or(p.target_port, |w| w.target_port(service, p))),
                app_protocol: 0,
            })
            .collect(),
    }
}

/// `Service` as istiod fills it.
pub fn service(s: &Service) -> wl::Service {
    wl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|ip| wl::NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
                length: None,
            })
            .collect(),
        ports: port_list(s, None).ports,
        subject_alt_names: s
            .subject_alt_names
            .iter()
            .map(|id| id.to_string())
            .collect(),
        ..wl::Service::default()
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `Authorization` on the wire.
pub fn authorization(policy: &Authorization) -> sec::Authorization {
    sec::Authorization {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope: match policy.scope {
            Scope::Global => sec::Scope::Global,
            Scope::Namespace => sec::Scope::Namespace,
            Scope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match policy.action {
            policy::Action::Allow => sec::Action::Allow,
            policy::Action::Deny => sec::Action::Deny,
        } as i32,
        rules: policy
            .rules
            .iter()
            .map(|rule| sec::Rule {
                clauses: rule
                    .clauses
                    .iter()
                    .map(|clause| sec::Clause {
                        matches: clause.matches.iter().map(match_of).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: policy.dry_run,
        extensions: Vec::new(),
    }
}

fn match_of(m: &policy::Match) -> sec::Match {
    let strings = |list: &[StringMatch]| list.iter().map(string_match).collect();
    let cidrs = |list: &[Cidr]| list.iter().map(cidr).collect();
    let ports = |list: &[u16]| list.iter().map(|p| u32::from(*p)).collect();
    let accounts = |list: &[policy::ServiceAccountMatch]| {
        list.iter()
            .map(|sa| sec::ServiceAccountMatch {
                namespace: sa.namespace.clone(),
                service_account: sa.service_account.clone(),
            })
            .collect()
    };
    sec::Match {
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
        extensions: Vec::new(),
    }
}

fn string_match(m: &StringMatch) -> sec::StringMatch {
    use sec::string_match::MatchType;
    sec::StringMatch {
        match_type: Some(match m {
            StringMatch::Exact(v) => MatchType::Exact(v.clone()),
            StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
            StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}

fn cidr(c: &Cidr) -> sec::Address {
    sec::Address {
        address: ip_bytes(c.address()),
        length: u32::from(c.prefix_len()),
    }
}

/// Each DestinationRule document as ztund's own resource: its `spec` as JSON.
fn destination_rules(docs: &[RawDocument]) -> Result<Vec<ztund_v1::DestinationRule>, MeshError> {
    let mut rules = Vec::new();
    for raw in docs.iter().filter(|d| d.doc.kind == "DestinationRule") {
        let invalid = |field: &str, reason: String| MeshError::Invalid {
            doc: Box::new(raw.doc.clone()),
            field: field.into(),
            reason,
        };
        let spec = raw.body.get("spec").cloned().unwrap_or_default();
        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| invalid("spec", format!("cannot be written as JSON: {e}")))?;
        let creation_timestamp = raw
            .body
            .get("metadata")
            .and_then(|m| m.get("creationTimestamp"))
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_string();
        rules.push(destination_rule(&raw.doc, creation_timestamp, spec_json));
    }
    Ok(rules)
}

fn destination_rule(
    doc: &DocRef,
    creation_timestamp: String,
    spec_json: String,
) -> ztund_v1::DestinationRule {
    ztund_v1::DestinationRule {
        name: doc.name.clone(),
        namespace: doc.namespace.clone(),
        creation_timestamp,
        spec_json,
    }
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
