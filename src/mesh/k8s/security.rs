//! Reading the security documents: `security.istio.io` PeerAuthentication and AuthorizationPolicy,
//! `networking.istio.io` DestinationRule, into the policy model. Invalid values are errors naming
//! the document and the field; a field not in Istio's schema is an error naming it. Indexing and decisions
//! live in `policy`; other kinds (Pods, Services…) in `workloads`.

// `PolicyError` carries the whole `DocRef` so a user sees file, document and field; it is built
// once per refused configuration, never per connection, so its size does not matter.
#![allow(clippy::result_large_err)]

mod authorization_policy;
mod node;

use std::collections::{BTreeMap, HashSet};

use serde_norway::Value;

use super::super::model::RawDocument;
use crate::mesh::Labels;
use crate::policy::{
    Authorization, DestinationRule, HostMatch, MtlsMode, PeerAuthentication, PolicyError,
    PolicySet, PolicySetBuilder, TlsMode, TlsSettings, parse_creation_time,
};
use node::Node;
pub use node::{MAX_LIST_ITEMS, MAX_STRING_BYTES};

/// One security document, read.
#[derive(Debug, Clone, PartialEq)]
pub enum SecurityDocument {
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy {
        policy: Authorization,
        /// Non-empty `spec.selector.matchLabels`.
        selector: Option<Labels>,
    },
    DestinationRule(DestinationRule),
    /// Valid, but nothing ztunnel enforces (a policy with `targetRef`).
    Skipped,
}

const SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const NETWORKING_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Reads the security documents (PeerAuthentication, AuthorizationPolicy, DestinationRule)
/// among `docs` into a policy set, ignoring other kinds. Any invalid value refuses the whole set;
/// the same kind, namespace and name twice is refused too (no copy silently wins).
pub fn policy_set(docs: &[RawDocument], root_namespace: &str) -> Result<PolicySet, PolicyError> {
    let mut builder = PolicySetBuilder::new(root_namespace);
    let mut seen = HashSet::new();
    for raw in docs {
        let Some(document) = read(raw, root_namespace)? else {
            continue;
        };
        let d = &raw.doc;
        if !seen.insert((d.kind.clone(), d.namespace.clone(), d.name.clone())) {
            return Err(PolicyError::Invalid {
                doc: d.clone(),
                field: "metadata.name".to_string(),
                reason: format!("a second {} named {}/{}", d.kind, d.namespace, d.name),
            });
        }
        match document {
            SecurityDocument::PeerAuthentication(pa) => builder.add_peer_authentication(pa),
            SecurityDocument::AuthorizationPolicy { policy, selector } => {
                builder.add_authorization(policy, selector)
            }
            SecurityDocument::DestinationRule(rule) => builder.add_destination_rule(rule),
            SecurityDocument::Skipped => {}
        }
    }
    Ok(builder.build())
}

/// Reads `raw` if it is one of the security kinds; `Ok(None)` for any other kind.
pub fn read(
    raw: &RawDocument,
    root_namespace: &str,
) -> Result<Option<SecurityDocument>, PolicyError> {
    let versions = match raw.doc.kind.as_str() {
        "PeerAuthentication" | "AuthorizationPolicy" => SECURITY_VERSIONS,
        "DestinationRule" => NETWORKING_VERSIONS,
        _ => return Ok(None),
    };
    let root = Node::root(&raw.doc, &raw.body);
    if !versions.contains(&raw.api_version.as_str()) {
        return Err(root.field("apiVersion").invalid(format!(
            "{:?} is not a version of {}; expected one of {}",
            raw.api_version,
            raw.doc.kind,
            versions.join(", ")
        )));
    }
    root.mapping(&["apiVersion", "kind", "metadata", "spec", "status"])?;
    let meta = Meta::read(&root)?;
    let spec = root.field("spec");
    let document = match raw.doc.kind.as_str() {
        "PeerAuthentication" => {
            SecurityDocument::PeerAuthentication(peer_authentication(&spec, meta)?)
        }
        "AuthorizationPolicy" => authorization_policy::read(&spec, meta, root_namespace)?,
        _ => SecurityDocument::DestinationRule(destination_rule(&spec, meta)?),
    };
    Ok(Some(document))
}

