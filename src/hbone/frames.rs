//! The per-connection control-frame budget. HTTP/2 answers every PING and SETTINGS it reads and
//! never limits how often a peer sends them (CVE-2019-9512, CVE-2019-9515), so this reader
//! sits between TLS and HTTP/2 and counts frames by their 9-byte headers as the bytes pass.
//! Once PING, SETTINGS and PRIORITY frames outrun the budget it reads nothing more and tells
//! the server, which answers GOAWAY ENHANCE_YOUR_CALM. It never changes a byte.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const PRIORITY: u8 = 0x2;
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

/// Where the parser is in the byte stream.
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

/// The TLS stream, read through the frame counter.
#[derive(Debug)]
pub(crate) struct FrameWatch<IO> {
    io: IO,
    position: Position,
    budget: Bucket,
    exhausted: Arc<Exhausted>,
}

impl<IO> FrameWatch<IO> {
    pub(crate) fn new(io: IO, per_second: u32, burst: u32) -> (FrameWatch<IO>, Arc<Exhausted>) {
        let exhausted = Arc::new(Exhausted::default());
        let watch = FrameWatch {
            io,
            position: Position::Preface(PREFACE_LEN),
            budget: Bucket::new(per_second, burst),
            exhausted: Arc::clone(&exhausted),
        };
        (watch, exhausted)
    }

    /// Walks the frame headers in `bytes`; false once the budget is spent.
    fn observe(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match &mut self.position {
                Position::Preface(left) | Position::Payload(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        self.position = Position::Header {
                            bytes: [0; FRAME_HEADER_LEN],
                            have: 0,
                        };
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
                    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
                    let (kind, flags) = (header[3], header[4]);
                    let counted = match kind {
                        PING | SETTINGS => flags & ACK == 0,
                        PRIORITY => true,
                        _ => false,
                    };
                    if counted && !self.budget.take() {
                        return false;
                    }
                    self.position = Position::Payload(length as usize);
                    if length == 0 {
                        self.position = Position::Header {
                            bytes: [0; FRAME_HEADER_LEN],
                            have: 0,
                        };
                    }
                }
            }
        }
        true
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
            if !this.observe(fresh) {
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
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn pings_over_the_burst_spend_the_budget_whatever_the_read_boundaries() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, &[0; 6]));
        bytes.extend(frame(0x0, 0, &[7; 100]));
        for _ in 0..4 {
            bytes.extend(frame(PING, 0, &[0; 8]));
            bytes.extend(frame(PING, ACK, &[0; 8]));
        }
        // One byte at a time: headers split over reads must still be counted.
        let (mut watch, _) = FrameWatch::new((), 0, 5);
        for b in &bytes {
            assert!(watch.observe(std::slice::from_ref(b)));
        }
        let (mut watch, _) = FrameWatch::new((), 0, 4);
        assert!(!watch.observe(&bytes), "5 counted frames fit a budget of 4");
    }
}
