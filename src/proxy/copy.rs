//! The byte copier (PROTOCOL.md §7.1): both directions of a proxied connection at once, each
//! to its own end. EOF on one side becomes a half-close on the other (TCP `shutdown(Write)`,
//! HTTP/2 END_STREAM); resets, broken pipes and unexpected EOFs are how connections end, not
//! errors. Reads from sockets use one growing buffer per direction (1 KiB, then 16 KiB − 64
//! after 128 KiB, then 64 KiB − 64 after 10 MiB), given back whenever the socket has nothing to
//! read, so an idle connection holds no buffer; toward HTTP/2 the bytes read are handed over
//! as `Bytes` without copying, and HTTP/2 DATA chunks are written to the socket as received.
//! Knows nothing about where the two ends came from.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

use crate::hbone::{H2Recv, H2Send, H2Stream};

/// Bytes moved by one proxied connection, counted as they were written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connection's initiator toward its destination.
    pub to_upstream: u64,
    /// From the destination back to the initiator.
    pub to_downstream: u64,
}

impl Transferred {
    /// The counts of a finished copy, or zero for one that failed before reporting them.
    pub fn of(result: &std::io::Result<Transferred>) -> Transferred {
        result.as_ref().copied().unwrap_or_default()
    }
}

const INITIAL_BUFFER: usize = 1024;
/// Room for one TLS record plus an HTTP/2 frame header.
const MEDIUM_BUFFER: usize = 16 * 1024 - 64;
/// One read, one DATA frame. Sized so that the frame, once framed (9 bytes) and sealed into
/// four TLS records (22 bytes each), still fits one TCP segmentation-offload unit: 45 × 1 448
/// bytes at MTU 1 500, 7 × 8 948 at MTU 9 000. A chunk of 64 KiB spilled a few hundred bytes
/// into a second, tiny segment on every write, and each extra segment costs a trip through
/// both TCP stacks: the same-run A/B of 64 000 against 65 472 cut the sending daemon's CPU per
/// GB by 25% (BENCHMARKS.md). Below glibc's mmap threshold too, so no page faults per frame.
const LARGE_BUFFER: usize = 62_400;
const MEDIUM_AFTER: u64 = 128 * 1024;
const LARGE_AFTER: u64 = 10 * 1024 * 1024;

/// How much one read may take, given how much this direction has copied so far: small for the
/// many short connections, large for bulk transfers.
pub fn read_buffer_size(copied: u64) -> usize {
    if copied >= LARGE_AFTER {
        LARGE_BUFFER
    } else if copied >= MEDIUM_AFTER {
        MEDIUM_BUFFER
    } else {
        INITIAL_BUFFER
    }
}

/// Copies between two byte streams (TCP↔TCP, TLS↔TCP) until both directions have ended.
///
/// A plain function returning the copy's state machine (not an `async fn`, which would keep a
/// second copy of its arguments): the future lives as long as the connection.
pub fn copy_bidirectional<A, B>(
    mut downstream: A,
    mut upstream: B,
) -> impl Future<Output = io::Result<Transferred>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = StreamToStream::default();
    let mut down = StreamToStream::default();
    poll_fn(move |cx| {
        let up_done = up.poll(cx, Pin::new(&mut downstream), Pin::new(&mut upstream))?;
        let down_done = down.poll(cx, Pin::new(&mut upstream), Pin::new(&mut downstream))?;
        if up_done.is_ready() && down_done.is_ready() {
            Poll::Ready(Ok(Transferred {
                to_upstream: up.copied,
                to_downstream: down.copied,
            }))
        } else {
            Poll::Pending
        }
    })
}

/// A socket whose close can be made a TCP RST instead of a FIN: how an HTTP/2 stream reset or
/// error reaches a TCP peer (RFC 9113 §8.5, HARDENING C8).
pub trait Abort {
    /// The next close resets the connection.
    fn abort(&self);
}

impl Abort for tokio::net::TcpStream {
    fn abort(&self) {
        // Fails only on a socket that is already gone, which needs no reset.
        let _ = self.set_zero_linger();
    }
}

