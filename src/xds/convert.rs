//! Protobuf → ztund model, one resource at a time: `istio.workload.Address` into a [`Workload`]
//! or a [`Service`], `istio.security.Authorization` into a policy [`Authorization`], and ztund's
//! `ztund.config.v1.DestinationRule` into a [`DestinationRule`] read by the mesh file's own
//! reader. Each bad resource is one [`ConvertError`] naming the resource and the field (the text
//! of the NACK). Holding resources and building snapshots is `state`'s job, not this file's.
//!
//! A resource's name must agree with its content, as istiod names them (PROTOCOL.md §3.1): a
//! workload by its `uid`, a service by `namespace/hostname`, an Authorization and a
//! DestinationRule by `namespace/name`. A resource whose name disagrees is rejected: stored under
//! either key it would escape a later removal sent under the other.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use prost::Message;
use prost_types::Any;
use serde_norway::{Mapping, Value};

use super::RawResource;
use crate::identity::SpiffeId;
use crate::mesh::k8s::security::{self, SecurityDocument};
use crate::mesh::{
    DocRef, Endpoints, HealthStatus, RawDocument, Service, ServicePort, TunnelProtocol, Workload,
};
use crate::policy::{
    Action, Authorization, Cidr, Clause, DestinationRule, Match, PolicyError, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
use crate::proto::istio::security as pb_sec;
use crate::proto::istio::workload as pb;
use crate::proto::type_url;
use crate::proto::ztund::config::v1 as pb_ztund;

/// The largest encoded resource accepted; istiod's biggest real resources are a few KiB.
pub const MAX_RESOURCE_BYTES: usize = 4 * 1024 * 1024;

/// Trust domain of a workload that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Service account of a workload that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// What one `istio.workload.Address` carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    Workload(Workload),
    Service(Service),
}

/// Which resource an error is about: its kind as decoded so far and its xDS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    /// `address` before the oneof is known, then `workload`, `service`, `authorization` or
    /// `destination rule`.
    pub kind: &'static str,
    pub name: String,
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// Why one resource was rejected. The text names the resource, then the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{resource}: no resource body")]
    Empty { resource: ResourceRef },
    #[error("{resource}: {size} bytes encoded, over the {limit}-byte cap")]
    TooLarge {
        resource: ResourceRef,
        size: usize,
        limit: usize,
    },
    #[error("{resource}: type_url {found:?}, expected {expected:?}")]
    WrongType {
        resource: ResourceRef,
        found: String,
        expected: &'static str,
    },
    #[error("{resource}: undecodable {message}: {reason}")]
    Undecodable {
        resource: ResourceRef,
        message: &'static str,
        reason: String,
    },
    #[error("{resource}: {field}: {reason}")]
    Invalid {
        resource: ResourceRef,
        field: String,
        reason: String,
    },
}

impl ConvertError {
    /// The resource the error is about.
    pub fn resource(&self) -> &ResourceRef {
        match self {
            ConvertError::Empty { resource }
            | ConvertError::TooLarge { resource, .. }
            | ConvertError::WrongType { resource, .. }
            | ConvertError::Undecodable { resource, .. }
            | ConvertError::Invalid { resource, .. } => resource,
        }
    }
}

/// Builds errors for one resource.
struct Ctx {
    resource: ResourceRef,
}

