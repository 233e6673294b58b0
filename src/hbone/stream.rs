//! One HBONE tunnel: an HTTP/2 CONNECT stream seen as a byte stream (PROTOCOL.md §1.2 "Stream
//! mapping"). Reading hands out each DATA chunk and releases its flow-control capacity at once;
//! END_STREAM, or a RST_STREAM with NO_ERROR, reads as EOF; any other reset is a
//! `ConnectionReset` error, which the copier turns into a TCP RST (HARDENING C8). Writing sends
//! only what flow control and the node's send budget grant; shutdown sends END_STREAM. A served
//! stream whose peer grants no send window (or reads nothing of its queue) for the stall timeout
//! is reset (HARDENING H7). Knows nothing about who opened
//! the stream.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::budget::{LimitHit, ServerBudget, StreamPermit};
use super::pool::StreamLease;
use super::send_budget::ConnectionLedger;
use crate::identity::SpiffeId;

/// A bidirectional CONNECT stream. Use it as `AsyncRead + AsyncWrite`, or split it with
/// [`H2Stream::into_parts`] to move `Bytes` without copying.
#[derive(Debug)]
pub struct H2Stream {
    send: H2Send,
    recv: H2Recv,
}

/// The sending half: DATA frames toward the peer.
#[derive(Debug)]
pub struct H2Send {
    stream: SendStream<Bytes>,
    finished: bool,
    /// END_STREAM sent, not a reset: HTTP/2 writes out what is queued after this half is gone.
    ended_cleanly: bool,
    /// The connection's account of what this stream has queued, in the node's send budget.
    ledger: Arc<ConnectionLedger>,
    id: u32,
    /// Holds the stream's slot on a pooled connection until both halves are gone.
    lease: Option<Arc<StreamLease>>,
    /// A served stream's stall timer; client streams have none.
    stall: Option<StallGuard>,
}

/// Gives up on a served stream once it has waited `streamStallTimeout` for send window with
/// bytes to send. Armed when a wait for capacity begins, disarmed by any grant, so a slow but
/// moving peer is never cut off.
#[derive(Debug)]
struct StallGuard {
    budget: Arc<ServerBudget>,
    /// Made on the first wait and re-armed after; boxed once per stream, not per wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl StallGuard {
    fn progress(&mut self) {
        self.armed = false;
    }

    /// Ready once the current wait has lasted the whole timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            // The clock is read once per wait, not on every poll while it lasts.
            let deadline = tokio::time::Instant::now() + self.budget.limits.stream_stall_timeout;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// The receiving half: DATA frames from the peer.
#[derive(Debug)]
pub struct H2Recv {
    stream: RecvStream,
    /// What an `AsyncRead` caller has not taken yet of the last chunk.
    leftover: Bytes,
    eof: bool,
    /// Counted among its connection's holders: its consumer is not waiting for data, so what
    /// arrives stays unreleased ([`super::recv_window`]). From the start until the first wait.
    holding: bool,
    ledger: Arc<ConnectionLedger>,
    _lease: Option<Arc<StreamLease>>,
    /// A served stream's place in the server's stream budget, given back when it ends.
    _permit: Option<StreamPermit>,
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        ledger: Arc<ConnectionLedger>,
        lease: Option<Arc<StreamLease>>,
    ) -> Self {
        H2Stream::with_permit(send, recv, ledger, lease, None)
    }

    pub(crate) fn with_permit(
        send: SendStream<Bytes>,
        recv: RecvStream,
        ledger: Arc<ConnectionLedger>,
        lease: Option<Arc<StreamLease>>,
        permit: Option<StreamPermit>,
    ) -> Self {
        let stall = permit.as_ref().map(|permit| StallGuard {
            budget: Arc::clone(permit.budget()),
            timer: None,
            armed: false,
        });
        let id = u32::from(send.stream_id());
        ledger.holders().hold();
        H2Stream {
            send: H2Send {
                stream: send,
                finished: false,
                ended_cleanly: false,
                ledger: Arc::clone(&ledger),
                id,
                lease: lease.clone(),
                stall,
            },
            recv: H2Recv {
                stream: recv,
                leftover: Bytes::new(),
                eof: false,
                holding: true,
                ledger,
                _lease: lease,
                _permit: permit,
            },
        }
    }

