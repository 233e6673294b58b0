//! The DNS proxy's Prometheus metrics under Istio's names (PROTOCOL.md §6.3):
//! `istio_dns_requests_total`, `istio_dns_upstream_requests_total`,
//! `istio_dns_upstream_failures_total`, plus `istio_dns_upstream_request_duration_seconds` as
//! ztunnel has it, and ztund's own `ztund_dns_refused_total` (queries shed by the forward cap)
//! and `ztund_dns_malformed_total`. The server records; the daemon registers them.
//!
//! Checked against ztunnel's own DNS metrics: the same four names (its registry prefixes
//! `istio_`; the duration is a histogram with unit seconds), the same four labels, the query type
//! and the protocol lowercase (`a`, `aaaa`; `udp`, `tcp`), an unknown source workload's
//! canonical service and revision `unknown`. The duration's buckets differ (ztunnel's are
//! 1 ms to 5 s in six steps; these are finer), which changes no name or label.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The transport a query came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    udp,
    tcp,
}

/// ztunnel's DNS labels: the query type, the transport and the asking workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// `a`, `aaaa`, `srv`, ...: the query's type, lowercase as ztunnel writes it.
    pub request_query_type: String,
    pub request_protocol: Protocol,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms to ~4 s: loopback resolvers answer in well under a millisecond, slow ones in
    // seconds, and the timeout is at most a minute.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 14,
    ))
}

/// The DNS proxy's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram>,
    pub refused: Counter,
    pub malformed: Counter,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(duration_histogram),
            refused: Counter::default(),
            malformed: Counter::default(),
        }
    }
}

impl DnsMetrics {
    /// Registers every metric in `registry` (counters get their `_total` suffix there).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "DNS queries received by the DNS proxy",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to an upstream resolver",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries no upstream answered",
            self.upstream_failures.clone(),
        );
        // With its unit, as ztunnel registers it: the `_seconds` suffix and OpenMetrics' `# UNIT`.
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Time an upstream resolver took to answer a forwarded query",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        registry.register(
            "ztund_dns_refused",
            "DNS queries answered REFUSED because dns.maxConcurrentForwards were in flight",
            self.refused.clone(),
        );
        registry.register(
            "ztund_dns_malformed",
            "DNS queries that could not be parsed (answered FORMERR when they had a header)",
            self.malformed.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition names, units and label values ztunnel's DNS metrics have.
    #[test]
    fn names_units_and_labels_are_ztunnels() {
        let metrics = DnsMetrics::default();
        let labels = DnsLabels {
            request_query_type: "aaaa".into(),
            request_protocol: Protocol::tcp,
            source_canonical_service: "unknown".into(),
            source_canonical_revision: "unknown".into(),
        };
        metrics.requests.get_or_create(&labels).inc();
        metrics.upstream_requests.get_or_create(&labels).inc();
        metrics.upstream_failures.get_or_create(&labels).inc();
        metrics
            .upstream_duration
            .get_or_create(&labels)
            .observe(0.002);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series = "{request_query_type=\"aaaa\",request_protocol=\"tcp\",\
                      source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\"}";
        for name in [
            "istio_dns_requests_total",
            "istio_dns_upstream_requests_total",
            "istio_dns_upstream_failures_total",
            "istio_dns_upstream_request_duration_seconds_count",
        ] {
            assert!(
                text.contains(&format!("{name}{series} 1")),
                "{name}:\n{text}"
            );
        }
        assert!(
            text.contains("# UNIT istio_dns_upstream_request_duration_seconds seconds"),
            "{text}"
        );
    }
}
