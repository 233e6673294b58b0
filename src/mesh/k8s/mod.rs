//! Reading Kubernetes/Istio YAML into the mesh model, with errors that name the file, the
//! document and the field. This file splits a multi-document file into [`RawDocument`]s and checks
//! what only the whole file can tell (duplicate names, addresses claimed twice, named target
//! ports); `workloads` reads Pod, WorkloadEntry, Service and ServiceEntry. The security kinds
//! (PeerAuthentication, AuthorizationPolicy, DestinationRule) belong to `crate::policy`.

mod claims;
mod fields;
#[cfg(test)]
mod hostile_tests;
mod schema;
pub mod security;
#[cfg(test)]
mod tests;
pub mod workloads;

use std::collections::HashMap;

use serde::Deserialize;
use serde_norway::Value;

use self::fields::{Field, check_dns_label, check_dns_subdomain, describe};
use self::workloads::{ParsedService, ParsedWorkload};
use crate::mesh::model::{DocRef, Endpoints, RawDocument, Service, Workload};
use crate::policy::PolicyError;

/// What the readers need to know about the cluster they describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// Trust domain of every workload's SPIFFE id.
    pub trust_domain: String,
    /// DNS suffix of Kubernetes services (`<name>.<ns>.svc.<cluster_domain>`).
    pub cluster_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
}

impl MeshSettings {
    /// The settings a daemon runs with. The cluster domain is Kubernetes' default, which the
    /// daemon config does not (yet) let one change.
    pub fn from_config(config: &crate::config::Config) -> MeshSettings {
        MeshSettings {
            trust_domain: config.trust_domain.clone(),
            cluster_domain: "cluster.local".into(),
            root_namespace: config.root_namespace.clone(),
        }
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// The largest mesh text read, in bytes, checked before any parsing (HARDENING Y1). The YAML
/// parser buffers every event and a parsed document takes tens of times its text in memory (a
/// 46 MB file of 300 000 pods held 1.6 GB): 8 MiB (some 40 000 small pods) bounds that.
pub const MAX_MESH_BYTES: usize = 8 * 1024 * 1024;

/// The most documents one mesh text may hold (empty ones included): each costs a parse.
pub const MAX_MESH_DOCUMENTS: usize = 65_536;

/// Why a mesh file was refused. Every variant names the file; most name the document and field.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("reading mesh file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {size} bytes, over the cap of {cap} bytes (MAX_MESH_BYTES); nothing was read")]
    TooLarge {
        file: String,
        /// What was found (at least; reading stops past the cap).
        size: u64,
        cap: usize,
    },
    #[error("{file}: more than {cap} documents (MAX_MESH_DOCUMENTS); nothing was applied")]
    TooManyDocuments { file: String, cap: usize },
    #[error("{file} line {line}: YAML syntax error in document {index}: {reason}")]
    Syntax {
        file: String,
        /// 1-based document index in which the parser stopped.
        index: usize,
        /// 1-based line of the error (0 when the parser could not tell).
        line: usize,
        reason: String,
    },
    /// A document too malformed to have a name yet.
    #[error("{file} document {index}{}: field `{field}`: {reason}",
        .kind.as_deref().map(|k| format!(" ({k})")).unwrap_or_default())]
    Header {
        file: String,
        index: usize,
        kind: Option<String>,
        field: String,
        reason: String,
    },
    #[error("{doc}: field `{field}`: {reason}")]
    Invalid {
        // Boxed, as are the other large parts, to keep `Result<_, MeshError>` small.
        doc: Box<DocRef>,
        field: String,
        reason: String,
    },
    /// Something one document claims that another already claimed: a name, an address, a host.
    #[error("{doc}: field `{field}`: {what} is already claimed by {other}")]
    Conflict {
        doc: Box<DocRef>,
        field: String,
        what: String,
        other: Box<DocRef>,
    },
    #[error(transparent)]
    Policy(Box<PolicyError>),
}

impl From<PolicyError> for MeshError {
    fn from(e: PolicyError) -> Self {
        MeshError::Policy(Box::new(e))
    }
}

impl MeshError {
    /// The document the error is about, when there is one.
    pub fn doc(&self) -> Option<&DocRef> {
        match self {
            MeshError::Invalid { doc, .. } | MeshError::Conflict { doc, .. } => Some(doc),
            MeshError::Policy(policy) => match policy.as_ref() {
                PolicyError::Invalid { doc, .. } => Some(doc),
            },
            _ => None,
        }
    }
}

/// Workloads and services read from a mesh file; policies are read separately from the same
/// documents by `PolicySet::from_documents`.
#[derive(Debug, Default, Clone)]
pub struct MeshDocuments {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Documents of kinds ztund does not read (a warning was logged for each).
    pub ignored: Vec<DocRef>,
}

