//! `/config_dump`: the mesh as this node sees it and the certificates it holds, as JSON, each
//! workload, service and policy with the source it came from (`xds` with its resource version,
//! or `meshFile`), and the HBONE server's limits.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::hbone::Limits;
use crate::identity::CertManager;
use crate::mesh::{Endpoints, Snapshot, TunnelProtocol, service_key};
use crate::xds::client::XdsStatus;
use crate::xds::state::Provenance;

/// Where the state in a dump came from.
#[derive(Debug, Default)]
pub struct Origin {
    pub mesh_file: Option<String>,
    /// The control plane's address, its stream's state and what it sent.
    pub control_plane: Option<(String, XdsStatus, Provenance)>,
}

impl Origin {
    fn of(
        &self,
        kind: fn(&Provenance) -> &std::collections::BTreeMap<String, String>,
        name: &str,
    ) -> Value {
        match &self.control_plane {
            Some((_, _, provenance)) => match kind(provenance).get(name) {
                Some(version) => json!({"source": "xds", "version": version}),
                None => json!({"source": "meshFile"}),
            },
            None => json!({"source": "meshFile"}),
        }
    }
}

/// The admin server's config dump.
pub fn config_dump(
    snapshot: &Snapshot,
    certificates: &CertManager,
    origin: &Origin,
    hbone_limits: &Limits,
) -> Value {
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
                "authorizationPolicies": w.authorization_policies,
                "origin": origin.of(|p| &p.workloads, &w.uid),
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
                "origin": origin.of(|p| &p.services, &service_key(s)),
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
    let policies: Vec<Value> = snapshot
        .policies
        .authorizations()
        .map(|a| {
            json!({
                "name": a.key(),
                "scope": format!("{:?}", a.scope),
                "action": a.action.to_string(),
                "rules": a.rules.len(),
                "dryRun": a.dry_run,
                "origin": origin.of(|p| &p.authorizations, &a.key()),
            })
        })
        .collect();
    let destination_rules: Vec<Value> = snapshot
        .policies
        .destination_rules()
        .iter()
        .map(|r| {
            json!({
                "name": r.key(),
                "host": r.host.to_string(),
                "origin": origin.of(|p| &p.destination_rules, &r.key()),
            })
        })
        .collect();
    let control_plane = origin.control_plane.as_ref().map(|(address, status, _)| {
        json!({
            "address": address,
            "connected": status.connected,
            "received": status.received,
            "pending": status.pending(),
        })
    });
    json!({
        "generation": snapshot.generation,
        "meshFile": origin.mesh_file,
        "controlPlane": control_plane,
        "policies": policies,
        "destinationRules": destination_rules,
        "workloads": workloads,
        "services": services,
        "certificates": certificates,
        "hboneLimits": hbone_limits.to_json(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
