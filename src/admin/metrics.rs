//! The daemon's Prometheus registry: Istio's TCP traffic metrics (PROTOCOL.md §6.3) under the
//! `istio_` prefix, ztund's own counters and gauges, and process metrics read at scrape time.
//! It does not serve them over HTTP (see `server`) and it does not decide which labels a
//! connection gets: the proxies fill [`TrafficLabels`] and call in.
//!
//! Per connection, the data path records through a [`TrafficSeries`]: one label set's counters,
//! found through a [`SeriesKey`] naming what the labels were derived from, so a connection
//! between a pair already seen neither builds labels nor hashes them.

use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::{Reporter, TrafficLabels, encode_label};
use super::process::ProcessCollector;
use super::series::SeriesCache;
pub use super::series::{SeriesKey, TrafficSeries};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReporterLabels {
    reporter: Reporter,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// Outcome of applying a new mesh file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// The new snapshot is in force.
    Applied,
    /// The file was invalid; the previous snapshot stays.
    Rejected,
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Rejected => "rejected",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PolicyLabels {
    policy: String,
}

impl EncodeLabelSet for PolicyLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_label(&mut encoder, "policy", &self.policy)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    port: u16,
    reason: &'static str,
}

/// Every metric ztund exports, registered once; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections_opened: Family<TrafficLabels, Counter>,
    connections_closed: Family<TrafficLabels, Counter>,
    connections_failed: Family<TrafficLabels, Counter>,
    received_bytes: Family<TrafficLabels, Counter>,
    sent_bytes: Family<TrafficLabels, Counter>,
    sockets_open: Family<ReporterLabels, Gauge>,
    hbone_pool_connections: Gauge,
    mesh_reloads: Family<ReloadLabels, Counter>,
    policy_denials: Family<PolicyLabels, Counter>,
    /// HBONE server limits hit, by `limit` (crate::hbone::LimitHit names).
    hbone_limit_hits: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Inbound dials to apps, by `outcome`: every one, cancelled or not.
    inbound_dials: Family<Vec<(&'static str, &'static str)>, Counter>,
    refused: Family<RefusedLabels, Counter>,
    active_proxies: Gauge,
    pending_proxies: Gauge,
    proxies_started: Counter,
    proxies_stopped: Counter,
    sockets_of_source: OnceLock<Gauge>,
    sockets_of_destination: OnceLock<Gauge>,
    series: RwLock<SeriesCache>,
}

impl Metrics {
    /// A fresh registry with every family registered (and `istio_build` set).
    pub fn new() -> Arc<Metrics> {
        Metrics::new_with(|_| {})
    }

    /// [`Metrics::new`] plus what other parts register themselves (xDS, certificates).
    pub fn new_with(register: impl FnOnce(&mut Registry)) -> Arc<Metrics> {
        let mut metrics = Metrics {
            registry: Registry::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            connections_failed: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            sockets_open: Family::default(),
            hbone_pool_connections: Gauge::default(),
            mesh_reloads: Family::default(),
            policy_denials: Family::default(),
            hbone_limit_hits: Family::default(),
            inbound_dials: Family::default(),
            refused: Family::default(),
            active_proxies: Gauge::default(),
            pending_proxies: Gauge::default(),
            proxies_started: Counter::default(),
            proxies_stopped: Counter::default(),
            sockets_of_source: OnceLock::new(),
            sockets_of_destination: OnceLock::new(),
            series: RwLock::default(),
        };
        metrics.register_istio();
        metrics.register_ztund();
        register(&mut metrics.registry);
        Arc::new(metrics)
    }

    /// Istio's names, under the `istio_` prefix so dashboards and Kiali find them.
    fn register_istio(&mut self) {
        let istio = self.registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            self.connections_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed, failed ones included",
            self.connections_closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "TCP connections that closed with a failure flag",
            self.connections_failed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received from the downstream side",
            self.received_bytes.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent back to the downstream side",
            self.sent_bytes.clone(),
        );
        istio.register(
            "tcp_sockets_open",
            "TCP connections currently open",
            self.sockets_open.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztund".into(),
                tag: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        istio.register("build", "ztund build information", build);
    }

