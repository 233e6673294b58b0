//! `/config_dump`: the mesh as this node sees it and the certificates it holds, as JSON.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::identity::CertManager;
use crate::mesh::{Endpoints, Snapshot, TunnelProtocol};

/// The admin server's config dump.
pub fn config_dump(snapshot: &Snapshot, certificates: &CertManager) -> Value {
    let workloads: Vec<Value> = snapshot
        .workloads()
        .iter()
        .map(|w| {
            json!({
                "uid": w.uid,
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "trustDomain": w.trust_domain,
                "node": w.node,
                "addresses": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "tunnel": match w.tunnel { TunnelProtocol::Hbone => "HBONE", TunnelProtocol::None => "NONE" },
                "healthy": w.status == crate::mesh::HealthStatus::Healthy,
                "labels": w.labels,
                "netns": w.netns,
            })
        })
        .collect();
    let services: Vec<Value> = snapshot
        .services()
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "hostname": s.hostname,
                "vips": s.vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                "endpoints": snapshot.endpoints(s).iter().map(|w| w.uid.clone()).collect::<Vec<_>>(),
                "fixedEndpoints": matches!(s.endpoints, Endpoints::Addresses(_)),
                "external": s.external,
            })
        })
        .collect();
    let certificates: Vec<Value> = certificates
        .snapshot()
        .iter()
        .map(|c| {
            json!({
                "identity": c.id.to_string(),
                "validFrom": unix(c.not_before),
                "expiry": unix(c.not_after),
                "chainLength": c.chain.len(),
            })
        })
        .collect();
    json!({
        "generation": snapshot.generation,
        "workloads": workloads,
        "services": services,
        "certificates": certificates,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
