//! The node-wide budget of bytes queued toward peers: handed to HTTP/2 for sending and not yet
//! written to a connection. HTTP/2 bounds each stream's send buffer (400 KiB served, 4 MiB
//! pooled) but not their sum, so a peer that grants large windows and then stops reading its
//! TCP could make every stream of the node fill its buffer (HARDENING H7: 16 384 streams ×
//! 400 KiB). HTTP/2 does not say how much of a buffer is still unsent, so ztund keeps its own
//! ledger: a stream adds what it hands over, and the connection's frame watcher
//! ([`super::frames`]) takes it off as each DATA frame's header is written, or all of a stream's
//! at once when a RST_STREAM makes HTTP/2 drop its queue, or the whole connection's when it ends.
//!
//! A stream may queue what is left of the budget, or up to its `floor` of its own whatever the
//! budget says; with neither it waits (backpressure reaches the app's socket). So a peer that
//! fills the budget slows the rest of the node to their floors but never stops it, and the
//! total stays within the budget plus one floor per stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::recv_window::{HeldWindowBudget, Holders};

/// Shared by every HBONE connection of a node, served and pooled.
#[derive(Debug)]
pub struct SendBudget {
    limit: usize,
    floor: usize,
    queued: AtomicUsize,
    waiting: Mutex<Vec<Waker>>,
    /// Times a stream found the budget spent and had to wait.
    waits: AtomicU64,
    /// When the last "budget spent" line was logged, in seconds since `started`.
    logged_at: AtomicU64,
    started: Instant,
    /// The other way: connection window granted for streams whose app is not reading
    /// ([`super::recv_window`]).
    held: HeldWindowBudget,
}

impl SendBudget {
    /// A budget whose held-window budget is as large as the send budget.
    pub fn new(limit: usize, floor: usize) -> Arc<SendBudget> {
        SendBudget::with_held_limit(limit, floor, limit)
    }

    /// The node's budgets as `limits` set them.
    pub fn for_limits(limits: &super::Limits) -> Arc<SendBudget> {
        SendBudget::with_held_limit(
            limits.max_send_queued_total,
            limits.send_queued_floor,
            limits.max_recv_held_total,
        )
    }

    pub fn with_held_limit(limit: usize, floor: usize, held: usize) -> Arc<SendBudget> {
        Arc::new(SendBudget {
            held: HeldWindowBudget::new(held),
            limit,
            floor,
            queued: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
            waits: AtomicU64::new(0),
            logged_at: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        })
    }

    /// The node's budget of connection window for streams whose app is not reading.
    pub fn held_windows(&self) -> &HeldWindowBudget {
        &self.held
    }

    /// Times a stream had to wait for the budget.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Bytes queued toward peers now, over all connections.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Ready with how many more bytes a stream with `stream_queued` bytes in its queue may
    /// queue now: what is left of the node's budget, or of the stream's floor if that is more.
    fn poll_room(&self, stream_queued: usize, cx: &mut Context<'_>) -> Poll<usize> {
        if let Some(room) = self.room(stream_queued) {
            return Poll::Ready(room);
        }
        let mut waiting = lock(&self.waiting);
        // Checked again under the lock: a release between the first check and the push would
        // otherwise find no waker to wake.
        if let Some(room) = self.room(stream_queued) {
            return Poll::Ready(room);
        }
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
            drop(waiting);
            self.note_wait();
        }
        Poll::Pending
    }

    fn room(&self, stream_queued: usize) -> Option<usize> {
        let node = self.limit.saturating_sub(self.queued());
        let own = self.floor.saturating_sub(stream_queued);
        Some(node.max(own)).filter(|room| *room > 0)
    }

    /// Counts a wait and says so in the log, at most once every ten seconds.
    fn note_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_secs();
        let last = self.logged_at.load(Ordering::Relaxed);
        if (last == u64::MAX || now >= last + 10)
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                queued = self.queued(),
                limit = self.limit,
                floor = self.floor,
                "bytes queued toward peers reached maxSendQueuedTotal; streams past their floor wait for peers to read"
            );
        }
    }

    fn add(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        // Every waiter is woken on any release: a stream waits on either the node's total or
        // its own queue (its floor), and both shrink here. Waiters exist only under pressure.
        let woken = std::mem::take(&mut *lock(&self.waiting));
        for waker in woken {
            waker.wake();
        }
    }
}

/// One connection's queued bytes per stream; shared by its streams and its frame watcher.
#[derive(Debug)]
pub struct ConnectionLedger {
    budget: Arc<SendBudget>,
    streams: Mutex<Streams>,
    /// Its streams whose consumer is not waiting for data ([`super::recv_window`]).
    holders: Holders,
}

#[derive(Debug, Default)]
struct Streams {
    queued: HashMap<u32, Queued>,
    /// The connection ended: HTTP/2 dropped everything, and nothing more is counted.
    closed: bool,
}

#[derive(Debug, Default)]
struct Queued {
    bytes: usize,
    /// The stream's handle is gone after a clean END_STREAM; HTTP/2 still writes out its queue.
    handle_gone: bool,
}

impl ConnectionLedger {
    pub fn new(budget: Arc<SendBudget>) -> Arc<ConnectionLedger> {
        Arc::new(ConnectionLedger {
            budget,
            streams: Mutex::new(Streams::default()),
            holders: Holders::default(),
        })
    }

    pub fn holders(&self) -> &Holders {
        &self.holders
    }

    /// The node's budgets this connection counts in.
    pub fn budget(&self) -> &Arc<SendBudget> {
        &self.budget
    }

