//! Receive windows that make room for streams whose app is not reading (HARDENING H7, the
//! connection window).
//!
//! A stream's receive window is what the peer may send it before ztund hands the bytes on. A
//! stream whose app stops reading keeps its whole window unreleased, and every such stream of
//! a connection holds part of the connection's window: with 4 MiB stream windows, four of them
//! held a 16 MiB connection window and every other stream of the connection starved. Small
//! stream windows (streams × window ≤ connection window) prevented that, but cost a single
//! stream half its throughput: it could have only 80 KiB in flight.
//!
//! So streams get large windows, and each connection's window grows by one stream window for
//! every stream that is *holding*: its consumer is not waiting for data (it has not taken its
//! first chunk yet, or it is still writing the last one out). Whatever the holding streams keep
//! unreleased, the connection's base window stays free for the rest. The growth comes out of a
//! node-wide budget, so what a node buffers for apps that do not read stays bounded: the base
//! window per connection plus the budget. Past the budget a connection stops growing, and its
//! holding streams may again take its base window (as with fixed 4 MiB windows): the budget,
//! sixteen streams at full window, trades that protection against memory (HARDENING F7).
//!
//! A stream counts itself in and out as its consumer takes chunks and waits for more (two
//! atomic operations at most per chunk); the connection's task reads the count each time it is
//! polled, which is whenever a frame arrives. Data for a holding stream arrives only after the
//! stream was counted, so the window has grown before it is needed; it shrinks lazily.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::send_budget::ConnectionLedger;

/// Bytes of connection window granted beyond the connections' base windows, over the node.
#[derive(Debug)]
pub struct HeldWindowBudget {
    limit: usize,
    granted: AtomicUsize,
}

impl HeldWindowBudget {
    pub fn new(limit: usize) -> HeldWindowBudget {
        HeldWindowBudget {
            limit,
            granted: AtomicUsize::new(0),
        }
    }

