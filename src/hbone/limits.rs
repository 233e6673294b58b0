//! Every limit the HBONE server (port 15008) puts on a peer once TLS is up, in one place. The
//! HTTP/2 library's own defaults are never relied on: each value is set here explicitly, so a
//! dependency upgrade cannot loosen one silently (a test pins them all), and `/config_dump`
//! shows them. What HTTP/2 enforces is marked so; the rest is enforced by ztund itself
//! ([`super::budget`], [`super::frames`], [`super::server`]).

use std::time::Duration;

use serde_json::{Value, json};

use super::H2Settings;

/// The server's limits. [`Limits::server`] holds the defaults; tests shrink the timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Windows, frame and header-list sizes, send buffer, advertised
    /// SETTINGS_MAX_CONCURRENT_STREAMS and keepalive (PROTOCOL.md §1.2); HTTP/2 enforces them.
    /// A HEADERS block over 4× the header-list size closes the connection (h2 ≥ 0.4.15).
    pub h2: H2Settings,
    /// HPACK dynamic table we let the peer use (SETTINGS_HEADER_TABLE_SIZE), so one big entry
    /// referenced many times decodes to at most this times the reference count.
    pub header_table_size: u32,
    /// Streams the peer reset before we accepted them that may wait at once; one more is GOAWAY
    /// ENHANCE_YOUR_CALM (Rapid Reset, CVE-2023-44487). Enforced by HTTP/2.
    pub pending_accept_resets: usize,
    /// Streams HTTP/2 itself resets for the peer's protocol errors before it sends GOAWAY
    /// ENHANCE_YOUR_CALM (RUSTSEC-2024-0003). Enforced by HTTP/2.
    pub local_error_resets: usize,
    /// Reset streams remembered (so late frames on them are ignored, not errors) ...
    pub remembered_resets: usize,
    /// ... and for how long.
    pub remembered_reset_for: Duration,
    /// Bytes of framing overhead small DATA frames may cost before the connection is closed
    /// with ENHANCE_YOUR_CALM (RUSTSEC-2026-0258). Empty DATA frames are capped at 100 apart
    /// from this. Enforced by HTTP/2.
    pub data_frame_budget: usize,
    /// PING, SETTINGS and PRIORITY frames a connection may send per second on average; HTTP/2
    /// answers each without limit (CVE-2019-9512, CVE-2019-9515), so ztund counts them as they
    /// arrive and closes an over-budget connection with GOAWAY ENHANCE_YOUR_CALM.
    pub control_frames_per_second: u32,
    /// ... and at once.
    pub control_frame_burst: u32,
    /// After TLS, the client's HTTP/2 preface must arrive within this.
    pub preface_timeout: Duration,
    /// A connection with no open stream for this long (before its first request too) is
    /// closed with GOAWAY NO_ERROR. Longer than the pool's own idle timeout, so the client
    /// side normally closes first.
    pub idle_timeout: Duration,
    /// Streams open at once over all HBONE connections of the node; one more is refused with
    /// REFUSED_STREAM before anything is checked or dialled.
    pub max_streams_total: usize,
    /// Bytes queued toward peers (handed to HTTP/2, not yet written to a connection) over all
    /// connections of the node, served and pooled. Over it, a stream with `send_queued_floor`
    /// bytes of its own queued waits (HARDENING H7; [`super::send_budget`]). Enforced by ztund.
    pub max_send_queued_total: usize,
    /// ... what any stream may queue whatever the node's total, so one peer that fills the
    /// budget slows the rest of the node but never stops it.
    pub send_queued_floor: usize,
    /// Connection window granted, over all connections of the node, beyond each connection's
    /// base for its streams whose app is not reading: each such stream adds its stream window,
    /// so it never starves the rest of its connection (HARDENING H7, [`super::recv_window`]).
    /// Bounds what apps that do not read make the node buffer: connections × base + this.
    pub max_recv_held_total: usize,
    /// CONNECTs one peer identity (over all its connections) may cancel before their answer,
    /// per second on average. A peer over budget gets 429 and GOAWAY ENHANCE_YOUR_CALM, and
    /// its CONNECTs are neither authorized nor dialled (Rapid Reset spread over connections).
    pub early_resets_per_second: u32,
    /// ... and at once.
    pub early_reset_burst: u32,
    /// A stream with bytes to send that the peer grants no send window for this long (it holds
    /// its window at 0, or stops reading so HTTP/2's send buffer stays full) is reset with
    /// CANCEL and its upstream connection closed: otherwise a peer could pin a stream, its
    /// send buffer and the app's connection for as long as it answers PINGs (HARDENING H7).
    pub stream_stall_timeout: Duration,
}

impl Limits {
    /// The defaults.
    pub fn server() -> Limits {
        let h2 = H2Settings::server();
        Limits {
            header_table_size: 4096,
            pending_accept_resets: 20,
            local_error_resets: 1024,
            remembered_resets: 50,
            remembered_reset_for: Duration::from_secs(1),
            data_frame_budget: h2.connection_window as usize / 2,
            control_frames_per_second: 50,
            control_frame_burst: 200,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_streams_total: 16_384,
            max_send_queued_total: 256 << 20,
            send_queued_floor: 64 << 10,
            max_recv_held_total: 64 << 20,
            early_resets_per_second: 10,
            early_reset_burst: 100,
            stream_stall_timeout: Duration::from_secs(60),
            h2,
        }
    }

