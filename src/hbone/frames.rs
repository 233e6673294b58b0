//! What ztund learns from an HTTP/2 connection's frame headers as the bytes pass between TLS
//! and HTTP/2, in both directions, without changing a byte:
//! - the per-connection control-frame budget. HTTP/2 answers every PING and SETTINGS it reads
//!   and never limits how often a peer sends them (CVE-2019-9512, CVE-2019-9515); once PING,
//!   SETTINGS and PRIORITY frames outrun the budget the watcher reads nothing more and tells the
//!   server, which answers GOAWAY ENHANCE_YOUR_CALM;
//! - the send ledger ([`super::send_budget`]): the DATA bytes written out, and the RST_STREAMs
//!   either way after which HTTP/2 drops a stream's queue.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::send_budget::ConnectionLedger;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Set once a connection has spent its budget; the server waits on it.
#[derive(Debug, Default)]
pub(crate) struct Exhausted {
    flag: AtomicBool,
    notify: Notify,
}

impl Exhausted {
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once the budget is spent.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// A token bucket: `burst` at once, refilled at `per_second`.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    per_second: f64,
    burst: f64,
    refilled: Instant,
}

impl Bucket {
    pub(crate) fn new(per_second: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            refilled: Instant::now(),
        }
    }

    /// Takes one token; false when there is none.
    pub(crate) fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is there, without taking it.
    pub(crate) fn has_one(&mut self) -> bool {
        self.refill();
        self.tokens >= 1.0
    }

    /// Whether the bucket has refilled completely (it then says nothing a new one would not).
    pub(crate) fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
    }
}

/// Where a walk of one direction's bytes is.
#[derive(Debug)]
enum Position {
    /// Bytes of the client preface still to pass.
    Preface(usize),
    /// Collecting a frame header.
    Header {
        bytes: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
    /// Payload bytes still to pass.
    Payload(usize),
}

/// A frame header as it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    length: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Walks one direction of a connection frame by frame, whatever the read or write boundaries.
#[derive(Debug)]
struct Cursor {
    position: Position,
}

impl Cursor {
    /// The client's direction starts with the 24-byte preface; the server's with a frame.
    fn new(after_preface: bool) -> Cursor {
        Cursor {
            position: if after_preface {
                Position::Preface(PREFACE_LEN)
            } else {
                Cursor::next_header()
            },
        }
    }

    fn next_header() -> Position {
        Position::Header {
            bytes: [0; FRAME_HEADER_LEN],
            have: 0,
        }
    }