/// What the readers take from `metadata`.
pub(super) struct Meta {
    name: String,
    namespace: String,
    created: Option<crate::policy::CreationTime>,
    dry_run: bool,
}

impl Meta {
    fn read(root: &Node<'_>) -> Result<Meta, PolicyError> {
        let metadata = root.field("metadata");
        metadata.mapping(super::schema::OBJECT_META)?;
        // The mesh-file reader fills the DocRef from metadata (namespace defaulted); a policy
        // still needs a name to be referenced and reported.
        if root.doc.name.is_empty() {
            return Err(metadata
                .field("name")
                .invalid("missing: every policy needs a name"));
        }
        let created = match metadata.field("creationTimestamp").optional() {
            Some(node) => {
                let text = node.str()?;
                Some(parse_creation_time(text).ok_or_else(|| {
                    node.invalid(format!(
                        "{text:?} is not an RFC 3339 time (2024-01-31T12:00:00Z)"
                    ))
                })?)
            }
            None => None,
        };
        let dry_run = match metadata
            .field("annotations")
            .field("istio.io/dry-run")
            .optional()
        {
            Some(node) => match node.value {
                Value::Bool(b) => *b,
                Value::String(s) if s.eq_ignore_ascii_case("true") => true,
                Value::String(s) if s.eq_ignore_ascii_case("false") => false,
                _ => return Err(node.invalid("must be \"true\" or \"false\"")),
            },
            None => false,
        };
        Ok(Meta {
            name: root.doc.name.clone(),
            namespace: root.doc.namespace.clone(),
            created,
            dry_run,
        })
    }
}

/// `spec.selector.matchLabels`; an empty one counts as no selector.
fn selector(spec: &Node<'_>) -> Result<Option<Labels>, PolicyError> {
    let Some(selector) = spec.field("selector").optional() else {
        return Ok(None);
    };
    selector.mapping(&["matchLabels"])?;
    let labels = match selector.field("matchLabels").optional() {
        Some(node) => node.labels()?,
        None => Labels::new(),
    };
    Ok((!labels.is_empty()).then_some(labels))
}

fn mtls_mode(node: &Node<'_>) -> Result<MtlsMode, PolicyError> {
    let Some(mode) = node.optional() else {
        return Ok(MtlsMode::Unset);
    };
    match mode.str()? {
        "UNSET" => Ok(MtlsMode::Unset),
        "STRICT" => Ok(MtlsMode::Strict),
        "PERMISSIVE" => Ok(MtlsMode::Permissive),
        "DISABLE" => Ok(MtlsMode::Disable),
        other => Err(mode.invalid(format!(
            "unknown mode {other:?}; expected STRICT, PERMISSIVE, DISABLE or UNSET"
        ))),
    }
}

fn peer_authentication(spec: &Node<'_>, meta: Meta) -> Result<PeerAuthentication, PolicyError> {
    spec.mapping(&["selector", "mtls", "portLevelMtls"])?;
    let selector = selector(spec)?;
    let mtls = spec.field("mtls");
    mtls.mapping(&["mode"])?;
    let mode = mtls_mode(&mtls.field("mode"))?;
    let mut port_level = BTreeMap::new();
    if let Some(ports) = spec.field("portLevelMtls").optional() {
        if selector.is_none() {
            return Err(ports.invalid(
                "portLevelMtls needs spec.selector.matchLabels: it applies to the ports of selected workloads",
            ));
        }
        for (key, entry) in ports.entries()? {
            let port = entry.port_key(key)?;
            entry.mapping(&["mode"])?;
            port_level.insert(port, mtls_mode(&entry.field("mode"))?);
        }
    }
    Ok(PeerAuthentication {
        name: meta.name,
        namespace: meta.namespace,
        selector,
        mode,
        port_level,
        created: meta.created,
    })
}

