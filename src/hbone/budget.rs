//! What the HBONE server's connections share: the node-wide stream budget, the budget of bytes
//! queued toward peers ([`super::send_budget`]) and each peer identity's budget of CONNECTs cancelled before their answer (Rapid Reset spread over many
//! connections, where HTTP/2's per-connection caps never trip). Also counts every limit hit,
//! for the metrics. Knows nothing about policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::frames::Bucket;
use super::limits::Limits;
use super::send_budget::SendBudget;
use crate::identity::SpiffeId;

/// A limit the server enforced, as metrics and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitHit {
    /// `maxStreamsTotal`: a stream refused with REFUSED_STREAM.
    StreamsTotal,
    /// A CONNECT cancelled by its client before the answer (counted, not refused).
    EarlyReset,
    /// `earlyResetBurst`: a peer's CONNECT refused with 429, its connection sent GOAWAY.
    EarlyResetBudget,
    /// `controlFrameBurst`: a connection closed with GOAWAY ENHANCE_YOUR_CALM.
    ControlFrames,
    /// `prefaceTimeout`.
    PrefaceTimeout,
    /// `idleTimeout`: a connection without streams closed.
    IdleTimeout,
    /// `streamStallTimeout`: a stream the peer granted no send window was reset.
    StreamStall,
}

impl LimitHit {
    pub const ALL: [LimitHit; 7] = [
        LimitHit::StreamsTotal,
        LimitHit::EarlyReset,
        LimitHit::EarlyResetBudget,
        LimitHit::ControlFrames,
        LimitHit::PrefaceTimeout,
        LimitHit::IdleTimeout,
        LimitHit::StreamStall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LimitHit::StreamsTotal => "streams_total",
            LimitHit::EarlyReset => "early_reset",
            LimitHit::EarlyResetBudget => "early_reset_budget",
            LimitHit::ControlFrames => "control_frames",
            LimitHit::PrefaceTimeout => "preface_timeout",
            LimitHit::IdleTimeout => "idle_timeout",
            LimitHit::StreamStall => "stream_stall",
        }
    }
}

/// Called on every limit hit (the daemon counts them in its metrics).
pub type OnLimit = Box<dyn Fn(LimitHit) + Send + Sync>;

/// Shared by every HBONE server connection of a node.
pub struct ServerBudget {
    pub limits: Limits,
    open_streams: AtomicUsize,
    /// Bytes queued toward peers, shared with the node's pool.
    send: Arc<SendBudget>,
    early_resets: Mutex<HashMap<Option<SpiffeId>, Bucket>>,
    hits: [AtomicU64; LimitHit::ALL.len()],
    on_limit: Option<OnLimit>,
}

impl std::fmt::Debug for ServerBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBudget")
            .field("limits", &self.limits)
            .field("open_streams", &self.open_streams)
            .finish_non_exhaustive()
    }
}

impl ServerBudget {
    pub fn new(limits: Limits) -> Arc<ServerBudget> {
        ServerBudget::with_callback(limits, None)
    }

    pub fn with_callback(limits: Limits, on_limit: Option<OnLimit>) -> Arc<ServerBudget> {
        let send = SendBudget::new(limits.max_send_queued_total, limits.send_queued_floor);
        ServerBudget::sharing(limits, send, on_limit)
    }

    /// A budget whose bytes queued toward peers count in `send`, made by the caller from
    /// `limits` (so that metrics can watch it before the server exists).
    pub fn sharing(
        limits: Limits,
        send: Arc<SendBudget>,
        on_limit: Option<OnLimit>,
    ) -> Arc<ServerBudget> {
        Arc::new(ServerBudget {
            limits,
            open_streams: AtomicUsize::new(0),
            send,
            early_resets: Mutex::new(HashMap::new()),
            hits: Default::default(),
            on_limit,
        })
    }

    /// The node's budget of bytes queued toward peers; give it to the pool too
    /// ([`super::Pool::sharing`]).
    pub fn send(&self) -> &Arc<SendBudget> {
        &self.send
    }

    /// Streams open over all connections.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// How often `limit` was hit.
    pub fn hits(&self, limit: LimitHit) -> u64 {
        self.hits[index(limit)].load(Ordering::Relaxed)
    }

    pub(crate) fn hit(&self, limit: LimitHit) {
        self.hits[index(limit)].fetch_add(1, Ordering::Relaxed);
        if let Some(on_limit) = &self.on_limit {
            on_limit(limit);
        }
    }

    /// A slot for one more stream on `connection`, unless the node is at its stream budget.
    pub(crate) fn open_stream(
        self: &Arc<Self>,
        connection: &Arc<AtomicUsize>,
    ) -> Option<StreamPermit> {
        let max = self.limits.max_streams_total;
        let taken = self
            .open_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            });
        if taken.is_err() {
            self.hit(LimitHit::StreamsTotal);
            return None;
        }
        connection.fetch_add(1, Ordering::AcqRel);
        Some(StreamPermit {
            budget: Arc::clone(self),
            connection: Arc::clone(connection),
        })
    }

    /// Whether `peer` still has early resets to spend.
    pub(crate) fn peer_in_budget(&self, peer: &Option<SpiffeId>) -> bool {
        let mut buckets = self.early_resets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.get_mut(peer).is_none_or(Bucket::has_one)
    }

    /// `peer` cancelled a CONNECT before its answer.
    pub(crate) fn early_reset(&self, peer: &Option<SpiffeId>) {
        self.hit(LimitHit::EarlyReset);
        let limits = &self.limits;
        let mut buckets = self.early_resets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            // Full buckets carry no information; dropping them keeps the map bounded.
            buckets.retain(|_, bucket| !bucket.is_full());
        }
        buckets
            .entry(peer.clone())
            .or_insert_with(|| {
                Bucket::new(limits.early_resets_per_second, limits.early_reset_burst)
            })
            .take();
    }
}

fn index(limit: LimitHit) -> usize {
    LimitHit::ALL
        .iter()
        .position(|l| *l == limit)
        .unwrap_or_default()
}

/// One open stream's place in the node's and its connection's count; given back on drop.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    budget: Arc<ServerBudget>,
    connection: Arc<AtomicUsize>,
}

impl StreamPermit {
    pub(crate) fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.budget.open_streams.fetch_sub(1, Ordering::AcqRel);
        self.connection.fetch_sub(1, Ordering::AcqRel);
    }
}