    /// The SPIFFE id the server proved, for a stream of a pooled client connection.
    pub fn peer_identity(&self) -> Option<&Arc<SpiffeId>> {
        self.send.lease.as_ref()?.peer_identity()
    }

    /// The two halves, for a copier that moves `Bytes` in both directions at once.
    pub fn into_parts(self) -> (H2Send, H2Recv) {
        (self.send, self.recv)
    }
}

impl H2Send {
    /// Sends all of `data`, each DATA frame no larger than the flow-control capacity granted.
    /// The `Bytes` are handed to HTTP/2 as they are (split, never copied).
    pub async fn send(&mut self, mut data: Bytes) -> io::Result<()> {
        poll_fn(|cx| self.poll_send(cx, &mut data)).await
    }

    /// Polls [`H2Send::send`]: sends what capacity allows and leaves the rest in `data`;
    /// `Ready(Ok)` once `data` is empty.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        while !data.is_empty() {
            let granted = ready!(self.poll_granted(cx, data.len()))?;
            let chunk = data.split_to(granted.min(data.len()));
            self.queue(chunk)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Hands `chunk` to HTTP/2, counted in the node's send budget first: the connection task
    /// may write it out (and take it off the ledger) before `send_data` even returns.
    fn queue(&mut self, chunk: Bytes) -> io::Result<()> {
        self.ledger.queue(self.id, chunk.len());
        self.stream.send_data(chunk, false).map_err(|e| {
            self.ledger.discard(self.id);
            h2_to_io(e)
        })
    }

    /// Ends our direction: an empty DATA frame with END_STREAM. Idempotent. A peer that is
    /// already gone (stream reset, connection closed) has nothing left to tell, so that is not
    /// an error.
    pub fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.ended_cleanly = self.stream.send_data(Bytes::new(), true).is_ok();
        }
    }

    /// Aborts the stream: RST_STREAM CONNECT_ERROR, how a TCP RST from the socket is passed on
    /// (RFC 9113 §8.5). Idempotent.
    pub fn abort(&mut self) {
        if !self.finished {
            self.finished = true;
            self.stream.send_reset(Reason::CONNECT_ERROR);
            self.ledger.discard(self.id);
        }
    }

    /// Waits until the node's send budget has room for this stream and flow control grants
    /// some capacity toward `want` bytes.
    fn poll_granted(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream: write after shutdown",
            )));
        }
        let room = match self.ledger.poll_room(self.id, cx) {
            Poll::Ready(room) => room,
            // Waiting on our own queue to drain is waiting on the peer to read it.
            Poll::Pending => return self.poll_stalled(cx),
        };
        let want = want.min(room);
        self.stream.reserve_capacity(want);
        loop {
            let capacity = self.stream.capacity().min(want);
            if capacity > 0 {
                return Poll::Ready(Ok(self.progress(capacity)));
            }
            match self.stream.poll_capacity(cx) {
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(granted))) => {
                    return Poll::Ready(Ok(self.progress(granted.min(want))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )));
                }
                Poll::Pending => {
                    // A peer that resets the stream never grants capacity: watch for that too.
                    return match self.stream.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => Poll::Ready(Err(io::Error::new(
                            reset_kind(reason),
                            format!("HBONE stream reset by the peer: {reason}"),
                        ))),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
                        Poll::Pending => self.poll_stalled(cx),
                    };
                }
            }
        }
    }

    fn progress(&mut self, granted: usize) -> usize {
        if let Some(stall) = &mut self.stall {
            stall.progress();
        }
        granted
    }

    /// Pending until the stall timeout of a served stream runs out; then the stream is reset
    /// and the error ends the copy, which closes the upstream connection.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(stall) = &mut self.stall else {
            return Poll::Pending;
        };
        ready!(stall.poll_expired(cx));
        let timeout = stall.budget.limits.stream_stall_timeout;
        stall.budget.hit(LimitHit::StreamStall);
        tracing::info!(
            stream = ?self.stream.stream_id(),
            ?timeout,
            "HBONE stream reset: the peer granted no send window (streamStallTimeout)"
        );
        self.stream.send_reset(Reason::CANCEL);
        self.ledger.discard(self.id);
        self.finished = true;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("HBONE stream stalled: no send window from the peer for {timeout:?}"),
        )))
    }
}

