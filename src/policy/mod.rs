//! Pure policy decisions over a snapshot: the effective peer-authentication mode of a
//! (workload, port), the authorization verdict of a connection, the outbound TLS mode of a
//! destination. No I/O and no YAML of any kind: `mesh::k8s::security` reads the documents and
//! builds a [`PolicySet`] with [`PolicySetBuilder`].
//!
//! The policies are held in the shape istiod sends them to ztunnel (`istio.security.Authorization`,
//! PROTOCOL.md §3.5): PeerAuthentication becomes DENY policies exactly as in §4.1, so an xDS client
//! can later feed the same [`PolicySetBuilder`] and get the same decisions.

mod authorization;
mod decide;
mod destination_rule;
mod peer_authentication;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

pub use authorization::{
    Action, Authorization, Cidr, CidrError, Clause, ConnectionFacts, Match, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};
pub use decide::{
    authorize, destination_rule_for, inbound_mtls_mode, outbound_tls, workload_mtls_mode,
};
pub use destination_rule::{
    DestinationRule, HostMatch, OutboundTls, TlsMode, TlsOrigination, TlsSettings,
};
pub use peer_authentication::{
    CONVERTED_PREFIX, CreationTime, EffectiveMode, InboundMode, MtlsMode, PeerAuthentication,
    STATIC_STRICT_POLICY, parse_creation_time,
};

use crate::mesh::{DocRef, Labels, Workload};
use destination_rule::HostIndex;
use peer_authentication::{Enforcement, Levels};

/// The root namespace when none is given: Istio's default.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The policy documents in force, indexed for per-connection decisions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicySet {
    index: Arc<Index>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySetBuilder::new(DEFAULT_ROOT_NAMESPACE).build()
    }
}