impl Ctx {
    fn new(kind: &'static str, name: &str) -> Ctx {
        Ctx {
            resource: ResourceRef {
                kind,
                name: name.to_string(),
            },
        }
    }

    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
        ConvertError::Invalid {
            resource: self.resource.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Checks the body is there, small enough and of the expected type, then decodes it.
    fn decode<M: Message + Default>(
        &self,
        body: Option<&Any>,
        expected: &'static str,
        message: &'static str,
    ) -> Result<M, ConvertError> {
        let resource = || self.resource.clone();
        let any = body.ok_or_else(|| ConvertError::Empty {
            resource: resource(),
        })?;
        if any.value.len() > MAX_RESOURCE_BYTES {
            return Err(ConvertError::TooLarge {
                resource: resource(),
                size: any.value.len(),
                limit: MAX_RESOURCE_BYTES,
            });
        }
        if any.type_url != expected {
            return Err(ConvertError::WrongType {
                resource: resource(),
                found: any.type_url.clone(),
                expected,
            });
        }
        M::decode(any.value.as_slice()).map_err(|e| ConvertError::Undecodable {
            resource: resource(),
            message,
            reason: e.to_string(),
        })
    }

    /// The name the content implies must be the resource's name.
    fn check_name(&self, field: &str, implied: &str, rule: &str) -> Result<(), ConvertError> {
        if implied == self.resource.name {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                format!(
                    "gives {implied:?}, not the resource name; a {} is named by its {rule}",
                    self.resource.kind
                ),
            ))
        }
    }

    fn ip(&self, field: impl fmt::Display, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
        ip_from_bytes(bytes).ok_or_else(|| {
            self.invalid(
                field.to_string(),
                format!("{} bytes, expected 4 or 16", bytes.len()),
            )
        })
    }

    fn port(&self, field: impl fmt::Display, value: u32) -> Result<u16, ConvertError> {
        u16::try_from(value).map_err(|_| {
            self.invalid(
                field.to_string(),
                format!("{value} is not a port (0-65535)"),
            )
        })
    }

    fn unknown_enum(&self, field: &str, value: i32) -> ConvertError {
        self.invalid(field, format!("unknown enum value {value}"))
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Decodes one `istio.workload.Address` resource.
pub fn address(resource: &RawResource) -> Result<Address, ConvertError> {
    let ctx = Ctx::new("address", &resource.name);
    let decoded: pb::Address = ctx.decode(
        resource.resource.as_ref(),
        type_url::ADDRESS,
        "istio.workload.Address",
    )?;
    match decoded.r#type {
        Some(pb::address::Type::Workload(w)) => {
            workload(&Ctx::new("workload", &resource.name), w).map(Address::Workload)
        }
        Some(pb::address::Type::Service(s)) => {
            service(&Ctx::new("service", &resource.name), s).map(Address::Service)
        }
        None => Err(ctx.invalid("type", "neither a workload nor a service")),
    }
}

fn workload(ctx: &Ctx, w: pb::Workload) -> Result<Workload, ConvertError> {
    ctx.check_name("uid", &w.uid, "uid")?;
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            // A v4 workload sent as `::ffff:a.b.c.d` is held (and looked up) as a.b.c.d.
            ctx.ip(format_args!("addresses[{i}]"), bytes)
                .map(|ip| ip.to_canonical())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addresses.is_empty() && !w.hostname.is_empty() {
        tracing::debug!(workload = %w.uid, hostname = %w.hostname, "DNS-named workload without addresses; not reachable by IP");
    }
    let tunnel = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            return Err(ctx.invalid(
                "tunnel_protocol",
                "LEGACY_ISTIO_MTLS is not supported (ztunnel rejects it too)",
            ));
        }
        Err(_) => return Err(ctx.unknown_enum("tunnel_protocol", w.tunnel_protocol)),
    };
    let status = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
        Err(_) => return Err(ctx.unknown_enum("status", w.status)),
    };
    let trust_domain = or_default(w.trust_domain, DEFAULT_TRUST_DOMAIN);
    let service_account = or_default(w.service_account, DEFAULT_SERVICE_ACCOUNT);
    SpiffeId::new(&trust_domain, &w.namespace, &service_account).map_err(|e| {
        ctx.invalid(
            "trust_domain/namespace/service_account",
            format!("not a SPIFFE identity: {e}"),
        )
    })?;
    // Sorted, so the first bad key reported is the same on every try.
    let services: BTreeMap<String, pb::PortList> = w.services.into_iter().collect();
    let mut service_ports = BTreeMap::new();
    for (key, list) in services {
        let field = format!("services[{key:?}]");
        if !key.contains('/') {
            return Err(ctx.invalid(field, "key is not namespace/hostname"));
        }
        let mut ports = BTreeMap::new();
        for (i, port) in list.ports.iter().enumerate() {
            let service_port = service_port(ctx, format!("{field}.ports[{i}].service_port"), port)?;
            let target = ctx.port(
                format_args!("{field}.ports[{i}].target_port"),
                port.target_port,
            )?;
            // 0: this endpoint has no port of its own; the service's target port applies.
            if target != 0 {
                ports.insert(service_port, target);
            }
        }
        service_ports.insert(key, ports);
    }
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account,
        trust_domain,
        labels: Default::default(),
        addresses,
        node: w.node,
        tunnel,
        status,
        netns: None,
        creation_timestamp: None,
        authorization_policies: w.authorization_policies,
        service_ports,
        identity_cache: Default::default(),
    })
}

