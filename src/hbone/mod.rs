//! HBONE: HTTP/2 CONNECT over mutual TLS (PROTOCOL.md §1). The server side (port 15008), the
//! pooled, multiplexed client side, and the stream both hand out. Knows nothing about policy:
//! the server reports who asked for what and the caller accepts or refuses; the client is given
//! an already-verified TLS stream by the caller's dial function.

pub mod budget;
pub mod dialled;
mod frames;
mod keepalive;
pub mod limits;
pub mod pool;
mod pool_settings;
#[doc(hidden)]
pub mod raw_client;
pub mod read_ahead;
pub mod recv_window;
pub mod request;
pub mod send_budget;
pub mod server;
pub mod stream;
#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use budget::{LimitHit, ServerBudget};
pub use dialled::{Dialled, WithCertExpiry};
pub use limits::Limits;
pub use pool::{Pool, PoolKey, PoolSettings, PoolStats};
pub use request::ConnectRequest;
pub use send_budget::SendBudget;
pub use server::{ConnectionInfo, IncomingConnect, Refusal, serve_connection};
pub use stream::{H2Recv, H2Send, H2Stream};

/// The port peers listen on for HBONE.
pub const HBONE_PORT: u16 = 15008;
/// The only ALPN protocol either side offers or accepts.
pub const ALPN_H2: &[u8] = b"h2";

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;
/// Each stream's receive window, either side: 4 MiB in flight keeps one stream near the
/// link's speed (80 KiB cost a single stream 2.1–2.4x its throughput, BENCHMARKS.md change 17).
const STREAM_WINDOW: u32 = 4 * MIB;

/// HTTP/2 settings for one side of an HBONE connection (PROTOCOL.md §1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Settings {
    /// Receive window of each stream.
    pub stream_window: u32,
    /// Receive window of the connection while none of its streams is holding data its app has
    /// not taken; it grows by `stream_window` for each that is, out of the node's budget, so
    /// such streams never starve the others (HARDENING H7, [`recv_window`]).
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    /// Bytes one stream may queue for sending beyond what flow control lets out.
    pub max_send_buffer: usize,
    /// Server: advertised SETTINGS_MAX_CONCURRENT_STREAMS. Client: what is assumed of the peer
    /// until its SETTINGS arrive.
    pub max_concurrent_streams: u32,
    /// Time from setup (and from each PONG) to the next keepalive PING.
    pub keepalive_interval: Duration,
    /// A PING not answered within this tears the connection down.
    pub keepalive_timeout: Duration,
}

impl H2Settings {
    /// The HTTP/2 client (the pool's side) with these settings applied; push is refused.
    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buffer_size(self.max_send_buffer)
            .initial_max_send_streams(self.max_concurrent_streams as usize)
            .enable_push(false);
        builder
    }

    /// The pool (client) side.
    pub fn client() -> Self {
        H2Settings {
            stream_window: STREAM_WINDOW,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_header_list_size: 16 * KIB,
            max_send_buffer: 4 * MIB as usize,
            max_concurrent_streams: 100,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }

    /// The port-15008 (server) side.
    pub fn server() -> Self {
        H2Settings {
            max_header_list_size: 64 * KIB,
            max_send_buffer: 400 * KIB as usize,
            max_concurrent_streams: 200,
            ..H2Settings::client()
        }
    }
}

/// Whether a host that parsed as a name is an address to a resolver: `127.1`, `2130706433` and
/// `10.0.0.0x1` (inet_aton's decimal, octal and hex forms; no top-level domain starts with a
/// digit, RFC 3696 §2) or localhost. Such a host never names a service: the inbound refuses it
/// as `bad_authority` and never resolves it (HARDENING C3).
pub fn is_address_in_disguise(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    let lower = host.to_ascii_lowercase();
    last.starts_with(|c: char| c.is_ascii_digit())
        || lower == "localhost"
        || lower.ends_with(".localhost")
}

/// Where a CONNECT asks to go: its `:authority`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `10.1.2.3:8080` or `[fd00::3]:8080`.
    Addr(SocketAddr),
    /// `reviews.default.svc.cluster.local:9080`: a service hostname (double HBONE, waypoints).
    Host(String, u16),
}

impl Authority {
    /// Parses an `:authority` the way the server must: an `ip:port` first, else `host:port`.
    pub fn parse(text: &str) -> Result<Authority, HboneError> {
        let bad = |reason: &'static str| HboneError::BadAuthority {
            authority: text.to_string(),
            reason,
        };
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Authority::Addr(addr));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
            return Err(bad("malformed IP address"));
        }
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad("the host is not a DNS name"));
        }
        Ok(Authority::Host(host.to_ascii_lowercase(), port))
    }

    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(addr) => addr.port(),
            Authority::Host(_, port) => *port,
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authority::Addr(addr) => write!(f, "{addr}"),
            Authority::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// What went wrong on an HBONE connection or stream; each names the peer.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {peer}: {source}")]
    Dial {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {peer}: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{peer} negotiated ALPN {alpn:?} instead of \"h2\"; closing without HTTP/2")]
    Alpn { peer: SocketAddr, alpn: String },
    #[error("HTTP/2 with {peer}: {source}")]
    H2 {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{peer} answered CONNECT {authority} with {status}")]
    Status {
        peer: SocketAddr,
        authority: String,
        status: http::StatusCode,
    },
    #[error("{peer} allows no streams on a new connection (SETTINGS_MAX_CONCURRENT_STREAMS 0)")]
    StreamLimit { peer: SocketAddr },
    #[error("{peer}: no answer to {what} within {after:?}")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
        after: Duration,
    },
    #[error("CONNECT authority {authority:?}: {reason}")]
    BadAuthority {
        authority: String,
        reason: &'static str,
    },
    #[error("CONNECT header {name}: {reason}")]
    BadHeader { name: String, reason: String },
}

impl HboneError {
    /// The HTTP status the peer refused a CONNECT with, if that is what happened.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