impl PolicySet {
    /// The namespace whose selector-less policies apply mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.index.root_namespace
    }

    /// Every authorization policy (converted PeerAuthentications included), ordered by `ns/name`.
    pub fn authorizations(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.index.authorizations.values()
    }

    /// Every PeerAuthentication, ordered by `ns/name`.
    pub fn peer_authentications(&self) -> impl Iterator<Item = &Arc<PeerAuthentication>> {
        self.index.peer_authentications.values()
    }

    /// Every DestinationRule in force (shadowed duplicates left out), ordered by `ns/name`.
    pub fn destination_rules(&self) -> Vec<&Arc<DestinationRule>> {
        let mut rules: Vec<_> = self
            .index
            .destination_rules
            .values()
            .flat_map(HostIndex::rules)
            .collect();
        rules.sort_by_key(|r| (r.namespace.as_str(), r.name.as_str()));
        rules
    }

    /// The policies that apply to a workload, ordered by `ns/name`; a PeerAuthentication-derived
    /// policy comes with the PeerAuthentication (`ns/name`) that put it there.
    pub fn applicable(&self, workload: &Workload) -> Vec<(&Authorization, Option<String>)> {
        let mut found = Vec::new();
        let _ = self.each_candidate(workload, |policy, because| {
            found.push((policy, because.map(PeerAuthentication::key)));
            ControlFlow::<()>::Continue(())
        });
        found.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        found.dedup_by(|a, b| a.0.key() == b.0.key());
        found
    }

    /// Visits the candidate policies of a connection to `workload` (§4.2): all GLOBAL ones, the
    /// NAMESPACE ones of its namespace, the selector ones (root or own namespace) that pick it,
    /// and the PeerAuthentication-derived one it references.
    fn each_candidate<'a, B>(
        &'a self,
        workload: &Workload,
        mut visit: impl FnMut(&'a Authorization, Option<&'a PeerAuthentication>) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        let index = &*self.index;
        for policy in &index.global {
            visit(policy, None)?;
        }
        if let Some(policies) = index.namespaced.get(&workload.namespace) {
            for policy in policies {
                visit(policy, None)?;
            }
        }
        let mut selector_namespaces = [Some(index.root_namespace.as_str()), None];
        if workload.namespace != index.root_namespace {
            selector_namespaces[1] = Some(workload.namespace.as_str());
        }
        for namespace in selector_namespaces.into_iter().flatten() {
            for selected in index.selected.get(namespace).into_iter().flatten() {
                if selects(&selected.selector, &workload.labels) {
                    visit(&selected.policy, None)?;
                }
            }
        }
        // xDS: istiod names the selector-scoped policies (and the PeerAuthentication-derived
        // ones) that apply to the workload; a name not (yet) known is skipped, as ztunnel does.
        for name in &workload.authorization_policies {
            match index.authorizations.get(name) {
                Some(policy) => visit(policy, None)?,
                None => {
                    tracing::debug!(policy = %name, workload = %workload.uid, "referenced policy unknown; skipped")
                }
            }
        }
        match self.levels(workload).enforcement() {
            Enforcement::None => {}
            Enforcement::StaticStrict(pa) => {
                if let Some(policy) = &index.static_strict {
                    visit(policy, Some(pa))?;
                }
            }
            Enforcement::Converted(pa) => match index.converted.get(&pa.key()) {
                Some(policy) => visit(policy, Some(pa))?,
                None => tracing::warn!(peer_authentication = %pa.key(), "converted policy missing"),
            },
        }
        ControlFlow::Continue(())
    }

    /// The effective PeerAuthentication at each level for a workload.
    fn levels(&self, workload: &Workload) -> Levels<'_> {
        let index = &*self.index;
        let mesh = index
            .peer_auth_by_namespace
            .get(&index.root_namespace)
            .and_then(|n| n.namespace_wide.as_deref());
        if workload.namespace == index.root_namespace {
            // Istio ignores selector PeerAuthentications in the root namespace.
            return Levels {
                mesh,
                ..Levels::default()
            };
        }
        let own = index.peer_auth_by_namespace.get(&workload.namespace);
        Levels {
            mesh,
            namespace: own.and_then(|n| n.namespace_wide.as_deref()),
            workload: own.and_then(|n| {
                n.selecting
                    .iter()
                    .find(|pa| pa.selects(&workload.labels))
                    .map(|pa| &**pa)
            }),
        }
    }
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Collects policies from any source (documents, later xDS) and indexes them.
#[derive(Debug)]
pub struct PolicySetBuilder {
    root_namespace: String,
    authorizations: Vec<(Authorization, Option<Labels>)>,
    peer_authentications: Vec<PeerAuthentication>,
    destination_rules: Vec<DestinationRule>,
}

impl PolicySetBuilder {
    pub fn new(root_namespace: &str) -> Self {
        PolicySetBuilder {
            root_namespace: root_namespace.to_string(),
            authorizations: Vec::new(),
            peer_authentications: Vec::new(),
            destination_rules: Vec::new(),
        }
    }

    /// An authorization policy; `selector` (non-empty `matchLabels`) for WORKLOAD_SELECTOR scope.
    pub fn add_authorization(&mut self, policy: Authorization, selector: Option<Labels>) {
        self.authorizations.push((policy, selector));
    }

    pub fn add_peer_authentication(&mut self, pa: PeerAuthentication) {
        self.peer_authentications.push(pa);
    }

    pub fn add_destination_rule(&mut self, rule: DestinationRule) {
        self.destination_rules.push(rule);
    }

    /// Indexes everything: by namespace, selector policies by namespace then label match.
    pub fn build(self) -> PolicySet {
        let root = self.root_namespace;
        let mut index = Index {
            root_namespace: root.clone(),
            ..Index::default()
        };
        for (policy, selector) in self.authorizations {
            let policy = Arc::new(policy);
            index.authorizations.insert(policy.key(), policy.clone());
            match (policy.scope, selector) {
                (Scope::WorkloadSelector, Some(selector)) => index
                    .selected
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(Selected { selector, policy }),
                // Referenced by name only (xDS); nothing selects it by label.
                (Scope::WorkloadSelector, None) => {}
                // Indexed under "" in ztunnel, whatever the namespace field says.
                (Scope::Global, _) => index.global.push(policy),
                (Scope::Namespace, _) => index
                    .namespaced
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(policy),
            }
        }
        index_peer_authentications(&mut index, self.peer_authentications);
        for rule in self.destination_rules {
            index
                .destination_rules
                .entry(rule.namespace.clone())
                .or_default()
                .insert(Arc::new(rule));
        }
        PolicySet {
            index: Arc::new(index),
        }
    }
}

