//! A lingering close for served HBONE connections. When HTTP/2 has finished a connection (a
//! drain's GOAWAY, an idle timeout) it has queued its last frames and shut down the write side,
//! but the peer may still be sending: WINDOW_UPDATEs for the DATA it is reading, a PING. Closing
//! a socket with unread bytes makes the kernel answer with a RST and throw away what it had not
//! sent yet — the end of a stream's data, lost in the last moment of a hand-over. So the socket
//! is kept (through a duplicate of its descriptor) and read until the peer closes its side, for
//! at most [`LINGER`].

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a finished connection waits for its peer to close before closing anyway.
const LINGER: Duration = Duration::from_secs(2);

/// A second handle on a connection's socket, taken before the socket is handed to TLS and
/// HTTP/2, so that dropping them does not close it.
pub struct Lingering(OwnedFd);

impl Lingering {
    /// `None` when the descriptor cannot be duplicated (out of descriptors): the connection is
    /// then closed as before.
    pub fn keep(tcp: &TcpStream) -> Option<Lingering> {
        tcp.as_fd().try_clone_to_owned().ok().map(Lingering)
    }

    /// Once the connection is done: reads and discards until the peer's FIN, an error, or
    /// [`LINGER`], then closes.
    pub async fn close(self) {
        let std = std::net::TcpStream::from(self.0);
        let Ok(mut tcp) = TcpStream::from_std(std) else {
            return;
        };
        let mut sink = [0u8; 2048];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(n) = tcp.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// The server has written its last bytes and shut down its side; the client's bytes it never
    /// read (a WINDOW_UPDATE, say) are still in its socket when it is done. The client must
    /// still read everything and a clean EOF. `lingering`: whether the server lingers; without
    /// it the kernel resets the connection (the case this module exists for).
    async fn client_reads_all(lingering: bool) -> std::io::Result<usize> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let keep = lingering.then(|| Lingering::keep(&server).unwrap());
        client.write_all(b"window update").await.unwrap();
        server.write_all(&vec![7u8; 256 << 10]).await.unwrap();
        server.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(server);
        let closing = tokio::spawn(async move {
            if let Some(keep) = keep {
                keep.close().await;
            }
        });
        let mut back = Vec::new();
        let read = client.read_to_end(&mut back).await;
        drop(client);
        closing.await.unwrap();
        read
    }

    #[tokio::test]
    async fn a_lingering_close_lets_the_peer_read_everything_and_a_clean_eof() {
        assert_eq!(client_reads_all(true).await.unwrap(), 256 << 10);
        // The failure it prevents, checked on this kernel: unread bytes make close() a RST.
        let reset = client_reads_all(false).await;
        assert_eq!(
            reset.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }
}
