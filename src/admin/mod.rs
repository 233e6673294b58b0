//! The daemon's observability surface (PROTOCOL.md §6): Prometheus metrics (15020), readiness
//! (15021) and the localhost-only admin server (15000: config dump, log levels, shutdown).
//!
//! This module knows nothing of proxies or the mesh: the data path calls into [`Metrics`] and
//! [`Readiness`], and the daemon hands the admin server a callback for its config dump. Every
//! server stops accepting when the drain signal (a `watch::Receiver<bool>`) turns `true`.

mod labels;
mod metrics;
mod process;
mod readiness;
mod series;
mod server;

#[cfg(test)]
mod tests;

pub use labels::{Reporter, ResponseFlags, SecurityPolicy, TrafficLabels};
pub use metrics::{Metrics, ReloadResult, SeriesKey, TrafficSeries, content_type};
pub use readiness::{Readiness, ReadyGuard};
pub use server::{
    AdminError, AdminState, ConfigDump, bind_admin, serve_admin, serve_metrics, serve_readiness,
};