    /// Passes `bytes`, calling `on_header` for each complete header; stops early (false) when
    /// `on_header` does.
    fn walk(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(Header) -> bool) -> bool {
        while !bytes.is_empty() {
            match &mut self.position {
                Position::Preface(left) | Position::Payload(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.position = Cursor::next_header();
                    }
                }
                Position::Header {
                    bytes: header,
                    have,
                } => {
                    let n = (FRAME_HEADER_LEN - *have).min(bytes.len());
                    header[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < FRAME_HEADER_LEN {
                        continue;
                    }
                    let parsed = Header {
                        length: u32::from_be_bytes([0, header[0], header[1], header[2]]),
                        kind: header[3],
                        flags: header[4],
                        stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff,
                    };
                    self.position = match parsed.length {
                        0 => Cursor::next_header(),
                        length => Position::Payload(length as usize),
                    };
                    if !on_header(parsed) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// The TLS stream as HTTP/2 sees it, through the frame watcher: it counts the peer's control
/// frames (server side) and keeps the connection's send ledger (both sides). It never changes
/// a byte.
#[derive(Debug)]
pub(crate) struct FrameWatch<IO> {
    io: IO,
    reading: Cursor,
    writing: Cursor,
    /// The peer's PING, SETTINGS and PRIORITY frames; `None` leaves them uncounted.
    control: Option<Bucket>,
    exhausted: Arc<Exhausted>,
    ledger: Arc<ConnectionLedger>,
}

impl<IO> FrameWatch<IO> {
    /// The server's side of a connection, with its control-frame budget.
    pub(crate) fn server(
        io: IO,
        per_second: u32,
        burst: u32,
        ledger: Arc<ConnectionLedger>,
    ) -> (FrameWatch<IO>, Arc<Exhausted>) {
        let exhausted = Arc::new(Exhausted::default());
        let watch = FrameWatch {
            io,
            reading: Cursor::new(true),
            writing: Cursor::new(false),
            control: Some(Bucket::new(per_second, burst)),
            exhausted: Arc::clone(&exhausted),
            ledger,
        };
        (watch, exhausted)
    }

    /// A pooled client connection: only the send ledger.
    pub(crate) fn client(io: IO, ledger: Arc<ConnectionLedger>) -> FrameWatch<IO> {
        FrameWatch {
            io,
            reading: Cursor::new(false),
            writing: Cursor::new(true),
            control: None,
            exhausted: Arc::default(),
            ledger,
        }
    }

    /// Walks what the peer sent; false once its control-frame budget is spent.
    fn observe_read(&mut self, bytes: &[u8]) -> bool {
        let (control, ledger) = (&mut self.control, &self.ledger);
        self.reading.walk(bytes, |header| {
            if header.kind == RST_STREAM {
                ledger.discard(header.stream);
            }
            let counted = match header.kind {
                PING | SETTINGS => header.flags & ACK == 0,
                PRIORITY => true,
                _ => false,
            };
            !counted || control.as_mut().is_none_or(Bucket::take)
        })
    }

    /// Walks what went out: each DATA frame's bytes leave the send ledger.
    fn observe_written(&mut self, bytes: &[u8]) {
        let ledger = &self.ledger;
        self.writing.walk(bytes, |header| {
            match header.kind {
                DATA => ledger.written(header.stream, header.length as usize),
                RST_STREAM => ledger.discard(header.stream),
                _ => {}
            }
            true
        });
    }
}

impl<IO> Drop for FrameWatch<IO> {
    fn drop(&mut self) {
        self.ledger.close();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameWatch<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.exhausted.is_set() {
            // Read no more: the server is closing the connection.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            let fresh = &buf.filled()[before..];
            if !this.observe_read(fresh) {
                this.exhausted.set();
            }
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameWatch<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.observe_written(&buf[..n]);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = result {
            let mut left = written;
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let n = left.min(buf.len());
                self.observe_written(&buf[..n]);
                left -= n;
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::send_budget::SendBudget;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    fn ledger() -> (Arc<SendBudget>, Arc<ConnectionLedger>) {
        let budget = SendBudget::new(1 << 30, 0);
        let ledger = ConnectionLedger::new(Arc::clone(&budget));
        (budget, ledger)
    }

    fn with_stream(mut frame: Vec<u8>, stream: u32) -> Vec<u8> {
        frame[5..9].copy_from_slice(&stream.to_be_bytes());
        frame
    }

    #[test]
    fn pings_over_the_burst_spend_the_budget_whatever_the_read_boundaries() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, &[0; 6]));
        bytes.extend(frame(DATA, 0, &[7; 100]));
        for _ in 0..4 {
            bytes.extend(frame(PING, 0, &[0; 8]));
            bytes.extend(frame(PING, ACK, &[0; 8]));
        }
        // One byte at a time: headers split over reads must still be counted.
        let (mut watch, _) = FrameWatch::server((), 0, 5, ledger().1);
        for b in &bytes {
            assert!(watch.observe_read(std::slice::from_ref(b)));
        }
        let (mut watch, _) = FrameWatch::server((), 0, 4, ledger().1);
        assert!(
            !watch.observe_read(&bytes),
            "5 counted frames fit a budget of 4"
        );
    }

    #[test]
    fn written_data_frames_and_resets_either_way_leave_the_ledger() {
        let (budget, ledger) = ledger();
        ledger.queue(1, 300);
        ledger.queue(3, 300);
        ledger.queue(5, 300);
        let mut watch = FrameWatch::client((), Arc::clone(&ledger));
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, &[0; 6]));
        out.extend(with_stream(frame(DATA, 0, &[1; 200]), 1));
        out.extend(with_stream(frame(DATA, 0, &[3; 300]), 3));
        out.extend(with_stream(frame(RST_STREAM, 0, &[0, 0, 0, 8]), 1));
        // Written a byte at a time, as a socket that takes little might.
        for b in &out {
            watch.observe_written(std::slice::from_ref(b));
        }
        assert_eq!(budget.queued(), 300, "stream 5's bytes are still queued");
        // The peer resets stream 5: HTTP/2 drops its queue.
        assert!(watch.observe_read(&with_stream(frame(RST_STREAM, 0, &[0, 0, 0, 8]), 5)));
        assert_eq!(budget.queued(), 0);
        ledger.queue(7, 50);
        drop(watch);
        assert_eq!(
            budget.queued(),
            0,
            "a connection gone takes its queue with it"
        );
    }
}
