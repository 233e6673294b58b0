//! A read buffer under TLS on HBONE connections. rustls asks its transport for at most 4 KiB
//! more than it holds, so a 16 KiB record took four `recvfrom` calls, and a 62 KiB DATA frame
//! sixteen. Here, once a read fills all rustls asked for (more is likely waiting), one system
//! call takes whatever the socket has, up to [`CAPACITY`], and rustls' small reads are served
//! from memory. When the socket runs dry the buffer is freed and reads go straight through
//! again, so request/response traffic, whose messages fit one read, never allocates it, and an
//! idle connection keeps none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One system call's worth: what TCP usually has ready on a busy connection.
pub const CAPACITY: usize = 64 * 1024;

/// `io` with reads taken [`CAPACITY`] at a time; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    buffer: Vec<u8>,
    /// `buffer[start..]` is still to be handed out.
    start: usize,
    /// The last direct read filled the caller's buffer: read ahead until the socket runs dry.
    ahead: bool,
}

impl<IO> ReadAhead<IO> {
    pub fn new(io: IO) -> ReadAhead<IO> {
        ReadAhead {
            io,
            buffer: Vec::new(),
            start: 0,
            ahead: false,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Bytes read from the socket and not handed out yet.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }

    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = self.buffered().min(out.remaining());
        out.put_slice(&self.buffer[self.start..self.start + n]);
        self.start += n;
        if self.start == self.buffer.len() {
            // Kept for the next read; given back when the socket has nothing more.
            self.buffer.clear();
            self.start = 0;
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        if !this.ahead || out.remaining() >= CAPACITY {
            let wanted = out.remaining();
            let before = out.filled().len();
            let read = Pin::new(&mut this.io).poll_read(cx, out);
            if read.is_ready() && wanted > 0 && out.filled().len() - before == wanted {
                this.ahead = true;
            }
            return read;
        }
        this.buffer.reserve_exact(CAPACITY);
        let mut fill = ReadBuf::uninit(this.buffer.spare_capacity_mut());
        match Pin::new(&mut this.io).poll_read(cx, &mut fill) {
            Poll::Pending => {
                this.buffer = Vec::new();
                this.ahead = false;
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let filled = fill.filled().len();
        // SAFETY: the first `filled` bytes of the spare capacity were written by the read.
        unsafe { this.buffer.set_len(filled) };
        if filled > 0 {
            this.hand_out(out);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn small_reads_come_from_one_large_one_and_every_byte_arrives_in_order() {
        let (mut writer, reader) = tokio::io::duplex(4 * CAPACITY);
        let data: Vec<u8> = (0..3 * CAPACITY + 17).map(|i| (i % 251) as u8).collect();
        writer.write_all(&data).await.unwrap();
        drop(writer);
        let mut reader = ReadAhead::new(reader);
        let mut first = [0u8; 4096];
        reader.read_exact(&mut first).await.unwrap();
        assert_eq!(&first[..], &data[..4096]);
        assert_eq!(
            reader.buffered(),
            0,
            "a read that fills its buffer goes straight through"
        );
        let mut second = [0u8; 4096];
        reader.read_exact(&mut second).await.unwrap();
        assert_eq!(&second[..], &data[4096..8192]);
        assert_eq!(
            reader.buffered(),
            CAPACITY - 4096,
            "then one read takes a whole buffer"
        );
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, data[8192..]);
        assert_eq!(reader.buffered(), 0);
    }

    #[tokio::test]
    async fn a_socket_with_nothing_to_read_leaves_no_buffer() {
        let (mut writer, reader) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(reader);
        writer.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        reader.read_exact(&mut got).await.unwrap();
        let mut more = [0u8; 1];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut more))
                .await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(
            reader.buffer.capacity(),
            0,
            "an idle connection keeps no buffer"
        );
    }

    #[tokio::test]
    async fn messages_that_fit_one_read_never_allocate_a_buffer() {
        let (mut writer, reader) = tokio::io::duplex(4 * CAPACITY);
        let mut reader = ReadAhead::new(reader);
        for round in 0..3u8 {
            writer.write_all(&[round; 1024]).await.unwrap();
            let mut got = [0u8; 4096];
            let n = reader.read(&mut got).await.unwrap();
            assert_eq!(&got[..n], &[round; 1024][..]);
            assert_eq!(reader.buffer.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = ReadAhead::new(a);
        a.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