    /// ztund's own metrics, the in-pod workload manager's (Istio's names, no prefix), and the
    /// process collector.
    fn register_ztund(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "ztund_hbone_pool_connections",
            "HBONE client connections in the pool",
            self.hbone_pool_connections.clone(),
        );
        registry.register(
            "ztund_mesh_reloads",
            "Mesh file reloads by outcome",
            self.mesh_reloads.clone(),
        );
        registry.register(
            "ztund_policy_denials",
            "Connections denied, by the policy that denied them",
            self.policy_denials.clone(),
        );
        registry.register(
            "ztund_hbone_limit_hits",
            "HBONE server limits hit (streams refused, connections closed), by limit",
            self.hbone_limit_hits.clone(),
        );
        registry.register(
            "ztund_inbound_dials",
            "Inbound connections ztund opened (or began to open) to apps, by outcome",
            self.inbound_dials.clone(),
        );
        registry.register(
            "ztund_connections_refused",
            "Connections and CONNECT streams refused, by listener port and reason",
            self.refused.clone(),
        );
        registry.register(
            "workload_manager_active_proxy_count",
            "Pods with running proxies",
            self.active_proxies.clone(),
        );
        registry.register(
            "workload_manager_pending_proxy_count",
            "Pods waiting for their proxies",
            self.pending_proxies.clone(),
        );
        registry.register(
            "workload_manager_proxies_started",
            "Pod proxies started",
            self.proxies_started.clone(),
        );
        registry.register(
            "workload_manager_proxies_stopped",
            "Pod proxies stopped",
            self.proxies_stopped.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
    }

    /// Records a connection set up; pair with exactly one [`Metrics::connection_closed`].
    pub fn connection_opened(&self, labels: &TrafficLabels) {
        self.connections_opened.get_or_create(labels).inc();
        self.sockets(labels.reporter).inc();
    }

    /// Records a connection's end with the bytes not yet reported by [`Metrics::add_bytes`].
    /// `received` flowed downstream → upstream, `sent` upstream → downstream. A failure flag in
    /// `labels.response_flags` also counts the connection as failed.
    pub fn connection_closed(&self, labels: &TrafficLabels, received: u64, sent: u64) {
        self.add_bytes(labels, received, sent);
        self.connections_closed.get_or_create(labels).inc();
        if labels.response_flags.is_failure() {
            self.connections_failed.get_or_create(labels).inc();
        }
        self.sockets(labels.reporter).dec();
    }

    /// Reports bytes of a connection still open, so long connections show up before they end.
    pub fn add_bytes(&self, labels: &TrafficLabels, received: u64, sent: u64) {
        if received > 0 {
            self.received_bytes.get_or_create(labels).inc_by(received);
        }
        if sent > 0 {
            self.sent_bytes.get_or_create(labels).inc_by(sent);
        }
    }

    fn sockets(&self, reporter: Reporter) -> &Gauge {
        let slot = match reporter {
            Reporter::Source => &self.sockets_of_source,
            Reporter::Destination => &self.sockets_of_destination,
        };
        slot.get_or_init(|| {
            self.sockets_open
                .get_or_create(&ReporterLabels { reporter })
                .clone()
        })
    }

    /// The series for `key`, building its labels with `labels` only the first time.
    pub fn series(
        &self,
        key: SeriesKey,
        labels: impl FnOnce() -> TrafficLabels,
    ) -> Arc<TrafficSeries> {
        if let Ok(cache) = self.series.read()
            && let Some(series) = cache.series.get(&key)
        {
            return series.clone();
        }
        let series = Arc::new(TrafficSeries::new(labels()));
        match self.series.write() {
            Ok(mut cache) => cache.insert(key, series),
            // A writer panicked mid-insert: record without caching rather than not at all.
            Err(_) => series,
        }
    }

    /// Records a connection set up; pair with exactly one [`Metrics::close`].
    pub fn open(&self, series: &TrafficSeries) {
        series
            .counter(&series.opened, &self.connections_opened)
            .inc();
        self.sockets(series.labels.reporter).inc();
    }

    /// [`Metrics::connection_closed`] for a series.
    pub fn close(&self, series: &TrafficSeries, received: u64, sent: u64) {
        self.add_series_bytes(series, received, sent);
        series
            .counter(&series.closed, &self.connections_closed)
            .inc();
        if series.labels.response_flags.is_failure() {
            series
                .counter(&series.failed, &self.connections_failed)
                .inc();
        }
        self.sockets(series.labels.reporter).dec();
    }

