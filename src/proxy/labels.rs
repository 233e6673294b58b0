//! Filling Istio's traffic labels from a connection's facts: which workloads, which service,
//! which identities. The metrics module only stores them.
//!
//! Labels are a function of snapshot entries (immutable, and new ones on every reload), so the
//! `*_series` functions key them by those entries: a connection between a pair already seen
//! reuses its series; one after a reload gets labels built from the new entries.

use std::any::Any;
use std::sync::Arc;

use crate::admin::{Metrics, Reporter, SecurityPolicy, SeriesKey, TrafficLabels, TrafficSeries};
use crate::identity::SpiffeId;
use crate::mesh::{Service, Snapshot, Workload};

use super::route::Plan;

type Source = Option<Arc<dyn Any + Send + Sync>>;

fn source<T: Any + Send + Sync>(object: &Arc<T>) -> Source {
    Some(object.clone() as Arc<dyn Any + Send + Sync>)
}

/// The series of a connection arriving at `workload`, an entry of `snapshot`.
pub fn inbound_series(
    metrics: &Metrics,
    workload: &Arc<Workload>,
    peer: Option<&SpiffeId>,
    snapshot: &Snapshot,
) -> Arc<TrafficSeries> {
    // The workload's services come from the snapshot that owns it, so the entry names them too.
    let key = SeriesKey::new("inbound", [source(workload), None, None], peer.cloned());
    metrics.series(key, || inbound(workload, peer, snapshot))
}

/// The series of a connection leaving `source` (an entry of the snapshot `plan` came from).
pub fn outbound_series(
    metrics: &Metrics,
    source_workload: Option<&Arc<Workload>>,
    plan: &Plan,
) -> Arc<TrafficSeries> {
    let from = source_workload.and_then(source);
    let (derivation, workload, service): (_, Source, Source) = match plan {
        Plan::Hbone {
            workload, service, ..
        } => (
            "outbound-hbone",
            source(workload),
            service.as_ref().and_then(source),
        ),
        Plan::Direct {
            workload, service, ..
        } => (
            "outbound-direct",
            source(workload),
            service.as_ref().and_then(source),
        ),
        Plan::Originate {
            workload, service, ..
        } => (
            "outbound-originate",
            workload.as_ref().and_then(source),
            source(service),
        ),
        Plan::Passthrough { .. } | Plan::Refuse(_) => ("outbound-other", None, None),
    };
    let key = SeriesKey::new(derivation, [from, workload, service], None);
    metrics.series(key, || outbound(source_workload.map(|w| &**w), plan))
}

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
        labels.source_principal = source.identity_ref().to_string();
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
    labels.destination_principal = workload.identity_ref().to_string();
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

pub(crate) fn canonical_service(w: &Workload) -> String {
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

pub(crate) fn canonical_revision(w: &Workload) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::MeshStore;
    use crate::policy::tests::{policies, workload};

    fn snapshot(echo_version: &str) -> Snapshot {
        let sleep = workload("default", "sleep", "sleep", "10.0.0.1", "app=sleep");
        let echo = workload(
            "default",
            "echo",
            "echo",
            "10.0.0.2",
            &format!("app=echo,version={echo_version}"),
        );
        Snapshot::build(vec![sleep, echo], vec![], policies(""))
    }

    fn outbound_of(snapshot: &Snapshot) -> (Arc<Workload>, Plan) {
        let sleep = snapshot.workloads()[0].clone();
        let plan = super::super::route::plan(
            snapshot,
            Some("default"),
            "10.0.0.2:8080".parse().unwrap(),
            15008,
        );
        assert!(matches!(plan, Plan::Hbone { .. }), "{plan:?}");
        (sleep, plan)
    }

    /// The istio_tcp lines of the exposition, sorted (families list series in hash order).
    fn traffic_lines(metrics: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode(true)
            .lines()
            .filter(|l| l.starts_with("istio_tcp"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn cached_series_expose_what_labels_recorded_one_by_one_expose() {
        let snapshot = snapshot("v1");
        let (sleep, plan) = outbound_of(&snapshot);
        let echo = snapshot.workloads()[1].clone();
        let peer = sleep.identity();
        let by_labels = Metrics::new();
        let by_series = Metrics::new();
        for (received, sent) in [(10, 0), (0, 7), (3, 4)] {
            let out = outbound(Some(&sleep), &plan);
            by_labels.connection_opened(&out);
            by_labels.connection_closed(&out, received, sent);
            let inbound_labels = inbound(&echo, Some(&peer), &snapshot);
            by_labels.connection_opened(&inbound_labels);
            by_labels.connection_closed(&inbound_labels, received, sent);

            let out = outbound_series(&by_series, Some(&sleep), &plan);
            by_series.open(&out);
            by_series.close(&out, received, sent);
            let arriving = inbound_series(&by_series, &echo, Some(&peer), &snapshot);
            by_series.open(&arriving);
            by_series.close(&arriving, received, sent);
        }
        let expected = traffic_lines(&by_labels);
        assert!(
            expected
                .iter()
                .any(|l| l.contains("reporter=\"destination\"")),
            "{expected:?}"
        );
        assert_eq!(traffic_lines(&by_series), expected);

        let first = outbound_series(&by_series, Some(&sleep), &plan);
        let again = outbound_series(&by_series, Some(&sleep), &plan);
        assert!(Arc::ptr_eq(&first, &again), "a known pair builds no labels");
        let other_peer = crate::identity::SpiffeId::new("cluster.local", "other", "sa").unwrap();
        let from_other = inbound_series(&by_series, &echo, Some(&other_peer), &snapshot);
        assert!(from_other.labels().source_principal.contains("/ns/other/"));
    }

    #[test]
    fn after_a_reload_that_relabels_a_workload_new_connections_carry_the_new_labels() {
        let mesh = MeshStore::new(snapshot("v1"));
        let metrics = Metrics::new();
        let before = mesh.load();
        let (sleep, plan) = outbound_of(&before);
        let echo = before.workloads()[1].clone();
        let out = outbound_series(&metrics, Some(&sleep), &plan);
        let arriving = inbound_series(&metrics, &echo, None, &before);
        assert_eq!(out.labels().destination_version, "v1");
        assert_eq!(arriving.labels().destination_version, "v1");
        drop((before, sleep, plan, echo));

        mesh.replace(snapshot("v2"));
        let after = mesh.load();
        let (sleep, plan) = outbound_of(&after);
        let echo = after.workloads()[1].clone();
        assert_eq!(
            outbound_series(&metrics, Some(&sleep), &plan)
                .labels()
                .destination_version,
            "v2"
        );
        assert_eq!(
            inbound_series(&metrics, &echo, None, &after)
                .labels()
                .destination_version,
            "v2"
        );
    }
}