fn destination_rule(spec: &Node<'_>, meta: Meta) -> Result<DestinationRule, PolicyError> {
    spec.mapping(&[
        "host",
        "trafficPolicy",
        "subsets",
        "exportTo",
        "workloadSelector",
    ])?;
    let host_node = spec.field("host");
    let host = host_node
        .optional()
        .ok_or_else(|| host_node.invalid("missing: the rule needs a host"))?
        .str()?;
    if host.is_empty() {
        return Err(host_node.invalid("must not be empty"));
    }
    if let Some(selector) = spec.field("workloadSelector").optional() {
        tracing::warn!(doc = %selector.doc, field = %selector.path, "workloadSelector is not supported; the rule applies to every client");
    }
    let policy = spec.field("trafficPolicy");
    policy.mapping(&[
        "tls",
        "portLevelSettings",
        "connectionPool",
        "loadBalancer",
        "outlierDetection",
        "tunnel",
        "proxyProtocol",
        "retryBudget",
    ])?;
    let tls = policy
        .field("tls")
        .optional()
        .map(|n| tls_settings(&n))
        .transpose()?;
    // Subsets are not read (ztunnel has none), but a typo in one is still a typo.
    for subset in spec.field("subsets").list()? {
        subset.mapping(&["name", "labels", "trafficPolicy"])?;
    }
    let mut port_tls = BTreeMap::new();
    if let Some(settings) = policy.field("portLevelSettings").optional() {
        for entry in settings.list()? {
            entry.mapping(&[
                "port",
                "tls",
                "connectionPool",
                "loadBalancer",
                "outlierDetection",
            ])?;
            let port_node = entry.field("port");
            port_node.mapping(&["number"])?;
            let number = port_node.field("number");
            let port = number
                .optional()
                .ok_or_else(|| {
                    number.invalid("missing: each portLevelSettings entry needs a port")
                })?
                .port()?;
            if let Some(tls) = entry.field("tls").optional()
                && port_tls.insert(port, tls_settings(&tls)?).is_some()
            {
                return Err(number.invalid(format!("port {port} appears twice")));
            }
        }
    }
    Ok(DestinationRule {
        host: HostMatch::parse(host, &meta.namespace),
        name: meta.name,
        namespace: meta.namespace,
        tls,
        port_tls,
        created: meta.created,
    })
}

fn tls_settings(tls: &Node<'_>) -> Result<TlsSettings, PolicyError> {
    tls.mapping(&[
        "mode",
        "caCertificates",
        "clientCertificate",
        "privateKey",
        "sni",
        "subjectAltNames",
        "insecureSkipVerify",
        "credentialName",
        "caCrl",
    ])?;
    let mode_node = tls.field("mode");
    let mode = match mode_node.optional() {
        None => None,
        Some(node) => Some(match node.str()? {
            "DISABLE" => TlsMode::Disable,
            "SIMPLE" => TlsMode::Simple,
            "MUTUAL" => TlsMode::Mutual,
            "ISTIO_MUTUAL" => TlsMode::IstioMutual,
            other => {
                return Err(node.invalid(format!(
                    "unknown mode {other:?}; expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"
                )));
            }
        }),
    };
    let text = |key: &str| -> Result<Option<String>, PolicyError> {
        tls.field(key).optional().map(|n| n.string()).transpose()
    };
    let settings = TlsSettings {
        mode,
        ca_certificates: text("caCertificates")?,
        client_certificate: text("clientCertificate")?,
        private_key: text("privateKey")?,
        sni: text("sni")?,
        subject_alt_names: match tls.field("subjectAltNames").optional() {
            Some(node) => node.strings()?,
            None => Vec::new(),
        },
        insecure_skip_verify: match tls.field("insecureSkipVerify").optional() {
            Some(node) => node.bool()?,
            None => false,
        },
    };
    if let Some(credential) = tls.field("credentialName").optional() {
        tracing::warn!(doc = %credential.doc, field = %credential.path, "credentialName (a Kubernetes secret) is not supported; use file paths");
    }
    if mode == Some(TlsMode::Mutual) {
        for (key, value) in [
            ("clientCertificate", &settings.client_certificate),
            ("privateKey", &settings.private_key),
        ] {
            if value.is_none() {
                return Err(tls
                    .field(key)
                    .invalid("missing: MUTUAL needs clientCertificate and privateKey"));
            }
        }
    }
    Ok(settings)
}