    /// [`Metrics::add_bytes`] for a series.
    pub fn add_series_bytes(&self, series: &TrafficSeries, received: u64, sent: u64) {
        if received > 0 {
            series
                .counter(&series.received, &self.received_bytes)
                .inc_by(received);
        }
        if sent > 0 {
            series.counter(&series.sent, &self.sent_bytes).inc_by(sent);
        }
    }

    /// Sets the number of HBONE client connections in the pool.
    pub fn set_hbone_pool_connections(&self, count: i64) {
        self.hbone_pool_connections.set(count);
    }

    /// A pool connection was established.
    pub fn hbone_pool_connection_opened(&self) {
        self.hbone_pool_connections.inc();
    }

    /// A pool connection was closed or evicted.
    pub fn hbone_pool_connection_closed(&self) {
        self.hbone_pool_connections.dec();
    }

    /// Records one mesh file reload.
    pub fn mesh_reload(&self, result: ReloadResult) {
        self.mesh_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Records a connection denied by `policy` (its `namespace/name`, or a built-in reason).
    pub fn policy_denial(&self, policy: &str) {
        self.policy_denials
            .get_or_create(&PolicyLabels {
                policy: policy.to_string(),
            })
            .inc();
    }

    /// The HBONE server enforced `limit`.
    pub fn hbone_limit_hit(&self, limit: &'static str) {
        self.hbone_limit_hits
            .get_or_create(&vec![("limit", limit)])
            .inc();
    }

    /// An inbound dial to an app ended with `outcome` (`connected`, `failed`, `cancelled`).
    pub fn inbound_dial(&self, outcome: &'static str) {
        self.inbound_dials
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Records a connection (or CONNECT stream) refused on listener `port` for `reason`.
    pub fn connection_refused(&self, port: u16, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { port, reason })
            .inc();
    }

    /// A pod's proxies started: counts it and adds it to the active gauge.
    pub fn proxy_started(&self) {
        self.proxies_started.inc();
        self.active_proxies.inc();
    }

    /// A pod's proxies stopped: counts it and removes it from the active gauge.
    pub fn proxy_stopped(&self) {
        self.proxies_stopped.inc();
        self.active_proxies.dec();
    }

    /// Sets the number of pods with running proxies (e.g. after a ZDS snapshot).
    pub fn set_active_proxies(&self, count: i64) {
        self.active_proxies.set(count);
    }

    /// Sets the number of pods waiting for their proxies.
    pub fn set_pending_proxies(&self, count: i64) {
        self.pending_proxies.set(count);
    }

    /// The exposition text: OpenMetrics 1.0 when `openmetrics`, else Prometheus text 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an error here would come from a label encoder,
        // and a partial exposition is still more useful to a scraper than none.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        if openmetrics {
            text.push_str("# EOF\n");
            text
        } else {
            to_prometheus_text(&text)
        }
    }
}

/// The content type for [`Metrics::encode`]'s output.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

/// Rewrites OpenMetrics text into Prometheus 0.0.4 text: there a counter's HELP and TYPE name
/// the sample with its `_total` suffix, and `# UNIT` does not exist.
fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut held_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(help) = held_help.replace(line) {
                out.push_str(help);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            let total = if name.ends_with("_total") {
                name.to_string()
            } else {
                format!("{name}_total")
            };
            if let Some(help) = held_help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|h| h.strip_prefix(name))
                    .unwrap_or("");
                let _ = writeln!(out, "# HELP {total}{text}");
            }
            let _ = writeln!(out, "# TYPE {total} counter");
            continue;
        }
        if let Some(help) = held_help.take() {
            out.push_str(help);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(help) = held_help {
        out.push_str(help);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(object: &Arc<u32>) -> SeriesKey {
        SeriesKey::new("test", [Some(object.clone() as _), None, None], None)
    }

    #[test]
    fn series_of_objects_nobody_holds_any_more_are_swept() {
        let metrics = Metrics::new();
        let kept = Arc::new(0u32);
        let first = metrics.series(key(&kept), || TrafficLabels::new(Reporter::Source));
        for i in 0..SeriesCache::FIRST_SWEEP as u32 {
            let gone = Arc::new(i + 1);
            metrics.series(key(&gone), || TrafficLabels::new(Reporter::Source));
        }
        let cache = metrics.series.read().unwrap();
        assert!(cache.series.len() < 4, "{} left", cache.series.len());
        let still = cache
            .series
            .get(&key(&kept))
            .expect("a held object keeps its series");
        assert!(Arc::ptr_eq(still, &first));
    }
}
