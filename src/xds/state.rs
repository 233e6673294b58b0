//! The resources the control plane gave this node, by type and name with their versions, and
//! the [`Snapshot`] built from them, merged with the mesh file when both are configured. Talking
//! to the control plane is `client`'s job; decoding one resource is `convert`'s.
//!
//! **A bad update keeps the last good one.** A resource that fails to convert is reported (the
//! NACK) and not stored; when an earlier version of the same name was good, that version stays in
//! force and is the one [`ResourceSink::versions`] reports, so after a reconnect the server
//! resends the newer one (PROTOCOL.md §3.3). This is ztunnel's behaviour too: its conversion fails
//! before the old entry is touched.
//!
//! **Mesh file + control plane** ([`XdsState::snapshot`] with a [`FileMesh`]): the union of both.
//! On a name clash the control plane wins: a workload with the same `uid`, a service with the
//! same `namespace/hostname`, an AuthorizationPolicy with the same `namespace/name` as an xDS
//! Authorization, a DestinationRule with the same `namespace/name`, and a PeerAuthentication
//! whose converted policy (`<ns>/converted_peer_authentication_<name>`) the control plane sends,
//! are taken from the control plane and the file's copy is left out. Addresses claimed by both
//! (a file workload and an xDS workload with one IP, or one VIP) resolve to the control plane's.
//! The file's PeerAuthentications still apply, by level, to xDS workloads too (a mesh-wide STRICT
//! in the file is mesh-wide); its label selectors never pick an xDS workload (xDS workloads carry
//! no labels; istiod lists their policies by name instead).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use super::convert::{self, Address};
use super::{RawResource, ResourceSink};
use crate::mesh::k8s::security::{self, SecurityDocument};
use crate::mesh::k8s::{MeshError, MeshSettings, parse_mesh, split_documents};
use crate::mesh::{RawDocument, Service, Snapshot, Workload, service_key};
use crate::policy::{Authorization, DestinationRule, PolicySetBuilder};
use crate::proto::type_url;

/// One held resource and the version the server gave it.
#[derive(Debug, Clone)]
struct Held<T> {
    version: String,
    value: T,
}

/// Everything the control plane sent, decoded; the sink the xDS client applies responses to.
#[derive(Debug, Default)]
pub struct XdsState {
    /// Workloads (by uid) and services (by `namespace/hostname`): one xDS type, one namespace.
    addresses: BTreeMap<String, Held<Address>>,
    authorizations: BTreeMap<String, Held<Authorization>>,
    destination_rules: BTreeMap<String, Held<DestinationRule>>,
    /// Bumped by every apply that changed a held value.
    generation: u64,
    /// The generation last handed out by [`XdsState::take_changed`].
    taken: u64,
}

/// Which held resources came from the control plane, by kind: name → version. For
/// `/config_dump`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Provenance {
    /// By uid.
    pub workloads: BTreeMap<String, String>,
    /// By `namespace/hostname`.
    pub services: BTreeMap<String, String>,
    /// By `namespace/name`.
    pub authorizations: BTreeMap<String, String>,
    /// By `namespace/name`.
    pub destination_rules: BTreeMap<String, String>,
}

impl XdsState {
    pub fn new() -> XdsState {
        XdsState::default()
    }

    /// Counts the applies that changed a held value (added, replaced by a different value, or
    /// removed); a rebuilt snapshot is needed only when it moved.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True once after each run of applies that changed something: rebuild the snapshot then.
    pub fn take_changed(&mut self) -> bool {
        let changed = self.taken != self.generation;
        self.taken = self.generation;
        changed
    }