/// Copies between a socket and an HBONE stream until both directions have ended. `socket` is
/// the side the connection came from on outbound (the app) and the side toward the app on
/// inbound; `to_upstream` counts socket → HBONE. Like [`copy_bidirectional`], the future holds
/// only the copy's own state. An abort on either side aborts the other at once: a TCP RST from
/// the socket is sent as RST_STREAM CONNECT_ERROR, and a reset stream (any code but NO_ERROR)
/// or a failed copy closes the socket with a TCP RST.
pub fn copy_tcp_h2<T>(mut socket: T, h2: H2Stream) -> impl Future<Output = io::Result<Transferred>>
where
    T: AsyncRead + AsyncWrite + Abort + Unpin,
{
    let (mut send, mut recv) = h2.into_parts();
    let mut up = StreamToH2::default();
    let mut down = H2ToStream::default();
    poll_fn(move |cx| {
        let up_done = up.poll(cx, Pin::new(&mut socket), &mut send);
        let down_done = down.poll(cx, &mut recv, Pin::new(&mut socket));
        let failed =
            matches!(up_done, Poll::Ready(Err(_))) || matches!(down_done, Poll::Ready(Err(_)));
        if failed || down.aborted {
            // The socket is dropped when this future ends; the RST goes out then.
            socket.abort();
        }
        let (up_done, down_done) = (up_done?, down_done?);
        if down.aborted || up.aborted {
            return Poll::Ready(Ok(Transferred {
                to_upstream: up.copied,
                to_downstream: down.copied,
            }));
        }
        if up_done.is_ready() && down_done.is_ready() {
            Poll::Ready(Ok(Transferred {
                to_upstream: up.copied,
                to_downstream: down.copied,
            }))
        } else {
            Poll::Pending
        }
    })
}

/// The peer went away: the direction ends as if at EOF.
fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// Half-closes `writer`; a peer that is already gone needs no telling.
fn poll_half_close<W: AsyncWrite>(
    cx: &mut Context<'_>,
    writer: Pin<&mut W>,
) -> Poll<io::Result<()>> {
    match ready!(writer.poll_shutdown(cx)) {
        Err(e) if !is_close(&e) => Poll::Ready(Err(e)),
        _ => Poll::Ready(Ok(())),
    }
}

/// Reads into `buf`'s spare room, at most the adaptive size for `copied`. The buffer keeps its
/// allocation from read to read.
fn poll_read_adaptive<R: AsyncRead>(
    cx: &mut Context<'_>,
    reader: Pin<&mut R>,
    buf: &mut BytesMut,
    copied: u64,
) -> Poll<io::Result<usize>> {
    let size = read_buffer_size(copied);
    if buf.capacity() - buf.len() < size {
        buf.reserve(size);
    }
    poll_read_buf(reader, cx, &mut buf.limit(size))
}

/// Gives the read buffer back while the reader has nothing: an idle connection then holds no
/// buffer at all, and the next read allocates one of the size the direction has earned. Only
/// called with no unsent bytes in `buf`.
fn release_while_idle(buf: &mut BytesMut) {
    debug_assert!(buf.is_empty(), "released a buffer holding unsent bytes");
    *buf = BytesMut::new();
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Reading,
    Writing,
    HalfClosing,
    Done,
}

/// One direction between two byte streams.
#[derive(Debug, Default)]
struct StreamToStream {
    buf: BytesMut,
    written: usize,
    copied: u64,
    phase: Phase,
    /// Bytes were written since the last flush (TLS keeps records buffered until flushed).
    unflushed: bool,
}