    /// As `/config_dump` shows them.
    pub fn to_json(&self) -> Value {
        let h2 = &self.h2;
        json!({
            "maxConcurrentStreams": h2.max_concurrent_streams,
            "maxHeaderListSize": h2.max_header_list_size,
            "headerTableSize": self.header_table_size,
            "maxFrameSize": h2.max_frame_size,
            "initialStreamWindow": h2.stream_window,
            "initialConnectionWindow": h2.connection_window,
            "maxSendBufferPerStream": h2.max_send_buffer,
            "pendingAcceptResets": self.pending_accept_resets,
            "localErrorResets": self.local_error_resets,
            "rememberedResets": self.remembered_resets,
            "rememberedResetFor": format!("{:?}", self.remembered_reset_for),
            "dataFrameBudget": self.data_frame_budget,
            "controlFramesPerSecond": self.control_frames_per_second,
            "controlFrameBurst": self.control_frame_burst,
            "keepaliveInterval": format!("{:?}", h2.keepalive_interval),
            "keepaliveTimeout": format!("{:?}", h2.keepalive_timeout),
            "prefaceTimeout": format!("{:?}", self.preface_timeout),
            "idleTimeout": format!("{:?}", self.idle_timeout),
            "maxStreamsTotal": self.max_streams_total,
            "maxSendQueuedTotal": self.max_send_queued_total,
            "sendQueuedFloor": self.send_queued_floor,
            "maxRecvHeldTotal": self.max_recv_held_total,
            "earlyResetsPerSecond": self.early_resets_per_second,
            "earlyResetBurst": self.early_reset_burst,
            "streamStallTimeout": format!("{:?}", self.stream_stall_timeout),
        })
    }

    /// The HTTP/2 server with every setting above applied.
    pub(crate) fn builder(&self) -> h2::server::Builder {
        let h2 = &self.h2;
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(h2.stream_window)
            .initial_connection_window_size(h2.connection_window)
            .max_frame_size(h2.max_frame_size)
            .max_header_list_size(h2.max_header_list_size)
            .header_table_size(self.header_table_size)
            .max_send_buffer_size(h2.max_send_buffer)
            .max_concurrent_streams(h2.max_concurrent_streams)
            .max_pending_accept_reset_streams(self.pending_accept_resets)
            .max_local_error_reset_streams(Some(self.local_error_resets))
            .max_concurrent_reset_streams(self.remembered_resets)
            .reset_stream_duration(self.remembered_reset_for)
            .data_frame_budget(self.data_frame_budget);
        builder
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::server()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every limit, pinned: loosening one must be a visible change to this test.
    #[test]
    fn every_server_limit_is_pinned() {
        // HARDENING h2 baseline, H4, H5, H7, H9, H11 (the node-wide send budget: H7)
        let expected = json!({
            "maxConcurrentStreams": 200,
            "maxHeaderListSize": 65536,
            "headerTableSize": 4096,
            "maxFrameSize": 1048576,
            "initialStreamWindow": 4194304,
            "initialConnectionWindow": 16777216,
            "maxSendBufferPerStream": 409600,
            "pendingAcceptResets": 20,
            "localErrorResets": 1024,
            "rememberedResets": 50,
            "rememberedResetFor": "1s",
            "dataFrameBudget": 8388608,
            "controlFramesPerSecond": 50,
            "controlFrameBurst": 200,
            "keepaliveInterval": "10s",
            "keepaliveTimeout": "20s",
            "prefaceTimeout": "10s",
            "idleTimeout": "600s",
            "maxStreamsTotal": 16384,
            "maxSendQueuedTotal": 268435456,
            "sendQueuedFloor": 65536,
            "maxRecvHeldTotal": 67108864,
            "earlyResetsPerSecond": 10,
            "earlyResetBurst": 100,
            "streamStallTimeout": "60s",
        });
        assert_eq!(Limits::server().to_json(), expected);
    }

    #[test]
    fn one_stream_always_fits_the_base_connection_window() {
        // HARDENING H7 (connection window): holding streams get their windows on top of the
        // base (recv_window), so the base must carry a stream at full window, both sides.
        for h2 in [
            Limits::server().h2,
            crate::hbone::PoolSettings::default().h2,
        ] {
            assert!(h2.stream_window > 0);
            assert!(h2.stream_window <= h2.connection_window, "{h2:?}");
        }
        // Sixteen streams at full window may hold at once before the growth stops.
        assert!(Limits::server().max_recv_held_total >= 16 * (4 << 20));
    }

    #[test]
    fn the_http2_library_is_at_least_the_fixed_version() {
        // HARDENING h2 baseline: the fixes of 0.4.15 (header flood close) and 0.4.16 (small
        // DATA frames) are what the HTTP/2 rows rely on.
        let lock = include_str!("../../Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("\nname = \"h2\"\n"))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"').to_string())
            .expect("h2 in Cargo.lock");
        let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(
            parts[0] == 0 && parts[1] == 4 && parts[2] >= 16,
            "h2 {version} is older than 0.4.16"
        );
    }
}