    /// The held workloads, by uid.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.addresses
            .values()
            .filter_map(|held| match &held.value {
                Address::Workload(w) => Some(w),
                Address::Service(_) => None,
            })
    }

    /// The held services, by `namespace/hostname`.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.addresses
            .values()
            .filter_map(|held| match &held.value {
                Address::Service(s) => Some(s),
                Address::Workload(_) => None,
            })
    }

    /// The held Authorizations, by `namespace/name`.
    pub fn authorizations(&self) -> impl Iterator<Item = &Authorization> {
        self.authorizations.values().map(|held| &held.value)
    }

    /// The held DestinationRules, by `namespace/name`.
    pub fn destination_rules(&self) -> impl Iterator<Item = &DestinationRule> {
        self.destination_rules.values().map(|held| &held.value)
    }

    /// Name and version of everything held, by kind.
    pub fn provenance(&self) -> Provenance {
        let mut provenance = Provenance::default();
        for (name, held) in &self.addresses {
            let into = match held.value {
                Address::Workload(_) => &mut provenance.workloads,
                Address::Service(_) => &mut provenance.services,
            };
            into.insert(name.clone(), held.version.clone());
        }
        provenance.authorizations = versions_of(&self.authorizations);
        provenance.destination_rules = versions_of(&self.destination_rules);
        provenance
    }

    /// The mesh as this state (and the mesh file, if given) describe it; see the module doc for
    /// how the two are merged. xDS Authorizations are indexed without a selector: the
    /// WORKLOAD_SELECTOR ones apply to the workloads that list them in `authorization_policies`.
    pub fn snapshot(&self, file: Option<&FileMesh>, root_namespace: &str) -> Snapshot {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        let mut builder = PolicySetBuilder::new(root_namespace);
        if let Some(file) = file {
            let uids: HashSet<&str> = self.workloads().map(|w| w.uid.as_str()).collect();
            let service_keys: HashSet<String> = self.services().map(service_key).collect();
            workloads.extend(
                (file.workloads.iter())
                    .filter(|w| !shadowed("workload", &w.uid, uids.contains(w.uid.as_str())))
                    .cloned(),
            );
            services.extend(
                (file.services.iter())
                    .filter(|s| {
                        let key = service_key(s);
                        !shadowed("service", &key, service_keys.contains(&key))
                    })
                    .cloned(),
            );
            for document in &file.policies {
                match document {
                    SecurityDocument::AuthorizationPolicy { policy, selector } => {
                        let key = policy.key();
                        if !shadowed(
                            "authorization",
                            &key,
                            self.authorizations.contains_key(&key),
                        ) {
                            builder.add_authorization(policy.clone(), selector.clone());
                        }
                    }
                    SecurityDocument::PeerAuthentication(pa) => {
                        let converted = pa.converted_key();
                        if !shadowed(
                            "peer authentication",
                            &pa.key(),
                            self.authorizations.contains_key(&converted),
                        ) {
                            builder.add_peer_authentication(pa.clone());
                        }
                    }
                    SecurityDocument::DestinationRule(rule) => {
                        let key = rule.key();
                        if !shadowed(
                            "destination rule",
                            &key,
                            self.destination_rules.contains_key(&key),
                        ) {
                            builder.add_destination_rule(rule.clone());
                        }
                    }
                    SecurityDocument::Skipped => {}
                }
            }
        }
        // Last, so that the control plane's entries win the by-IP and by-VIP indexes too.
        workloads.extend(self.workloads().cloned());
        services.extend(self.services().cloned());
        for policy in self.authorizations() {
            builder.add_authorization(policy.clone(), None);
        }
        for rule in self.destination_rules() {
            builder.add_destination_rule(rule.clone());
        }
        Snapshot::build(workloads, services, builder.build())
    }

    fn apply_to<T: PartialEq>(
        held: &mut BTreeMap<String, Held<T>>,
        convert: impl Fn(&RawResource) -> Result<T, convert::ConvertError>,
        added: Vec<RawResource>,
        removed: Vec<String>,
    ) -> (bool, Vec<(String, String)>) {
        let mut changed = false;
        for name in removed {
            if held.remove(&name).is_some() {
                changed = true;
            } else {
                tracing::debug!(resource = %name, "removal of a resource not held; nothing to do");
            }
        }
        let mut rejected = Vec::new();
        for resource in added {
            match convert(&resource) {
                Ok(value) => {
                    let same = held.get(&resource.name).is_some_and(|h| h.value == value);
                    changed |= !same;
                    held.insert(
                        resource.name,
                        Held {
                            version: resource.version,
                            value,
                        },
                    );
                }
                Err(e) => {
                    let kept = held.get(&resource.name).map(|h| h.version.as_str());
                    tracing::warn!(error = %e, kept_version = ?kept, "xDS resource rejected; the last good version (if any) stays in force");
                    rejected.push((resource.name, e.to_string()));
                }
            }
        }
        (changed, rejected)
    }
}

