//! The DNS proxy (PROTOCOL.md §0, §5.4): on 15053 in each captured pod's namespace (and on a VM
//! host), it answers A/AAAA queries for mesh names from the current snapshot and forwards
//! everything else to the upstream resolvers. Pods reach it through the port-53 redirection
//! (`capture::nft_dns`).
//!
//! - `resolve`: which names the mesh owns (Service hostnames and their search-list short forms,
//!   ServiceEntry hosts, wildcard hosts) and their addresses: pure.
//! - `vip`: deterministic VIPs for ServiceEntry hosts without addresses (`mesh::vip`: the
//!   snapshot allocates them, so the outbound path routes what DNS answers).
//! - `forward`: UDP then TCP to the upstreams, timeouts, the node-wide cap on forwards.
//! - `server`: the UDP and TCP servers and the per-query decision.
//! - `metrics`: Istio's `istio_dns_*` counters.
//!
//! DNS messages are read and written with `hickory-proto`; nothing here parses the wire format
//! by hand beyond a forwarded answer's id and TC bit.

pub mod config;
pub mod forward;
pub mod metrics;
pub mod resolve;
pub mod server;

pub use crate::mesh::vip;

use std::sync::{Arc, Mutex};

pub use config::DnsConfig;
pub use forward::{ForwardError, Forwarder};
pub use metrics::DnsMetrics;
pub use resolve::{Lookup, MeshResolver};
pub use server::{DnsListeners, DnsScope};

use crate::admin::ReadyGuard;
use crate::mesh::MeshStore;

/// The readiness task (`/healthz/ready` lists it while pending, as ztunnel names it): pending
/// from the daemon's start until the DNS proxy serves, on the host (VM mode) its listeners,
/// in-pod once pods are being started (each pod's own DNS server belongs to its proxy, which the
/// `workload proxy manager` task covers).
pub const READINESS_TASK: &str = "dns proxy";

/// Everything the node's DNS servers share: the mesh, the resolver's per-snapshot cache, the
/// forwarder (and its cap), the metrics. One per daemon; each pod's server holds an `Arc`.
#[derive(Debug)]
pub struct DnsService {
    mesh: Arc<MeshStore>,
    resolver: MeshResolver,
    forwarder: Forwarder,
    metrics: DnsMetrics,
    /// The [`READINESS_TASK`] until a server serves.
    ready: Mutex<Option<ReadyGuard>>,
}

impl DnsService {
    /// The service for `config` (its upstreams read now: `dns.upstreams`, or `dns.resolvConf`),
    /// Service hostnames under `cluster_domain` (the mesh's, `MeshSettings::cluster_domain`).
    pub fn new(
        config: &DnsConfig,
        cluster_domain: &str,
        mesh: Arc<MeshStore>,
        metrics: DnsMetrics,
    ) -> DnsService {
        let forwarder = Forwarder::new(
            config.upstream_addrs(),
            config.timeout,
            config.max_concurrent_forwards as usize,
        );
        DnsService {
            mesh,
            resolver: MeshResolver::new(cluster_domain),
            forwarder,
            metrics,
            ready: Mutex::new(None),
        }
    }

    /// Holds `task` pending until [`DnsService::mark_serving`].
    pub fn with_readiness(self, task: ReadyGuard) -> DnsService {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self
    }

    /// A server of this service is listening and served: completes the readiness task (once;
    /// later calls do nothing).
    pub fn mark_serving(&self) {
        let task = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.ready();
        }
    }

    /// The upstream resolvers queries are forwarded to.
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// The metrics it records into.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod resolve_tests;
