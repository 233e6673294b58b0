//! The daemon's certificates: the identity source the config names (built-in CA, `cacerts`,
//! Istio's CA API, a SPIRE agent), counted by outcome; certificates kept for exactly the
//! identities of this node's workloads (fetched when one appears, dropped when the last one
//! leaves); readiness waiting for them; their expiry as metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{debug, info};

use super::DaemonError;
use crate::admin::Readiness;
use crate::config::{CaConfig, Config};
use crate::grpc::{CallAuth, Target};
use crate::identity::ca::CertificateAuthority;
use crate::identity::istio::IstioCa;
use crate::identity::spire::SpireSource;
use crate::identity::{
    BoxFuture, CertManager, IdentityError, IdentitySource, SpiffeId, WorkloadCertificate,
};
use crate::mesh::{MeshStore, TunnelProtocol};

/// The source `ca` names. Istio's CA takes what `ca` leaves unset from `controlPlane`.
pub fn source(config: &Config) -> Result<Arc<dyn IdentitySource>, DaemonError> {
    Ok(match &config.ca {
        CaConfig::Builtin { dir } | CaConfig::Cacerts { dir } => Arc::new(
            CertificateAuthority::load(dir, &config.trust_domain, config.cert_ttl)?,
        ),
        CaConfig::Istio {
            address,
            root_cert,
            token_file,
            server_name,
        } => {
            let cp = config.control_plane.as_ref();
            let missing = |field| DaemonError::CaFieldMissing { field };
            let target = Target {
                address: address
                    .clone()
                    .or_else(|| cp.map(|c| c.address.clone()))
                    .ok_or_else(|| missing("address"))?,
                root_cert: root_cert
                    .clone()
                    .or_else(|| cp.map(|c| c.root_cert.clone()))
                    .ok_or_else(|| missing("rootCert"))?,
                server_name: server_name
                    .clone()
                    .or_else(|| cp.and_then(|c| c.server_name.clone())),
            };
            let auth = CallAuth {
                token_file: token_file
                    .clone()
                    .or_else(|| cp.and_then(|c| c.token_file.clone())),
                cluster_id: cp.map_or_else(|| "Kubernetes".to_string(), |c| c.cluster_id.clone()),
            };
            Arc::new(IstioCa::new(target, auth, config.cert_ttl, true))
        }
        CaConfig::Spiffe { admin_socket } => Arc::new(SpireSource::new(admin_socket.clone())),
    })
}

/// A source whose every request is counted by outcome (`ztund_ca_requests_total`).
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn IdentitySource>,
    requests: Family<OutcomeLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabels {
    outcome: &'static str,
}

impl Counted {
    pub fn new(inner: Arc<dyn IdentitySource>) -> Arc<Counted> {
        Arc::new(Counted {
            inner,
            requests: Family::default(),
        })
    }

    /// Registers `ztund_ca_requests_total{outcome}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztund_ca_requests",
            "Certificate requests to the identity source, by outcome",
            self.requests.clone(),
        );
    }
}

impl IdentitySource for Counted {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move {
            let result = self.inner.issue(id).await;
            let outcome = if result.is_ok() { "success" } else { "failure" };
            self.requests
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
            result
        })
    }
}

/// Seconds until each held certificate expires, read at scrape time
/// (`ztund_certificate_expiry_seconds{identity}`).
#[derive(Debug)]
pub struct ExpiryCollector(pub Arc<CertManager>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let expiries = self.0.expiries();
        let family = encoder.encode_descriptor(
            "ztund_certificate_expiry_seconds",
            "Seconds until each workload certificate held expires",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let mut family = family;
        let now = SystemTime::now();
        for (id, not_after) in expiries {
            let seconds = not_after
                .duration_since(now)
                .map_or(0, |d| d.as_secs() as i64);
            let labels = IdentityLabels {
                identity: id.to_string(),
            };
            ConstGauge::new(seconds).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Keeps certificates for exactly the identities of this node's HBONE workloads, and readiness
/// pending (`certificate <id>`) for each one not issued yet.
pub async fn follow_local_identities(
    node: String,
    mesh: Arc<MeshStore>,
    certificates: Arc<CertManager>,
    readiness: Readiness,
    mut drain: watch::Receiver<bool>,
) {
    let mut mesh_changes = mesh.subscribe();
    let mut cert_changes = certificates.subscribe();
    let mut wanted: BTreeSet<SpiffeId> = BTreeSet::new();
    let mut waiting: BTreeSet<SpiffeId> = BTreeSet::new();
    loop {
        let snapshot = mesh.load();
        let now: BTreeSet<SpiffeId> = snapshot
            .local_workloads(&node)
            .filter(|w| w.tunnel == TunnelProtocol::Hbone)
            .map(|w| w.identity())
            .collect();
        if now != wanted {
            for gone in wanted.difference(&now) {
                info!(id = %gone, "no workload with this identity left on the node; certificate dropped");
            }
            certificates.sync_local(now.iter().cloned());
            wanted = now;
        }
        let pending: BTreeSet<SpiffeId> = certificates.pending(&wanted).into_iter().collect();
        for done in waiting.difference(&pending) {
            readiness.mark_ready(&task(done));
        }
        for id in pending.difference(&waiting) {
            readiness.mark_pending(&task(id));
        }
        if !pending.is_empty() {
            debug!(
                pending = pending.len(),
                "waiting for certificates of local workloads"
            );
        }
        waiting = pending;
        tokio::select! {
            changed = mesh_changes.changed() => if changed.is_err() { return },
            changed = cert_changes.changed() => if changed.is_err() { return },
            _ = drain.wait_for(|d| *d) => return,
        }
    }
}

fn task(id: &SpiffeId) -> String {
    format!("certificate {id}")
}