fn index_peer_authentications(index: &mut Index, all: Vec<PeerAuthentication>) {
    if all.is_empty() {
        return;
    }
    let strict = Arc::new(peer_authentication::static_strict_policy(
        &index.root_namespace,
    ));
    index.authorizations.insert(strict.key(), strict.clone());
    index.static_strict = Some(strict);
    let mut all: Vec<Arc<PeerAuthentication>> = all.into_iter().map(Arc::new).collect();
    all.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    for pa in &all {
        index.peer_authentications.insert(pa.key(), pa.clone());
        let level = index
            .peer_auth_by_namespace
            .entry(pa.namespace.clone())
            .or_default();
        if !pa.has_selector() {
            // Sorted oldest first: the first namespace-wide one stays.
            level.namespace_wide.get_or_insert_with(|| pa.clone());
        } else if pa.namespace != index.root_namespace {
            level.selecting.push(pa.clone());
        }
    }
    // Converted policies depend on the namespace and mesh levels above their workloads.
    let mesh = index
        .peer_auth_by_namespace
        .get(&index.root_namespace)
        .and_then(|n| n.namespace_wide.clone());
    for pa in &all {
        if !pa.has_selector() || pa.namespace == index.root_namespace {
            continue;
        }
        let namespace = index
            .peer_auth_by_namespace
            .get(&pa.namespace)
            .and_then(|n| n.namespace_wide.clone());
        let levels = Levels {
            mesh: mesh.as_deref(),
            namespace: namespace.as_deref(),
            workload: None,
        };
        if let Some(policy) = peer_authentication::convert(pa, levels.inherited().0) {
            let policy = Arc::new(policy);
            index.authorizations.insert(policy.key(), policy.clone());
            index.converted.insert(pa.key(), policy);
        }
    }
}

/// The indexed policies behind a [`PolicySet`].
#[derive(Debug, Default)]
struct Index {
    root_namespace: String,
    /// Everything by `ns/name`, for dumps and `ztund check`.
    authorizations: BTreeMap<String, Arc<Authorization>>,
    global: Vec<Arc<Authorization>>,
    namespaced: HashMap<String, Vec<Arc<Authorization>>>,
    /// WORKLOAD_SELECTOR policies by the policy's namespace.
    selected: HashMap<String, Vec<Selected>>,
    peer_authentications: BTreeMap<String, Arc<PeerAuthentication>>,
    peer_auth_by_namespace: HashMap<String, NamespacePeerAuth>,
    static_strict: Option<Arc<Authorization>>,
    /// Converted DENY policies by the key of their PeerAuthentication.
    converted: HashMap<String, Arc<Authorization>>,
    destination_rules: HashMap<String, HostIndex>,
}

#[derive(Debug)]
struct Selected {
    selector: Labels,
    policy: Arc<Authorization>,
}

/// The PeerAuthentications of one namespace.
#[derive(Debug, Default)]
struct NamespacePeerAuth {
    /// The oldest one without selector.
    namespace_wide: Option<Arc<PeerAuthentication>>,
    /// With selector, oldest first (so the first that selects a workload wins).
    selecting: Vec<Arc<PeerAuthentication>>,
}

/// A security document ztund cannot enforce as written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("{doc}: field `{field}`: {reason}")]
    Invalid {
        doc: DocRef,
        field: String,
        reason: String,
    },
}

/// The verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason (which policy) for the access log.
    Deny(String),
}
