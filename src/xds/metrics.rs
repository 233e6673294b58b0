//! The xDS client's Prometheus metrics: connection state, stream terminations by reason,
//! responses and their bytes by type, NACKs, and resources held by type. The client records
//! into an [`XdsMetrics`]; the daemon registers it in its registry. Istio's names keep the
//! `istio_` prefix (ztunnel's `istio_xds_*`), ztund's own the `ztund_` one.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Why a stream to the control plane ended (ztunnel's label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum TerminationReason {
    /// No stream was opened: channel, TLS, token or connect failure.
    ConnectionError,
    /// The server refused the stream or it failed with a gRPC status (a keepalive timeout too).
    Error,
    /// The server ended the stream cleanly.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: TerminationReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

/// The client's metrics; clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    connected: Gauge,
    terminations: Family<ReasonLabels, Counter>,
    messages: Family<UrlLabels, Counter>,
    message_bytes: Family<UrlLabels, Counter>,
    nacks: Family<UrlLabels, Counter>,
    resources: Family<UrlLabels, Gauge>,
}

impl XdsMetrics {
    /// Fresh, unregistered metrics.
    pub fn new() -> XdsMetrics {
        XdsMetrics::default()
    }

    /// Registers every metric in `registry` (counters get their `_total` suffix there).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ztund_xds_connected",
            "1 while a stream to the control plane is open",
            self.connected.clone(),
        );
        registry.register(
            "istio_xds_connection_terminations",
            "Streams to the control plane that ended, by reason",
            self.terminations.clone(),
        );
        registry.register(
            "istio_xds_message",
            "Responses received from the control plane, by type URL",
            self.messages.clone(),
        );
        registry.register(
            "istio_xds_message_bytes",
            "Bytes of the responses received from the control plane, by type URL",
            self.message_bytes.clone(),
        );
        registry.register(
            "ztund_xds_nacks",
            "Responses NACKed (some resource rejected), by type URL",
            self.nacks.clone(),
        );
        registry.register(
            "ztund_xds_resources",
            "Resources held, by type URL",
            self.resources.clone(),
        );
    }

    /// Whether a stream is open now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// A stream ended (or could not be opened).
    pub fn terminated(&self, reason: TerminationReason) {
        self.terminations
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A response of `url` arrived, `bytes` long.
    pub fn message(&self, url: &str, bytes: usize) {
        let labels = UrlLabels { url: url.into() };
        self.messages.get_or_create(&labels).inc();
        self.message_bytes
            .get_or_create(&labels)
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// A response of `url` was NACKed.
    pub fn nack(&self, url: &str) {
        self.nacks
            .get_or_create(&UrlLabels { url: url.into() })
            .inc();
    }

    /// `count` resources of `url` are held now.
    pub fn set_resources(&self, url: &str, count: usize) {
        self.resources
            .get_or_create(&UrlLabels { url: url.into() })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_the_series_istio_dashboards_read() {
        let metrics = XdsMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.set_connected(true);
        metrics.terminated(TerminationReason::ConnectionError);
        metrics.message("type.googleapis.com/istio.workload.Address", 42);
        metrics.nack("type.googleapis.com/istio.workload.Address");
        metrics.set_resources("type.googleapis.com/istio.workload.Address", 3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "ztund_xds_connected 1",
            "istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 1",
            "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "istio_xds_message_bytes_total{url=\"type.googleapis.com/istio.workload.Address\"} 42",
            "ztund_xds_nacks_total{url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "ztund_xds_resources{url=\"type.googleapis.com/istio.workload.Address\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
