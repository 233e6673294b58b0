//! What every listener of a node shares (config, mesh, credentials, pool, metrics), and whose
//! traffic a listener carries: the node's own (no capture, VM host) or one pod's (in-pod mode).

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::admin::Metrics;
use crate::config::Config;
use crate::hbone::pool::Pool;
use crate::mesh::{MeshStore, Snapshot, Workload};
use crate::net::SocketFactory;
use crate::shard::Spawner;
use crate::tls::Credentials;

use super::accept::LiveConnections;
use super::admission::Admission;
use super::originate::Originator;
use super::tracker::ConnectionTracker;

/// Shared by all listeners of one daemon.
#[derive(Clone)]
pub struct ProxyContext {
    pub config: Arc<Config>,
    pub mesh: Arc<MeshStore>,
    pub credentials: Arc<Credentials>,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// Open inbound connections, re-authorized when policies change.
    pub tracker: Arc<ConnectionTracker>,
    /// TLS client configurations for DestinationRule SIMPLE/MUTUAL.
    pub originator: Arc<Originator>,
    /// Flips to true when the daemon drains.
    pub drain: watch::Receiver<bool>,
    /// Every open proxied connection of the daemon (pods share the daemon's count).
    pub live: Arc<LiveConnections>,
    /// Where listeners run: one per shard ([`crate::shard`]).
    pub shards: Spawner,
    /// The HBONE server's limits and the budgets all its connections share.
    pub hbone_budget: Arc<crate::hbone::ServerBudget>,
    /// Caps on pending handshakes, the descriptor reserve, and the record of refusals.
    pub admission: Arc<Admission>,
}

/// The pod a set of in-pod listeners belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Shared: every tunnel the pod dials carries it in its pool key.
    pub uid: Arc<str>,
    pub name: String,
    pub namespace: String,
}

/// Whose traffic a listener carries, and where its sockets are made.
#[derive(Clone)]
pub struct Scope {
    pub owner: Owner,
    pub sockets: SocketFactory,
}

/// The owner of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The node's own namespace: local workloads are told apart by address.
    Node,
    /// One pod: the listener lives in its network namespace.
    Pod(PodRef),
}

impl Scope {
    /// The local workload that owns `local_ip` for this listener: the pod itself in in-pod mode,
    /// or the node's workload with that address. Never a workload of another node.
    pub fn local_workload(
        &self,
        snapshot: &Snapshot,
        node: &str,
        local_ip: IpAddr,
    ) -> Option<Arc<Workload>> {
        let workload = match &self.owner {
            Owner::Pod(pod) => snapshot
                .workload_by_uid(&pod.uid)
                .or_else(|| {
                    snapshot
                        .workloads()
                        .iter()
                        .find(|w| w.namespace == pod.namespace && w.name == pod.name)
                })?
                .clone(),
            Owner::Node => snapshot.workload_by_ip(local_ip)?.clone(),
        };
        (workload.node == node).then_some(workload)
    }

    /// The workload an outbound connection comes from. In-pod: the pod (never a guess from an
    /// address). On the node: the local workload with the client's address; a loopback client
    /// is the node's only workload, when it has exactly one.
    pub fn source_workload(
        &self,
        snapshot: &Snapshot,
        node: &str,
        client_ip: IpAddr,
    ) -> Option<Arc<Workload>> {
        if let Owner::Pod(_) = self.owner {
            return self.local_workload(snapshot, node, client_ip);
        }
        if client_ip.is_loopback() {
            let mut local = snapshot.local_workloads(node);
            let only = local.next()?;
            return local.next().is_none().then(|| only.clone());
        }
        snapshot
            .workload_by_ip(client_ip)
            .filter(|w| w.node == node)
            .cloned()
    }
}