    /// Ready with how many more bytes `stream` may hand HTTP/2 now.
    pub(crate) fn poll_room(&self, stream: u32, cx: &mut Context<'_>) -> Poll<usize> {
        let own = lock(&self.streams)
            .queued
            .get(&stream)
            .map_or(0, |q| q.bytes);
        self.budget.poll_room(own, cx)
    }

    /// `stream` handed HTTP/2 `bytes` to send.
    pub(crate) fn queue(&self, stream: u32, bytes: usize) {
        let mut streams = lock(&self.streams);
        if streams.closed || bytes == 0 {
            return;
        }
        streams.queued.entry(stream).or_default().bytes += bytes;
        self.budget.add(bytes);
    }

    /// A DATA frame of `stream` carrying `bytes` is being written to the connection.
    pub(crate) fn written(&self, stream: u32, bytes: usize) {
        let mut streams = lock(&self.streams);
        let Some(queued) = streams.queued.get_mut(&stream) else {
            return;
        };
        let bytes = bytes.min(queued.bytes);
        queued.bytes -= bytes;
        if queued.bytes == 0 && queued.handle_gone {
            streams.queued.remove(&stream);
        }
        drop(streams);
        self.budget.release(bytes);
    }

    /// HTTP/2 dropped `stream`'s queue: a RST_STREAM either way.
    pub(crate) fn discard(&self, stream: u32) {
        let removed = lock(&self.streams).queued.remove(&stream);
        if let Some(queued) = removed {
            self.budget.release(queued.bytes);
        }
    }

    /// `stream`'s handle is gone. After a clean END_STREAM HTTP/2 still writes its queue out;
    /// otherwise it resets the stream and drops the queue.
    pub(crate) fn handle_gone(&self, stream: u32, ended_cleanly: bool) {
        if !ended_cleanly {
            return self.discard(stream);
        }
        let mut streams = lock(&self.streams);
        match streams.queued.get_mut(&stream) {
            Some(queued) if queued.bytes > 0 => queued.handle_gone = true,
            Some(_) => {
                streams.queued.remove(&stream);
            }
            None => {}
        }
    }

    /// The connection ended: nothing queued on it will be written.
    pub(crate) fn close(&self) {
        let mut streams = lock(&self.streams);
        streams.closed = true;
        let dropped: usize = streams.queued.drain().map(|(_, q)| q.bytes).sum();
        drop(streams);
        self.budget.release(dropped);
    }

    /// Streams with bytes queued (tests).
    pub fn streams_queued(&self) -> usize {
        lock(&self.streams).queued.len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn room(ledger: &ConnectionLedger, stream: u32) -> Option<usize> {
        let mut cx = Context::from_waker(noop_waker_ref());
        match ledger.poll_room(stream, &mut cx) {
            Poll::Ready(room) => Some(room),
            Poll::Pending => None,
        }
    }

    #[test]
    fn over_budget_a_stream_waits_only_beyond_its_floor() {
        let budget = SendBudget::new(1000, 100);
        let ledger = ConnectionLedger::new(Arc::clone(&budget));
        assert_eq!(room(&ledger, 1), Some(1000));
        ledger.queue(1, 950);
        assert_eq!(room(&ledger, 1), Some(50), "what is left of the budget");
        assert_eq!(room(&ledger, 3), Some(100), "stream 3's own floor is more");
        ledger.queue(1, 50);
        assert_eq!(room(&ledger, 1), None, "stream 1 holds the whole budget");
        ledger.queue(3, 60);
        assert_eq!(room(&ledger, 3), Some(40), "the rest of stream 3's floor");
        ledger.queue(3, 40);
        assert_eq!(room(&ledger, 3), None, "stream 3 reached its floor");
        ledger.written(1, 200);
        assert_eq!(budget.queued(), 900);
        assert_eq!(room(&ledger, 1), Some(100));
        assert_eq!(room(&ledger, 3), Some(100));
    }

    #[test]
    fn every_way_out_gives_the_bytes_back_exactly_once() {
        let budget = SendBudget::new(1 << 20, 1);
        let ledger = ConnectionLedger::new(Arc::clone(&budget));
        for stream in [1, 3, 5, 7] {
            ledger.queue(stream, 500);
        }
        // Written out in frames, more than was queued cannot be taken off.
        ledger.written(1, 300);
        ledger.written(1, 300);
        ledger.written(9, 300);
        assert_eq!(budget.queued(), 1500);
        // A peer's reset drops the queue; a handle gone after END_STREAM waits for the writes.
        ledger.discard(3);
        ledger.handle_gone(5, true);
        ledger.written(5, 500);
        assert_eq!(budget.queued(), 500);
        assert_eq!(
            ledger.streams_queued(),
            2,
            "streams 1 (empty, handle held) and 7"
        );
        // A handle gone without END_STREAM: HTTP/2 resets the stream.
        ledger.handle_gone(1, false);
        ledger.close();
        assert_eq!(budget.queued(), 0);
        ledger.queue(11, 10);
        assert_eq!(budget.queued(), 0, "nothing counts on a closed connection");
    }

    #[test]
    fn a_release_wakes_the_streams_waiting_for_room() {
        let budget = SendBudget::new(10, 1);
        let ledger = ConnectionLedger::new(Arc::clone(&budget));
        ledger.queue(1, 10);
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Flag(Arc::clone(&woken))));
        let mut cx = Context::from_waker(&waker);
        assert!(ledger.poll_room(1, &mut cx).is_pending());
        assert!(ledger.poll_room(1, &mut cx).is_pending());
        assert_eq!(
            budget.waits(),
            1,
            "one stream waiting, polled twice, is one wait"
        );
        ledger.written(1, 4);
        assert!(woken.load(Ordering::SeqCst));
    }
}