impl StreamToStream {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead,
        W: AsyncWrite,
    {
        loop {
            match self.phase {
                Phase::Reading => {
                    self.buf.clear();
                    self.written = 0;
                    let read =
                        match poll_read_adaptive(cx, reader.as_mut(), &mut self.buf, self.copied) {
                            Poll::Pending => {
                                release_while_idle(&mut self.buf);
                                if self.unflushed {
                                    ready!(writer.as_mut().poll_flush(cx))?;
                                    self.unflushed = false;
                                }
                                return Poll::Pending;
                            }
                            Poll::Ready(read) => read,
                        };
                    self.phase = match read {
                        Ok(0) => Phase::HalfClosing,
                        Ok(_) => Phase::Writing,
                        Err(e) if is_close(&e) => Phase::HalfClosing,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                }
                Phase::Writing => {
                    while self.written < self.buf.len() {
                        let pending = &self.buf[self.written..];
                        match ready!(writer.as_mut().poll_write(cx, pending)) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                self.written += n;
                                self.copied += n as u64;
                                self.unflushed = true;
                            }
                            Err(e) if is_close(&e) => {
                                self.phase = Phase::Done;
                                return Poll::Ready(Ok(()));
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    self.phase = Phase::Reading;
                }
                Phase::HalfClosing => {
                    ready!(poll_half_close(cx, writer.as_mut()))?;
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Socket → HBONE: each read is frozen into `Bytes` and handed to HTTP/2 as is.
#[derive(Debug, Default)]
struct StreamToH2 {
    buf: BytesMut,
    sending: Bytes,
    copied: u64,
    phase: Phase,
    /// The socket was reset, and the stream with it.
    aborted: bool,
}

impl StreamToH2 {
    fn poll<R: AsyncRead>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        send: &mut H2Send,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Reading => {
                    let read =
                        match poll_read_adaptive(cx, reader.as_mut(), &mut self.buf, self.copied) {
                            Poll::Pending => {
                                release_while_idle(&mut self.buf);
                                return Poll::Pending;
                            }
                            Poll::Ready(read) => read,
                        };
                    self.phase = match read {
                        Ok(0) => Phase::HalfClosing,
                        Ok(_) => {
                            // `split` leaves the spare room in `buf` for the next read.
                            self.sending = self.buf.split().freeze();
                            Phase::Writing
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            send.abort();
                            self.aborted = true;
                            Phase::Done
                        }
                        Err(e) if is_close(&e) => Phase::HalfClosing,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                }
                Phase::Writing => {
                    let before = self.sending.len();
                    let sent = send.poll_send(cx, &mut self.sending);
                    self.copied += (before - self.sending.len()) as u64;
                    match ready!(sent) {
                        Ok(()) => {
                            // Spent, but still a reference to the read buffer's allocation:
                            // an idle connection would keep it.
                            self.sending = Bytes::new();
                            self.phase = Phase::Reading;
                        }
                        Err(e) if is_close(&e) => {
                            self.sending = Bytes::new();
                            self.phase = Phase::Done;
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Phase::HalfClosing => {
                    send.finish();
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// HBONE → socket: DATA chunks are written out as received.
#[derive(Debug, Default)]
struct H2ToStream {
    writing: Bytes,
    copied: u64,
    phase: Phase,
    unflushed: bool,
    /// The stream was reset (or its connection failed): the socket must be reset too.
    aborted: bool,
}

impl H2ToStream {
    fn poll<W: AsyncWrite>(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut H2Recv,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.phase {
                Phase::Reading => {
                    let chunk = match recv.poll_chunk(cx) {
                        Poll::Pending => {
                            if self.unflushed {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                self.unflushed = false;
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(chunk) => chunk,
                    };
                    self.phase = match chunk {
                        Ok(Some(chunk)) => {
                            self.writing = chunk;
                            Phase::Writing
                        }
                        Ok(None) => Phase::HalfClosing,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            self.aborted = true;
                            Phase::Done
                        }
                        Err(e) if is_close(&e) => Phase::HalfClosing,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                }
                Phase::Writing => {
                    while !self.writing.is_empty() {
                        match ready!(writer.as_mut().poll_write(cx, &self.writing)) {
                            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                self.writing.advance(n);
                                self.copied += n as u64;
                                self.unflushed = true;
                            }
                            Err(e) if is_close(&e) => {
                                self.writing = Bytes::new();
                                self.phase = Phase::Done;
                                return Poll::Ready(Ok(()));
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    // An emptied slice still holds HTTP/2's whole receive buffer alive.
                    self.writing = Bytes::new();
                    self.phase = Phase::Reading;
                }
                Phase::HalfClosing => {
                    ready!(poll_half_close(cx, writer.as_mut()))?;
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn the_read_buffer_grows_with_the_bytes_copied() {
        let cases = [
            (0, 1024),
            (128 * 1024 - 1, 1024),
            (128 * 1024, 16_320),
            (10 * 1024 * 1024 - 1, 16_320),
            (10 * 1024 * 1024, 62_400),
            (u64::MAX, 62_400),
        ];
        for (copied, size) in cases {
            assert_eq!(read_buffer_size(copied), size, "after {copied} bytes");
        }
    }

    #[tokio::test]
    async fn one_read_takes_no_more_than_the_adaptive_size() {
        let mut source = tokio::io::repeat(7);
        let mut buf = BytesMut::new();
        for (copied, size) in [(0, 1024), (200_000, 16_320), (20_000_000, 62_400)] {
            buf.clear();
            let n = poll_fn(|cx| poll_read_adaptive(cx, Pin::new(&mut source), &mut buf, copied))
                .await
                .unwrap();
            assert_eq!(n, size);
            assert_eq!(buf.len(), size);
        }
    }

    #[test]
    fn a_direction_with_nothing_to_read_holds_no_buffer() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let (mut far_read, _far_write) = tokio::io::split(far);
        let mut sink = tokio::io::sink();
        let mut direction = StreamToStream::default();
        // Bulk first, so the direction has earned its largest buffer.
        let bulk = vec![5u8; 48 * 1024];
        for _ in 0..300 {
            let mut written = 0;
            while written < bulk.len() {
                match Pin::new(&mut near).poll_write(&mut cx, &bulk[written..]) {
                    Poll::Ready(Ok(n)) => written += n,
                    other => panic!("writing to the duplex: {other:?}"),
                }
                let poll = direction.poll(&mut cx, Pin::new(&mut far_read), Pin::new(&mut sink));
                assert!(poll.is_pending(), "the direction ended early");
            }
        }
        assert_eq!(direction.copied, 300 * 48 * 1024);
        assert_eq!(
            direction.buf.capacity(),
            0,
            "an idle direction kept its buffer"
        );
    }

    /// A proxy on loopback: accepts one connection, dials `upstream`, copies, reports.
    async fn proxy(
        upstream: SocketAddr,
    ) -> (SocketAddr, tokio::task::JoinHandle<io::Result<Transferred>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (downstream, _) = listener.accept().await?;
            let upstream = TcpStream::connect(upstream).await?;
            copy_bidirectional(downstream, upstream).await
        });
        (addr, task)
    }

    #[tokio::test]
    async fn bytes_and_half_closes_cross_in_both_directions() {
        // Upstream: reads to EOF, then answers with a large reply and closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        let reply: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected_reply = reply.clone();
        let app = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            tcp.read_to_end(&mut request).await.unwrap();
            tcp.write_all(&reply).await.unwrap();
            tcp.shutdown().await.unwrap();
            request
        });
        let (proxy_addr, proxy_task) = proxy(upstream).await;

        let mut client = TcpStream::connect(proxy_addr).await.unwrap();
        let request: Vec<u8> = (0..500_000u32).map(|i| (i % 241) as u8).collect();
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();

        assert!(got == expected_reply, "reply differs");
        assert!(app.await.unwrap() == request, "request differs");
        let transferred = proxy_task.await.unwrap().unwrap();
        assert_eq!(
            transferred,
            Transferred {
                to_upstream: 500_000,
                to_downstream: 3_000_000
            }
        );
    }

    #[tokio::test]
    async fn a_reset_from_the_upstream_is_a_normal_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut first = [0; 5];
            tcp.read_exact(&mut first).await.unwrap();
            tcp.write_all(b"bye").await.unwrap();
            // Linger 0: closing sends RST instead of FIN.
            tcp.set_zero_linger().unwrap();
            drop(tcp);
        });
        let (proxy_addr, proxy_task) = proxy(upstream).await;
        let mut client = TcpStream::connect(proxy_addr).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        // The client sees the proxy close (or reset) its side.
        let _ = client.read_to_end(&mut got).await;
        let _ = client.write_all(b"more after the reset").await;
        drop(client);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), proxy_task)
            .await
            .expect("copy finished")
            .unwrap();
        let transferred = outcome.expect("a reset is not an error");
        assert_eq!(transferred.to_upstream, 5);
    }
}