/// Kinds read by the policy module, not here.
const SECURITY_KINDS: [&str; 3] = [
    "PeerAuthentication",
    "AuthorizationPolicy",
    "DestinationRule",
];

/// Splits a multi-document YAML text into documents with their header checked: `apiVersion`,
/// `kind` and `metadata.name` present, `metadata.namespace` defaulting to `default`. Empty
/// documents are skipped but still counted, so indexes match what the user sees.
pub fn split_documents(file: &str, text: &str) -> Result<Vec<RawDocument>, MeshError> {
    if text.len() > MAX_MESH_BYTES {
        return Err(MeshError::TooLarge {
            file: file.to_string(),
            size: text.len() as u64,
            cap: MAX_MESH_BYTES,
        });
    }
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        if index > MAX_MESH_DOCUMENTS {
            return Err(MeshError::TooManyDocuments {
                file: file.to_string(),
                cap: MAX_MESH_DOCUMENTS,
            });
        }
        let body = Value::deserialize(de).map_err(|e| MeshError::Syntax {
            file: file.to_string(),
            index,
            line: e.location().map(|l| l.line()).unwrap_or(0),
            reason: e.to_string(),
        })?;
        if body.is_null() {
            continue;
        }
        docs.push(read_header(file, index, body)?);
    }
    Ok(docs)
}

fn read_header(file: &str, index: usize, body: Value) -> Result<RawDocument, MeshError> {
    let header_error = |kind: Option<&str>, field: &str, reason: String| MeshError::Header {
        file: file.to_string(),
        index,
        kind: kind.map(str::to_string),
        field: field.to_string(),
        reason,
    };
    let Value::Mapping(map) = &body else {
        return Err(header_error(
            None,
            ".",
            format!(
                "expected a mapping with apiVersion, kind and metadata, got {}",
                describe(&body)
            ),
        ));
    };
    let text = |kind: Option<&str>, field: &str, value: Option<&Value>| match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(header_error(kind, field, "required".into())),
        Some(other) => Err(header_error(
            kind,
            field,
            format!("expected a non-empty string, got {}", describe(other)),
        )),
    };
    let kind = text(None, "kind", map.get("kind"))?;
    let kind_ref = Some(kind.as_str());
    let api_version = text(kind_ref, "apiVersion", map.get("apiVersion"))?;
    let metadata = match map.get("metadata") {
        Some(Value::Mapping(m)) => m,
        None | Some(Value::Null) => {
            return Err(header_error(kind_ref, "metadata", "required".into()));
        }
        Some(other) => {
            return Err(header_error(
                kind_ref,
                "metadata",
                format!("expected a mapping, got {}", describe(other)),
            ));
        }
    };
    let name = text(kind_ref, "metadata.name", metadata.get("name"))?;
    check_dns_subdomain(&name)
        .map_err(|reason| header_error(kind_ref, "metadata.name", reason.to_string()))?;
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => "default".to_string(),
        value => text(kind_ref, "metadata.namespace", value)?,
    };
    check_dns_label(&namespace)
        .map_err(|reason| header_error(kind_ref, "metadata.namespace", reason.to_string()))?;
    Ok(RawDocument {
        doc: DocRef {
            file: file.to_string(),
            index,
            kind,
            namespace,
            name,
        },
        api_version,
        body,
    })
}

/// What a document is to this module.
enum Reading {
    Pod,
    WorkloadEntry,
    Service,
    ServiceEntry,
    /// Read by the policy module.
    Security,
    Unknown,
}

/// Decides how to read a document from its apiVersion and kind. A known kind with a version of
/// its own group that ztund does not know is an error, not a silent skip: it is most likely a typo.
fn classify(raw: &RawDocument) -> Result<Reading, MeshError> {
    let (group, version) = match raw.api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", raw.api_version.as_str()),
    };
    let kind = raw.doc.kind.as_str();
    let wrong_version = |expected: &str| MeshError::Invalid {
        doc: Box::new(raw.doc.clone()),
        field: "apiVersion".into(),
        reason: format!("{kind} is read as {expected}, got {:?}", raw.api_version),
    };
    let istio_version = ["v1", "v1beta1", "v1alpha3"].contains(&version);
    Ok(match (group, kind) {
        ("", "Pod" | "Service") if version != "v1" => return Err(wrong_version("v1")),
        ("", "Pod") => Reading::Pod,
        ("", "Service") => Reading::Service,
        ("networking.istio.io", "WorkloadEntry" | "ServiceEntry") if !istio_version => {
            return Err(wrong_version("networking.istio.io/v1, v1beta1 or v1alpha3"));
        }
        ("networking.istio.io", "WorkloadEntry") => Reading::WorkloadEntry,
        ("networking.istio.io", "ServiceEntry") => Reading::ServiceEntry,
        _ if SECURITY_KINDS.contains(&kind) => Reading::Security,
        _ => Reading::Unknown,
    })
}

