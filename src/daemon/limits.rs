//! Process limits a node proxy needs. Every proxied connection holds two descriptors (more with
//! pooled HBONE and per-pod listeners), so the usual soft limit of 1024 caps a busy node at a
//! few hundred connections; the hard limit is what the operator (systemd's `LimitNOFILE=`,
//! Kubernetes' container runtime) granted, so ztund takes all of it, as ztunnel does.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tracing::{info, warn};

use crate::hbone::SendBudget;

/// The node's budget of bytes queued toward peers, as metrics: what is queued now and how often
/// a stream had to wait (HARDENING H7).
#[derive(Debug)]
pub struct SendBudgetCollector(pub Arc<SendBudget>);

impl Collector for SendBudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let queued = i64::try_from(self.0.queued()).unwrap_or(i64::MAX);
        ConstGauge::new(queued).encode(encoder.encode_descriptor(
            "ztund_hbone_send_queued_bytes",
            "Bytes handed to HTTP/2 for peers and not yet written, over all HBONE connections",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(self.0.waits()).encode(encoder.encode_descriptor(
            "ztund_hbone_send_budget_waits",
            "Times a stream waited because the node's maxSendQueuedTotal was reached",
            None,
            MetricType::Counter,
        )?)?;
        let held = i64::try_from(self.0.held_windows().granted()).unwrap_or(i64::MAX);
        ConstGauge::new(held).encode(encoder.encode_descriptor(
            "ztund_hbone_recv_held_window_bytes",
            "Connection window granted beyond the base for streams whose app is not reading, over all HBONE connections (limit maxRecvHeldTotal)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// Raises the open-files soft limit to the hard limit, logging both.
pub fn raise_open_files() {
    let (soft, hard) = match open_files() {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit");
            return;
        }
    };
    if soft < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            let error = std::io::Error::last_os_error();
            warn!(soft, hard, %error, "cannot raise the open-files limit");
            return;
        }
    }
    info!(soft_before = soft, soft = hard, hard, "open-files limit");
}

/// The current (soft, hard) open-files limits.
pub fn open_files() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        raise_open_files();
        let (soft, hard) = open_files().unwrap();
        assert_eq!(soft, hard);
    }
}
