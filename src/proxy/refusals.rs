//! Every refusal is visible: counted in `ztund_connections_refused_total{port,reason}` and
//! logged at the default level, at most one line per port and reason each second (a flood must
//! not turn into a log flood), the next line carrying how many were left out.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::info;

use crate::admin::Metrics;

/// How often one (port, reason) may log.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Why ztund turned a connection (or a CONNECT stream) away; the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Accepted into the descriptor reserve and closed at once, or shed to refill it.
    FdReserve,
    /// `accept()` itself failed (out of descriptors, out of memory).
    AcceptFailed,
    /// Shed: the cap on pending handshakes was reached and it was the oldest.
    HandshakesPending,
    /// Shed: its source's cap on pending handshakes was reached and it was the oldest.
    HandshakesPendingFromSource,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The TLS handshake failed (no TLS, an untrusted or invalid certificate...).
    TlsHandshake,
    /// TLS without ALPN `h2`.
    Alpn,
    /// No local workload owns the address the connection reached.
    NoLocalWorkload,
    /// Aimed at one of ztund's own ports or at loopback.
    SelfCall,
    /// A CONNECT to an address that is not the workload the connection reached (never a proxy).
    NotLocalDestination,
    /// A CONNECT authority that is neither a socket address nor a service hostname.
    BadAuthority,
    /// Authorization policy (or mTLS mode) denied it.
    Denied,
    /// The destination is unknown or could not be reached.
    Unavailable,
    /// The outbound plan allows nothing (no such service port, no healthy endpoint...).
    NoRoute,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::FdReserve => "fd_reserve",
            RefusalReason::AcceptFailed => "accept_failed",
            RefusalReason::HandshakesPending => "handshakes_pending",
            RefusalReason::HandshakesPendingFromSource => "handshakes_pending_from_source",
            RefusalReason::HandshakeTimeout => "handshake_timeout",
            RefusalReason::TlsHandshake => "tls_handshake",
            RefusalReason::Alpn => "alpn",
            RefusalReason::NoLocalWorkload => "no_local_workload",
            RefusalReason::SelfCall => "self_call",
            RefusalReason::NotLocalDestination => "not_local_destination",
            RefusalReason::BadAuthority => "bad_authority",
            RefusalReason::Denied => "denied",
            RefusalReason::Unavailable => "unavailable",
            RefusalReason::NoRoute => "no_route",
        }
    }
}

/// Counts and logs refusals.
#[derive(Debug)]
pub struct Refusals {
    metrics: Arc<Metrics>,
    windows: Mutex<HashMap<(u16, RefusalReason), Window>>,
}

/// One (port, reason)'s log window.
#[derive(Debug)]
struct Window {
    logged_at: Instant,
    left_out: u64,
}

impl Refusals {
    pub fn new(metrics: Arc<Metrics>) -> Refusals {
        Refusals {
            metrics,
            windows: Mutex::default(),
        }
    }

    /// Records one refusal on listener `port` of a connection from `peer`; `detail` is for the
    /// log line only.
    pub fn record(&self, port: u16, reason: RefusalReason, peer: SocketAddr, detail: &dyn Display) {
        self.metrics.connection_refused(port, reason.as_str());
        let Some(left_out) = self.may_log(port, reason, Instant::now()) else {
            return;
        };
        info!(
            port,
            reason = reason.as_str(),
            %peer,
            detail = %detail,
            left_out,
            "refused a connection"
        );
    }

    /// `Some(lines left out since the last one)` when this refusal may log.
    fn may_log(&self, port: u16, reason: RefusalReason, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        match windows.get_mut(&(port, reason)) {
            Some(window) if now.duration_since(window.logged_at) < LOG_EVERY => {
                window.left_out += 1;
                None
            }
            Some(window) => {
                window.logged_at = now;
                Some(std::mem::take(&mut window.left_out))
            }
            None => {
                windows.insert(
                    (port, reason),
                    Window {
                        logged_at: now,
                        left_out: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_port_and_reason_each_second_then_the_count_left_out() {
        let refusals = Refusals::new(Metrics::new());
        let start = Instant::now();
        let timeout = RefusalReason::HandshakeTimeout;
        assert_eq!(refusals.may_log(15008, timeout, start), Some(0));
        for ms in [1, 10, 999] {
            let at = start + Duration::from_millis(ms);
            assert_eq!(refusals.may_log(15008, timeout, at), None);
        }
        // Another reason or another port has its own window.
        assert_eq!(
            refusals.may_log(15008, RefusalReason::SelfCall, start),
            Some(0)
        );
        assert_eq!(refusals.may_log(15006, timeout, start), Some(0));
        let later = start + Duration::from_millis(1000);
        assert_eq!(refusals.may_log(15008, timeout, later), Some(3));
        assert_eq!(refusals.may_log(15008, timeout, later), None);
    }

    #[test]
    fn every_refusal_is_counted_by_port_and_reason() {
        let metrics = Metrics::new();
        let refusals = Refusals::new(metrics.clone());
        let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        for _ in 0..3 {
            refusals.record(15008, RefusalReason::HandshakeTimeout, peer, &"silent");
        }
        refusals.record(15006, RefusalReason::SelfCall, peer, &"15021");
        let text = metrics.encode(false);
        assert!(
            text.contains(
                "ztund_connections_refused_total{port=\"15008\",reason=\"handshake_timeout\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("ztund_connections_refused_total{port=\"15006\",reason=\"self_call\"} 1"),
            "{text}"
        );
    }
}