    /// Bytes granted now.
    pub fn granted(&self) -> usize {
        self.granted.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes up to `want` bytes; returns what it took.
    fn claim(&self, want: usize) -> usize {
        let mut granted = self.granted.load(Ordering::Acquire);
        loop {
            let take = want.min(self.limit.saturating_sub(granted));
            if take == 0 {
                return 0;
            }
            match self.granted.compare_exchange_weak(
                granted,
                granted + take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take,
                Err(now) => granted = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.granted.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// The streams of one connection whose consumer is not waiting for data.
#[derive(Debug, Default)]
pub struct Holders {
    count: AtomicUsize,
}

impl Holders {
    pub(crate) fn hold(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// One connection's receive window: its base, and what it holds of the node's budget.
#[derive(Debug)]
pub struct ConnectionWindow {
    base: u32,
    per_stream: u32,
    granted: usize,
    /// Since when `granted` has been more than the holding streams want.
    too_large_since: Option<Instant>,
    ledger: Arc<ConnectionLedger>,
}

impl ConnectionWindow {
    /// A connection whose streams get `per_stream` windows and whose own window is `base`
    /// while none of the streams counted in `ledger` is holding.
    pub fn new(base: u32, per_stream: u32, ledger: Arc<ConnectionLedger>) -> ConnectionWindow {
        ConnectionWindow {
            base,
            per_stream,
            granted: 0,
            too_large_since: None,
            ledger,
        }
    }

    /// The connection window wanted now, if it differs from the one set.
    pub fn adjust(&mut self) -> Option<u32> {
        let holding = self.ledger.holders().count();
        // The common case, on every poll of the connection's task: nothing changed, no clock.
        if holding.saturating_mul(self.per_stream as usize) == self.granted {
            self.too_large_since = None;
            return None;
        }
        self.adjust_for(holding, Instant::now())
    }

    /// The connection window wanted with `holding` streams holding at `now`, if it differs
    /// from the one set: one more stream window for each, as far as the node's budget goes.
    /// It shrinks once it is more than one stream window too large, or too large at all for
    /// [`SHRINK_AFTER`]: a stream that holds now and then (a consumer between two chunks) does
    /// not move it back and forth, and an idle connection keeps nothing of the budget.
    fn adjust_for(&mut self, holding: usize, now: Instant) -> Option<u32> {
        let per_stream = self.per_stream as usize;
        let wanted = holding.saturating_mul(per_stream);
        let budget = self.ledger.budget().held_windows();
        if wanted > self.granted {
            self.too_large_since = None;
            let took = budget.claim(wanted - self.granted);
            if took == 0 {
                return None;
            }
            self.granted += took;
        } else if wanted == self.granted {
            self.too_large_since = None;
            return None;
        } else {
            let since = *self.too_large_since.get_or_insert(now);
            if self.granted <= wanted + per_stream && now.duration_since(since) < SHRINK_AFTER {
                return None;
            }
            self.too_large_since = None;
            budget.give_back(self.granted - wanted);
            self.granted = wanted;
        }
        Some(self.target())
    }

    /// What the connection's window is set to now.
    pub fn target(&self) -> u32 {
        (self.base as usize + self.granted).min(MAX_WINDOW) as u32
    }
}

impl Drop for ConnectionWindow {
    fn drop(&mut self) {
        self.ledger.budget().held_windows().give_back(self.granted);
    }
}

/// How long a connection keeps window its holding streams no longer want (within one stream
/// window of it). The connection's task runs at least at every keepalive PING.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// HTTP/2's largest window (RFC 9113 §6.9.1).
const MAX_WINDOW: usize = (1 << 31) - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::SendBudget;

    const MIB: u32 = 1 << 20;

    impl ConnectionWindow {
        fn adjust_for_now(&mut self, holding: usize) -> Option<u32> {
            self.adjust_for(holding, Instant::now())
        }
    }

    fn window(budget: &Arc<SendBudget>) -> ConnectionWindow {
        ConnectionWindow::new(16 * MIB, 4 * MIB, ConnectionLedger::new(Arc::clone(budget)))
    }

    #[test]
    fn each_holding_stream_adds_its_window_to_the_connections() {
        // HARDENING H7 (connection window): whatever the holding streams keep, the base is
        // left for the others.
        let budget = SendBudget::with_held_limit(1 << 30, 1 << 16, 1 << 30);
        let mut connection = window(&budget);
        assert_eq!(connection.adjust_for_now(0), None);
        assert_eq!(connection.adjust_for_now(3), Some(28 * MIB));
        assert_eq!(budget.held_windows().granted(), 12 << 20);
        assert_eq!(connection.adjust_for_now(3), None, "unchanged");
        assert_eq!(connection.adjust_for_now(10), Some(56 * MIB));
        // One stream window of slack before it shrinks.
        assert_eq!(connection.adjust_for_now(9), None);
        assert_eq!(connection.adjust_for_now(1), Some(20 * MIB));
        assert_eq!(connection.target(), 20 * MIB);
        drop(connection);
        assert_eq!(budget.held_windows().granted(), 0, "all given back");
    }

    #[test]
    fn the_node_budget_caps_the_growth_and_the_base_stays() {
        let budget = SendBudget::with_held_limit(1 << 30, 1 << 16, (6 * MIB) as usize);
        let (mut first, mut second) = (window(&budget), window(&budget));
        assert_eq!(first.adjust_for_now(1), Some(20 * MIB));
        assert_eq!(
            second.adjust_for_now(5),
            Some(18 * MIB),
            "what was left: 2 MiB"
        );
        assert_eq!(second.adjust_for_now(6), None, "nothing left");
        assert_eq!(budget.held_windows().granted(), (6 * MIB) as usize);
        assert_eq!(first.adjust_for_now(0), None, "within the slack");
        drop(first);
        assert_eq!(
            second.adjust_for_now(6),
            Some(22 * MIB),
            "the first one's share came back"
        );
        drop(second);
        assert_eq!(budget.held_windows().granted(), 0);
    }

    #[test]
    fn an_idle_connection_gives_its_growth_back() {
        let budget = SendBudget::with_held_limit(1 << 30, 1 << 16, 1 << 30);
        let mut connection = window(&budget);
        let start = Instant::now();
        assert_eq!(connection.adjust_for(1, start), Some(20 * MIB));
        assert_eq!(
            connection.adjust_for(0, start),
            None,
            "a consumer between two chunks"
        );
        assert_eq!(connection.adjust_for(1, start + SHRINK_AFTER), None);
        assert_eq!(connection.adjust_for(0, start + SHRINK_AFTER), None);
        let later = start + SHRINK_AFTER * 2;
        assert_eq!(connection.adjust_for(0, later), Some(16 * MIB));
        assert_eq!(budget.held_windows().granted(), 0);
    }

    #[test]
    fn the_window_never_passes_http2s_largest() {
        let budget = SendBudget::with_held_limit(1 << 30, 1 << 16, usize::MAX);
        let mut connection = window(&budget);
        assert_eq!(connection.adjust_for_now(10_000), Some(MAX_WINDOW as u32));
    }
}
