//! Filling Istio's traffic labels from a connection's facts: which workloads, which service,
//! which identities. The metrics module only stores them.

use crate::admin::{Reporter, SecurityPolicy, TrafficLabels};
use crate::identity::SpiffeId;
use crate::mesh::{Service, Snapshot, Workload};

use super::route::Plan;

/// Labels for a connection arriving at a local workload.
pub fn inbound(workload: &Workload, peer: Option<&SpiffeId>, snapshot: &Snapshot) -> TrafficLabels {
    let mut labels = TrafficLabels::new(Reporter::Destination);
    fill_destination(&mut labels, workload);
    if let Some(service) = snapshot.services_of(workload).next() {
        fill_service(&mut labels, service);
    }
    if let Some(peer) = peer {
        labels.source_principal = peer.to_string();
        labels.source_workload_namespace = peer.namespace().to_string();
        labels.connection_security_policy = SecurityPolicy::MutualTls;
    }
    labels
}

/// Labels for a connection leaving a local workload.
pub fn outbound(source: Option<&Workload>, plan: &Plan) -> TrafficLabels {
    let mut labels = TrafficLabels::new(Reporter::Source);
    if let Some(source) = source {
        labels.source_workload = source.name.clone();
        labels.source_workload_namespace = source.namespace.clone();
        labels.source_principal = source.identity().to_string();
        labels.source_app = app(source);
        labels.source_version = version(source);
        labels.source_canonical_service = canonical_service(source);
        labels.source_canonical_revision = canonical_revision(source);
    }
    match plan {
        Plan::Hbone {
            workload, service, ..
        } => {
            fill_destination(&mut labels, workload);
            if let Some(service) = service {
                fill_service(&mut labels, service);
            }
            labels.connection_security_policy = SecurityPolicy::MutualTls;
        }
        Plan::Direct {
            workload, service, ..
        } => {
            fill_destination(&mut labels, workload);
            labels.destination_principal = String::new();
            if let Some(service) = service {
                fill_service(&mut labels, service);
            }
        }
        Plan::Originate {
            workload, service, ..
        } => {
            if let Some(workload) = workload {
                fill_destination(&mut labels, workload);
                labels.destination_principal = String::new();
            }
            fill_service(&mut labels, service);
        }
        Plan::Passthrough { .. } | Plan::Refuse(_) => {}
    }
    labels
}

fn fill_destination(labels: &mut TrafficLabels, workload: &Workload) {
    labels.destination_workload = workload.name.clone();
    labels.destination_workload_namespace = workload.namespace.clone();
    labels.destination_principal = workload.identity().to_string();
    labels.destination_app = app(workload);
    labels.destination_version = version(workload);
    labels.destination_canonical_service = canonical_service(workload);
    labels.destination_canonical_revision = canonical_revision(workload);
}

fn fill_service(labels: &mut TrafficLabels, service: &Service) {
    labels.destination_service = service.hostname.clone();
    labels.destination_service_name = service.name.clone();
    labels.destination_service_namespace = service.namespace.clone();
}

fn label(workload: &Workload, keys: &[&str]) -> String {
    keys.iter()
        .find_map(|k| workload.labels.get(*k))
        .cloned()
        .unwrap_or_default()
}

fn app(w: &Workload) -> String {
    label(w, &["app", "app.kubernetes.io/name"])
}

fn version(w: &Workload) -> String {
    label(w, &["version", "app.kubernetes.io/version"])
}

fn canonical_service(w: &Workload) -> String {
    let found = label(
        w,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    );
    if found.is_empty() {
        w.name.clone()
    } else {
        found
    }
}

fn canonical_revision(w: &Workload) -> String {
    let found = label(
        w,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    );
    if found.is_empty() {
        "latest".into()
    } else {
        found
    }
}