fn or_default(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

fn service_port(ctx: &Ctx, field: String, port: &pb::Port) -> Result<u16, ConvertError> {
    match ctx.port(&field, port.service_port)? {
        0 => Err(ctx.invalid(field, "0 is not a service port")),
        p => Ok(p),
    }
}

fn service(ctx: &Ctx, s: pb::Service) -> Result<Service, ConvertError> {
    ctx.check_name(
        "namespace/hostname",
        &format!("{}/{}", s.namespace, s.hostname),
        "namespace/hostname",
    )?;
    let mut vips = Vec::new();
    for (i, address) in s.addresses.iter().enumerate() {
        let ip = ctx
            .ip(format_args!("addresses[{i}].address"), &address.address)?
            .to_canonical();
        let full = if ip.is_ipv4() { 32 } else { 128 };
        match address.length {
            None => vips.push(ip),
            Some(length) if length == full => vips.push(ip),
            Some(length) if length > full => {
                return Err(ctx.invalid(
                    format!("addresses[{i}].length"),
                    format!("{length} is longer than the address ({full} bits)"),
                ));
            }
            Some(length) => {
                tracing::warn!(service = %ctx.resource.name, vip = %ip, length, "CIDR VIPs are not supported; this VIP is left out");
            }
        }
    }
    let mut ports = Vec::with_capacity(s.ports.len());
    for (i, port) in s.ports.iter().enumerate() {
        let number = service_port(ctx, format!("ports[{i}].service_port"), port)?;
        let target = ctx.port(format_args!("ports[{i}].target_port"), port.target_port)?;
        ports.push(ServicePort {
            name: None,
            port: number,
            target_port: if target == 0 { number } else { target },
        });
    }
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, san)| {
            san.parse::<SpiffeId>()
                .map_err(|e| ctx.invalid(format!("subject_alt_names[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports,
        endpoints: Endpoints::Listed,
        subject_alt_names,
        external: false,
    })
}

/// Decodes one `istio.security.Authorization` resource.
pub fn authorization(resource: &RawResource) -> Result<Authorization, ConvertError> {
    let ctx = Ctx::new("authorization", &resource.name);
    let a: pb_sec::Authorization = ctx.decode(
        resource.resource.as_ref(),
        type_url::AUTHORIZATION,
        "istio.security.Authorization",
    )?;
    ctx.check_name(
        "namespace/name",
        &format!("{}/{}", a.namespace, a.name),
        "namespace/name",
    )?;
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => Scope::Global,
        Ok(pb_sec::Scope::Namespace) => Scope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(ctx.unknown_enum("scope", a.scope)),
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => Action::Allow,
        Ok(pb_sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(ctx.unknown_enum("action", a.action)),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let matches = clause
                .matches
                .iter()
                .enumerate()
                .map(|(m, one)| {
                    let path = format!("rules[{r}].clauses[{c}].matches[{m}]");
                    match_of(&ctx, &path, one)
                })
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
        not_enforced: Vec::new(),
    })
}

fn match_of(ctx: &Ctx, path: &str, m: &pb_sec::Match) -> Result<Match, ConvertError> {
    let strings = |field: &str, list: &[pb_sec::StringMatch]| {
        list.iter()
            .enumerate()
            .map(|(i, s)| string_match(ctx, &format!("{path}.{field}[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
    };
    let cidrs = |field: &str, list: &[pb_sec::Address]| {
        list.iter()
            .enumerate()
            .map(|(i, a)| cidr(ctx, &format!("{path}.{field}[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |field: &str, list: &[u32]| {
        list.iter()
            .enumerate()
            .map(|(i, p)| ctx.port(format_args!("{path}.{field}[{i}]"), *p))
            .collect::<Result<Vec<_>, _>>()
    };
    let accounts = |list: &[pb_sec::ServiceAccountMatch]| {
        list.iter()
            .map(|sa| ServiceAccountMatch {
                namespace: sa.namespace.clone(),
                service_account: sa.service_account.clone(),
            })
            .collect::<Vec<_>>()
    };
    Ok(Match {
        namespaces: strings("namespaces", &m.namespaces)?,
        not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
        principals: strings("principals", &m.principals)?,
        not_principals: strings("not_principals", &m.not_principals)?,
        source_ips: cidrs("source_ips", &m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", &m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
    })
}

fn string_match(
    ctx: &Ctx,
    field: &str,
    m: &pb_sec::StringMatch,
) -> Result<StringMatch, ConvertError> {
    use pb_sec::string_match::MatchType;
    Ok(match &m.match_type {
        Some(MatchType::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(MatchType::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(MatchType::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(MatchType::Presence(())) => StringMatch::Presence,
        None => return Err(ctx.invalid(field, "no match type set")),
    })
}

fn cidr(ctx: &Ctx, field: &str, a: &pb_sec::Address) -> Result<Cidr, ConvertError> {
    let ip = ctx.ip(format_args!("{field}.address"), &a.address)?;
    u8::try_from(a.length)
        .ok()
        .and_then(|length| Cidr::new(ip, length))
        .ok_or_else(|| {
            ctx.invalid(
                format!("{field}.length"),
                format!("{} is longer than the address", a.length),
            )
        })
}

/// Decodes one `ztund.config.v1.DestinationRule` and reads its spec with the mesh file's reader,
/// so a rule means exactly what it means in a mesh file.
pub fn destination_rule(resource: &RawResource) -> Result<DestinationRule, ConvertError> {
    let ctx = Ctx::new("destination rule", &resource.name);
    let d: pb_ztund::DestinationRule = ctx.decode(
        resource.resource.as_ref(),
        type_url::DESTINATION_RULE,
        "ztund.config.v1.DestinationRule",
    )?;
    ctx.check_name(
        "namespace/name",
        &format!("{}/{}", d.namespace, d.name),
        "namespace/name",
    )?;
    if d.namespace.is_empty() {
        return Err(ctx.invalid("namespace", "must not be empty"));
    }
    // JSON is YAML: the mesh file's reader takes the spec as it comes.
    let spec: Value = serde_norway::from_str(&d.spec_json)
        .map_err(|e| ctx.invalid("spec_json", format!("not JSON: {e}")))?;
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), d.name.clone().into());
    metadata.insert("namespace".into(), d.namespace.clone().into());
    if !d.creation_timestamp.is_empty() {
        metadata.insert(
            "creationTimestamp".into(),
            d.creation_timestamp.clone().into(),
        );
    }
    const API_VERSION: &str = "networking.istio.io/v1";
    let mut body = Mapping::new();
    body.insert("apiVersion".into(), API_VERSION.into());
    body.insert("kind".into(), "DestinationRule".into());
    body.insert("metadata".into(), Value::Mapping(metadata));
    body.insert("spec".into(), spec);
    let raw = RawDocument {
        doc: DocRef {
            file: format!("xDS {}", type_url::DESTINATION_RULE),
            index: 1,
            kind: "DestinationRule".into(),
            namespace: d.namespace,
            name: d.name,
        },
        api_version: API_VERSION.into(),
        body: Value::Mapping(body),
    };
    // The root namespace only matters to AuthorizationPolicies.
    match security::read(&raw, crate::policy::DEFAULT_ROOT_NAMESPACE) {
        Ok(Some(SecurityDocument::DestinationRule(rule))) => Ok(rule),
        Ok(_) => Err(ctx.invalid("spec_json", "not read as a DestinationRule")),
        Err(PolicyError::Invalid { field, reason, .. }) => Err(ctx.invalid(field, reason)),
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
pub(crate) mod tests;