impl Drop for H2Send {
    fn drop(&mut self) {
        self.ledger.handle_gone(self.id, self.ended_cleanly);
    }
}

/// RST_STREAM NO_ERROR asks for no more data and is a clean end; any other code is an abort,
/// which the copier passes on as a TCP RST (RFC 9113 §8.5, HARDENING C8).
fn reset_kind(reason: Reason) -> io::ErrorKind {
    if reason == Reason::NO_ERROR {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::ConnectionReset
    }
}

impl H2Recv {
    /// The next DATA chunk as received, or `None` at EOF.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Polls [`H2Recv::chunk`].
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.leftover.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.leftover))));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        loop {
            let Poll::Ready(next) = self.stream.poll_data(cx) else {
                self.set_holding(false);
                return Poll::Pending;
            };
            match next {
                Some(Ok(chunk)) => {
                    // A failure here means the stream is gone; the next poll reports that.
                    let _ = self.stream.flow_control().release_capacity(chunk.len());
                    if chunk.is_empty() {
                        continue;
                    }
                    self.set_holding(true);
                    return Poll::Ready(Ok(Some(chunk)));
                }
                Some(Err(e)) if is_clean_reset(&e) => return self.ended(Ok(None)),
                Some(Err(e)) => return self.ended(Err(h2_to_io(e))),
                None => return self.ended(Ok(None)),
            }
        }
    }

    /// Nothing more will arrive: HTTP/2 holds nothing for this stream any longer.
    fn ended(&mut self, result: io::Result<Option<Bytes>>) -> Poll<io::Result<Option<Bytes>>> {
        if result.is_ok() {
            self.eof = true;
        }
        self.set_holding(false);
        Poll::Ready(result)
    }

    fn set_holding(&mut self, holding: bool) {
        if self.holding == holding {
            return;
        }
        self.holding = holding;
        if holding {
            self.ledger.holders().hold();
        } else {
            self.ledger.holders().release();
        }
    }
}

impl Drop for H2Recv {
    fn drop(&mut self) {
        self.set_holding(false);
    }
}

/// RST_STREAM NO_ERROR: the peer is done, which reads as a clean EOF. CANCEL is not: the peer
/// abandoned the stream, and the app must see a reset, not a complete message (HARDENING C8).
fn is_clean_reset(e: &h2::Error) -> bool {
    e.is_reset() && e.reason() == Some(Reason::NO_ERROR)
}

/// HTTP/2 errors as I/O errors; other resets become `ConnectionReset` so copiers treat them as
/// the peer closing.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Recv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.leftover.is_empty() {
            match ready!(self.poll_chunk(cx))? {
                Some(chunk) => self.leftover = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.leftover.len().min(buf.remaining());
        buf.put_slice(&self.leftover[..n]);
        self.leftover.advance(n);
        if self.leftover.is_empty() {
            // An emptied slice still holds HTTP/2's whole receive buffer alive.
            self.leftover = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(self.poll_granted(cx, buf.len()))?;
        let n = granted.min(buf.len());
        self.queue(Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The HTTP/2 connection task writes queued frames out as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}
