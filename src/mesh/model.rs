//! The node's view of the mesh as plain data: workloads, services and the policy documents that
//! came with them. Built by a source (mesh file, xDS), frozen into a [`Snapshot`], never mutated.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::identity::SpiffeId;

/// Labels of a workload or a selector.
pub type Labels = BTreeMap<String, String>;

/// How a workload is reached by other mesh members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TunnelProtocol {
    /// mTLS + HTTP/2 CONNECT to the workload's address on port 15008.
    #[default]
    Hbone,
    /// Plain TCP: the workload is known to the mesh but has no ztund in front of it.
    None,
}

/// Whether a workload takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// One workload: a pod, a `WorkloadEntry` (a VM or a host process).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Stable key, `cluster/group/kind/namespace/name` as Istio writes it
    /// (`Kubernetes//Pod/default/sleep-1`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub labels: Labels,
    /// Pod IPs; the first is the primary.
    pub addresses: Vec<IpAddr>,
    /// Name of the node the workload runs on.
    pub node: String,
    pub tunnel: TunnelProtocol,
    pub status: HealthStatus,
    /// Standalone in-pod mode: the network namespace (`/var/run/netns/NAME` or a path).
    pub netns: Option<String>,
    /// RFC3339 creation time, used for tie-breaks between policies; pods rarely need it.
    pub creation_timestamp: Option<String>,
    /// xDS only: the `namespace/name` of each selector-scoped Authorization istiod says applies
    /// (`Workload.authorization_policies`); a file-sourced workload is matched by its labels.
    pub authorization_policies: Vec<String>,
    /// xDS only: the services this workload backs (`namespace/hostname`), each with its own
    /// service port → target port map (`Workload.services`); see [`Endpoints::Listed`].
    pub service_ports: BTreeMap<String, BTreeMap<u16, u16>>,
    /// The identity built once when the workload entered a [`Snapshot`](super::Snapshot);
    /// `Default` everywhere else. Not part of the workload's value (never compared).
    pub identity_cache: IdentityCache,
}

/// A workload's SPIFFE id, computed once so the data path does not format and parse it on
/// every connection. Only [`Workload::identity`] reads it, and only while it still matches the
/// workload's fields, so a clone whose fields were changed afterwards cannot report a stale id.
#[derive(Debug, Clone, Default)]
pub struct IdentityCache(Option<SpiffeId>);

impl PartialEq for IdentityCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Workload {
    /// The port to dial on this workload for a port of `service`: its own mapping when the
    /// control plane sent one, else the service's. Asked per connection: the key is matched in
    /// its parts, never built.
    pub fn target_port(&self, service: &Service, port: &ServicePort) -> u16 {
        let is_key = |key: &str| {
            key.strip_prefix(service.namespace.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                == Some(service.hostname.as_str())
        };
        self.service_ports
            .iter()
            .find(|(key, _)| is_key(key))
            .and_then(|(_, ports)| ports.get(&port.port))
            .copied()
            .unwrap_or(port.target_port)
    }

    /// The identity this workload proves in TLS.
    pub fn identity(&self) -> SpiffeId {
        self.identity_ref().into_owned()
    }

    /// [`Workload::identity`] without a copy when the workload came from a snapshot.
    pub fn identity_ref(&self) -> Cow<'_, SpiffeId> {
        match &self.identity_cache.0 {
            Some(id)
                if id.service_account() == self.service_account
                    && id.namespace() == self.namespace
                    && id.trust_domain() == self.trust_domain =>
            {
                Cow::Borrowed(id)
            }
            _ => Cow::Owned(self.build_identity()),
        }
    }

    /// Computes the identity once and keeps it; [`Snapshot::build`](super::Snapshot::build)
    /// calls this for every workload it indexes.
    pub fn cache_identity(&mut self) {
        self.identity_cache = IdentityCache(Some(self.build_identity()));
    }

    fn build_identity(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account).unwrap_or_else(
            |_| {
                // Parsing validated every part; this fallback is unreachable for parsed workloads.
                SpiffeId::new("invalid", "invalid", "invalid").expect("static id is valid")
            },
        )
    }
}

/// A port of a service and the endpoint port it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

/// Which workloads back a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// Workloads of the service's namespace whose labels include all of these.
    Selector(Labels),
    /// Fixed endpoint addresses (a `ServiceEntry` with `endpoints`): not mesh workloads unless a
    /// workload owns the address.
    Addresses(Vec<IpAddr>),
    /// No endpoints: traffic to the VIP passes through to the hostname's real address.
    None,
    /// xDS: the workloads that name this service (`namespace/hostname`) in their
    /// `service_ports`, as istiod sends endpoints.
    Listed,
}

/// A Kubernetes `Service` or an Istio `ServiceEntry`.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Fully qualified (`reviews.default.svc.cluster.local`, or the ServiceEntry host).
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Endpoints,
    /// Extra identities a client accepts from this service's endpoints.
    pub subject_alt_names: Vec<SpiffeId>,
    /// True for `ServiceEntry` with `location: MESH_EXTERNAL`.
    pub external: bool,
}

impl Service {
    /// The port entry for a service port, if the service exposes it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// Where a document came from, for error messages and `ztund check` output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocRef {
    pub file: String,
    /// 1-based index of the document in its file.
    pub index: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for DocRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} document {} ({} {}/{})",
            self.file, self.index, self.kind, self.namespace, self.name
        )
    }
}

/// One YAML document of a known kind, not yet turned into the model.
#[derive(Debug, Clone)]
pub struct RawDocument {
    pub doc: DocRef,
    pub api_version: String,
    pub body: serde_norway::Value,
}
