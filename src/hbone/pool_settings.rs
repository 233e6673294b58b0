//! What the pool is configured with and what it reports: the key connections are shared by,
//! the pool's limits and client-side HTTP/2 settings, and its counters.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::H2Settings;
use crate::identity::SpiffeId;

/// Which connections a stream may share: the first four must be equal (PROTOCOL.md §1.7), and
/// the connection runs on the caller's shard, so a stream and its connection's task share a
/// thread ([`crate::shard`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    /// The identities the server may prove, sorted and without duplicates.
    pub expected: Vec<SpiffeId>,
    /// The next hop: a peer's IP and its HBONE port.
    pub destination: SocketAddr,
    pub source_ip: Option<IpAddr>,
    /// The pod whose namespace dials (in-pod capture): its tunnels leave with it
    /// ([`super::Pool::release_pod`]).
    pub pod: Option<Arc<str>>,
    pub shard: usize,
}

impl PoolKey {
    pub fn new(
        source: SpiffeId,
        mut expected: Vec<SpiffeId>,
        destination: SocketAddr,
        source_ip: Option<IpAddr>,
    ) -> Self {
        expected.sort();
        expected.dedup();
        PoolKey {
            source,
            expected,
            destination,
            source_ip,
            pod: None,
            shard: crate::shard::current(),
        }
    }
}

/// Pool limits and the client-side HTTP/2 settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub max_streams_per_connection: u32,
    /// A connection with no streams and no checkout for this long is closed.
    pub idle_timeout: Duration,
    /// ... and after this long if its key has another connection: a burst's extra connections
    /// (100 streams each) hold their TLS and HTTP/2 buffers on both nodes until they close, and
    /// one warm connection per key is all a quiet key needs (issue 16, item 5).
    pub spare_idle_timeout: Duration,
    pub h2: H2Settings,
}

/// The default [`PoolSettings::spare_idle_timeout`]: long enough that a load which dips for a
/// moment does not redial, short enough that the memory comes back well within 30 s.
pub const SPARE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            spare_idle_timeout: SPARE_IDLE_TIMEOUT,
            h2: H2Settings::client(),
        }
    }
}

impl From<&crate::config::PoolConfig> for PoolSettings {
    fn from(config: &crate::config::PoolConfig) -> Self {
        PoolSettings {
            max_streams_per_connection: config.max_streams_per_connection,
            idle_timeout: config.idle_timeout,
            spare_idle_timeout: SPARE_IDLE_TIMEOUT.min(config.idle_timeout),
            h2: H2Settings {
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
                ..H2Settings::client()
            },
        }
    }
}

/// Counters since the pool was made, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub dials: u64,
    pub dial_failures: u64,
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub streams_opened: u64,
    /// CONNECTs the peer answered with a status other than 200.
    pub streams_refused: u64,
}