fn versions_of<T>(held: &BTreeMap<String, Held<T>>) -> BTreeMap<String, String> {
    held.iter()
        .map(|(name, h)| (name.clone(), h.version.clone()))
        .collect()
}

/// Logs a file entry shadowed by the control plane's; returns `is_shadowed`.
fn shadowed(kind: &str, name: &str, is_shadowed: bool) -> bool {
    if is_shadowed {
        tracing::debug!(
            kind,
            name,
            "mesh file entry shadowed by the control plane's"
        );
    }
    is_shadowed
}

impl ResourceSink for XdsState {
    fn apply(
        &mut self,
        type_url: &str,
        added: Vec<RawResource>,
        removed: Vec<String>,
    ) -> Vec<(String, String)> {
        let (changed, rejected) = match type_url {
            type_url::ADDRESS => {
                // One map for both kinds: a removal names a workload uid or a service's
                // namespace/hostname, and whichever is held under that name goes.
                Self::apply_to(&mut self.addresses, convert::address, added, removed)
            }
            type_url::AUTHORIZATION => Self::apply_to(
                &mut self.authorizations,
                convert::authorization,
                added,
                removed,
            ),
            type_url::DESTINATION_RULE => Self::apply_to(
                &mut self.destination_rules,
                convert::destination_rule,
                added,
                removed,
            ),
            other => {
                tracing::warn!(type_url = %other, added = added.len(), removed = removed.len(), "response for a type ztund did not subscribe to; ignored");
                return Vec::new();
            }
        };
        if changed {
            self.generation += 1;
        }
        rejected
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        let held = match type_url {
            type_url::ADDRESS => versions_of(&self.addresses),
            type_url::AUTHORIZATION => versions_of(&self.authorizations),
            type_url::DESTINATION_RULE => versions_of(&self.destination_rules),
            _ => BTreeMap::new(),
        };
        held.into_iter().collect()
    }
}

/// What the mesh file contributes when a control plane is configured too: its workloads,
/// services and security documents, read and validated exactly as the file-only mode reads them
/// (any invalid value refuses the whole file).
#[derive(Debug, Clone, Default)]
pub struct FileMesh {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// PeerAuthentications, AuthorizationPolicies (with their selectors) and DestinationRules.
    pub policies: Vec<SecurityDocument>,
}

impl FileMesh {
    /// Reads the mesh file at `path`.
    pub fn load(path: &Path, settings: &MeshSettings) -> Result<FileMesh, MeshError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Io {
            path: file.clone(),
            source,
        })?;
        FileMesh::from_text(&file, &text, settings)
    }

    /// Reads mesh-file text; `file` names it in errors.
    pub fn from_text(
        file: &str,
        text: &str,
        settings: &MeshSettings,
    ) -> Result<FileMesh, MeshError> {
        FileMesh::from_documents(&split_documents(file, text)?, settings)
    }

    /// Reads split documents.
    pub fn from_documents(
        docs: &[RawDocument],
        settings: &MeshSettings,
    ) -> Result<FileMesh, MeshError> {
        let mesh = parse_mesh(docs, settings)?;
        // The policy module's own checks (duplicate names among them) decide validity; the
        // documents are then read once more to keep them unindexed for the merge.
        crate::mesh::k8s::security::policy_set(docs, &settings.root_namespace)?;
        let mut policies = Vec::new();
        for raw in docs {
            match security::read(raw, &settings.root_namespace)? {
                None | Some(SecurityDocument::Skipped) => {}
                Some(document) => policies.push(document),
            }
        }
        Ok(FileMesh {
            workloads: mesh.workloads,
            services: mesh.services,
            policies,
        })
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "state_update_tests.rs"]
mod update_tests;