/// Reads workloads and services from split documents. Security kinds are left to the policy
/// module; other kinds are logged and ignored. Any invalid value refuses the whole file.
pub fn parse_mesh(
    docs: &[RawDocument],
    settings: &MeshSettings,
) -> Result<MeshDocuments, MeshError> {
    let mut names: HashMap<(&str, &str, &str), &DocRef> = HashMap::new();
    let mut workloads: Vec<ParsedWorkload> = Vec::new();
    let mut services: Vec<ParsedService> = Vec::new();
    let mut ignored = Vec::new();
    for raw in docs {
        let reading = classify(raw)?;
        if !matches!(reading, Reading::Unknown) {
            let doc = &raw.doc;
            let key = (doc.kind.as_str(), doc.namespace.as_str(), doc.name.as_str());
            if let Some(first) = names.insert(key, doc) {
                return Err(MeshError::Conflict {
                    doc: Box::new(doc.clone()),
                    field: "metadata.name".into(),
                    what: format!("{} {}/{}", doc.kind, doc.namespace, doc.name),
                    other: Box::new((*first).clone()),
                });
            }
        }
        match reading {
            Reading::Pod => workloads.extend(workloads::parse_pod(raw, settings)?),
            Reading::WorkloadEntry => {
                workloads.push(workloads::parse_workload_entry(raw, settings)?)
            }
            Reading::Service => services.push(workloads::parse_service(raw, settings)?),
            Reading::ServiceEntry => services.extend(workloads::parse_service_entry(raw)?),
            Reading::Security => {}
            Reading::Unknown => {
                tracing::warn!(document = %raw.doc, api_version = %raw.api_version, "kind not read by ztund; document ignored");
                ignored.push(raw.doc.clone());
            }
        }
    }
    let owners = claims::check_workload_addresses(&workloads)?;
    claims::check_service_claims(&services, &owners)?;
    claims::check_node_and_endpoint_claims(&workloads, &services, &owners)?;
    for service in &mut services {
        resolve_named_targets(service, &workloads)?;
    }
    Ok(MeshDocuments {
        workloads: workloads.into_iter().map(|w| w.workload).collect(),
        services: services.into_iter().map(|s| s.service).collect(),
        ignored,
    })
}

/// Turns `targetPort: http` into a number using the selected workloads' port names. The model
/// holds one target port per service port, so the selected workloads must agree.
fn resolve_named_targets(
    parsed: &mut ParsedService,
    workloads: &[ParsedWorkload],
) -> Result<(), MeshError> {
    let service = &mut parsed.service;
    let error = |field: &str, reason: String| MeshError::Invalid {
        doc: Box::new(parsed.doc.clone()),
        field: field.to_string(),
        reason,
    };
    for target in &parsed.named_targets {
        let Endpoints::Selector(selector) = &service.endpoints else {
            return Err(error(
                &target.field,
                format!(
                    "named targetPort {:?} needs spec.selector to resolve against",
                    target.name
                ),
            ));
        };
        let selected = workloads.iter().filter(|w| {
            w.workload.namespace == service.namespace
                && selector
                    .iter()
                    .all(|(k, v)| w.workload.labels.get(k) == Some(v))
        });
        let mut found: Option<(u16, &DocRef)> = None;
        for workload in selected {
            let Some(&number) = workload.named_ports.get(&target.name) else {
                return Err(error(
                    &target.field,
                    format!(
                        "named targetPort {:?} is not a port name of {}",
                        target.name, workload.doc
                    ),
                ));
            };
            match found {
                Some((first, first_doc)) if first != number => {
                    return Err(error(
                        &target.field,
                        format!(
                            "named targetPort {:?} is {first} on {first_doc} but {number} on {}; \
                             ztund needs one number per service port",
                            target.name, workload.doc
                        ),
                    ));
                }
                Some(_) => {}
                None => found = Some((number, &workload.doc)),
            }
        }
        let Some((number, _)) = found else {
            return Err(error(
                &target.field,
                format!(
                    "named targetPort {:?} cannot be resolved: the selector matches no workload",
                    target.name
                ),
            ));
        };
        service.ports[target.port_index].target_port = number;
    }
    Ok(())
}

/// The root field of a document, for the kind readers.
pub(crate) fn root(raw: &RawDocument) -> Field<'_> {
    Field::root(&raw.doc, &raw.body)
}
