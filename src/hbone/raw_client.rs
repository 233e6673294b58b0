//! A hostile HTTP/2 client for tests: writes frames by hand over any byte stream (a TLS stream
//! with a valid client SVID, in practice), so tests can send what a well-behaved client never
//! would (Rapid Reset, CONTINUATION floods, PING floods, zero windows, malformed CONNECTs), and
//! reads the server's frames back. HPACK: requests are encoded as literals without indexing
//! (no table state to keep); a response's `:status` is decoded from the static table, a
//! literal, or the entries the response headers added. Not for production.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// HTTP/2 error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const CONNECT_ERROR: u32 = 0xa;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
}

/// What the server did with a stream, or with the whole connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Reset(u32),
    GoAway { last_stream: u32, code: u32 },
    Closed,
    Timeout,
}

/// The client over `io`.
pub struct RawClient<S> {
    io: S,
    read: BytesMut,
    /// `:status` values the server's HPACK encoder added to its dynamic table, newest first.
    dynamic: Vec<Option<u16>>,
    /// Answer the server's SETTINGS and PINGs like a live client would.
    pub polite: bool,
    /// Frames read from the server so far.
    pub frames_read: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Sends the preface and a SETTINGS frame with `settings`.
    pub async fn start(io: S, settings: &[(u16, u32)]) -> std::io::Result<RawClient<S>> {
        let mut client = RawClient {
            io,
            read: BytesMut::new(),
            dynamic: Vec::new(),
            polite: true,
            frames_read: 0,
        };
        client.send_bytes(PREFACE).await?;
        client.settings(settings).await?;
        Ok(client)
    }

    /// The server side: reads the client's preface, then sends an empty SETTINGS frame.
    pub async fn accept(mut io: S) -> std::io::Result<RawClient<S>> {
        let mut preface = [0u8; PREFACE.len()];
        io.read_exact(&mut preface).await?;
        if preface != PREFACE {
            return Err(std::io::Error::other("not an HTTP/2 preface"));
        }
        let mut server = RawClient {
            io,
            read: BytesMut::new(),
            dynamic: Vec::new(),
            polite: true,
            frames_read: 0,
        };
        server.settings(&[]).await?;
        Ok(server)
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.send_bytes(&frame(kind, flags, stream, payload)).await
    }

    pub async fn settings(&mut self, settings: &[(u16, u32)]) -> std::io::Result<()> {
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| {
                let mut entry = id.to_be_bytes().to_vec();
                entry.extend(value.to_be_bytes());
                entry
            })
            .collect();
        self.send(SETTINGS, 0, 0, &payload).await
    }

    /// HEADERS (END_HEADERS) for `CONNECT authority` plus `extra` fields, in order.
    pub async fn connect(
        &mut self,
        stream: u32,
        authority: &str,
        extra: &[(&str, &str)],
    ) -> std::io::Result<()> {
        let mut fields = vec![(":method", "CONNECT"), (":authority", authority)];
        fields.extend_from_slice(extra);
        self.send(HEADERS, END_HEADERS, stream, &header_block(&fields))
            .await
    }

    pub async fn reset(&mut self, stream: u32, code: u32) -> std::io::Result<()> {
        self.send(RST_STREAM, 0, stream, &code.to_be_bytes()).await
    }

    pub async fn window_update(&mut self, stream: u32, increment: u32) -> std::io::Result<()> {
        self.send(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
            .await
    }

    /// The next frame; `None` once the server closed the connection or after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Frame, Answer> {
        match tokio::time::timeout(wait, self.read_frame()).await {
            Err(_) => Err(Answer::Timeout),
            Ok(None) => Err(Answer::Closed),
            Ok(Some(frame)) => Ok(frame),
        }
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.read.len() >= 9 {
                let len = u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]);
                let len = len as usize;
                if self.read.len() >= 9 + len {
                    let header = self.read.split_to(9);
                    let payload = self.read.split_to(len).freeze();
                    let frame = Frame {
                        kind: header[3],
                        flags: header[4],
                        stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff,
                        payload,
                    };
                    self.frames_read += 1;
                    if self.polite {
                        self.be_polite(&frame).await;
                    }
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn be_polite(&mut self, frame: &Frame) {
        let _ = match frame.kind {
            SETTINGS if frame.flags & ACK == 0 => self.send(SETTINGS, ACK, 0, &[]).await,
            PING if frame.flags & ACK == 0 => self.send(PING, ACK, 0, &frame.payload).await,
            _ => Ok(()),
        };
    }

    /// Reads until the server answers `stream` (status, reset), sends GOAWAY, or closes.
    pub async fn answer(&mut self, stream: u32, wait: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = match self.next(left).await {
                Ok(frame) => frame,
                Err(answer) => return answer,
            };
            match frame.kind {
                HEADERS if frame.stream == stream => {
                    let status = self.status(&frame.payload);
                    return Answer::Status(status.unwrap_or(0));
                }
                HEADERS => {
                    self.status(&frame.payload);
                }
                RST_STREAM if frame.stream == stream => {
                    return Answer::Reset(be32(&frame.payload));
                }
                GOAWAY => return goaway(&frame),
                _ => {}
            }
        }
    }

    /// Reads until GOAWAY (its answer), the close, or `wait`; everything else is skipped.
    pub async fn until_goaway(&mut self, wait: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(frame) if frame.kind == GOAWAY => return goaway(&frame),
                Ok(frame) if frame.kind == HEADERS => {
                    self.status(&frame.payload);
                }
                Ok(_) => {}
                Err(answer) => return answer,
            }
        }
    }

    /// Reads until the server closes the connection (true) or `wait` passes (false).
    pub async fn until_closed(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(_) => {}
                Err(Answer::Closed) => return true,
                Err(_) => return false,
            }
        }
    }

    /// The `:status` of a response header block (the first field h2 encodes).
    fn status(&mut self, block: &[u8]) -> Option<u16> {
        let mut at = 0;
        // Dynamic table size updates come first.
        while at < block.len() && block[at] & 0xe0 == 0x20 {
            at += 1;
        }
        let first = *block.get(at)?;
        if first & 0x80 != 0 {
            let index = usize::from(first & 0x7f);
            return match index {
                8..=14 => Some([200, 204, 206, 304, 400, 404, 500][index - 8]),
                62.. => self.dynamic.get(index - 62).copied().flatten(),
                _ => None,
            };
        }
        let inserted = first & 0xc0 == 0x40;
        let name_index = if inserted { first & 0x3f } else { first & 0x0f };
        if !(8..=14).contains(&name_index) {
            return None;
        }
        let value = decode_string(&block[at + 1..])?;
        let status = std::str::from_utf8(&value).ok()?.parse().ok();
        if inserted {
            self.dynamic.insert(0, status);
        }
        status
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

fn goaway(frame: &Frame) -> Answer {
    let mut payload = frame.payload.clone();
    if payload.len() < 8 {
        return Answer::GoAway {
            last_stream: u32::MAX,
            code: u32::MAX,
        };
    }
    let last_stream = payload.get_u32() & 0x7fff_ffff;
    let code = payload.get_u32();
    Answer::GoAway { last_stream, code }
}

fn be32(payload: &[u8]) -> u32 {
    payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(u32::MAX)
}

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block of literal fields without indexing, names and values as plain strings.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        encode_length(name.len(), &mut out);
        out.extend_from_slice(name.as_bytes());
        encode_length(value.len(), &mut out);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// An HPACK integer with a 7-bit prefix, Huffman bit clear.
fn encode_length(mut n: usize, out: &mut Vec<u8>) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A short HPACK string: plain, or Huffman-coded digits (all a `:status` holds).
fn decode_string(bytes: &[u8]) -> Option<Vec<u8>> {
    let head = *bytes.first()?;
    let len = usize::from(head & 0x7f);
    let body = bytes.get(1..1 + len)?;
    if head & 0x80 == 0 {
        return Some(body.to_vec());
    }
    // Digits: '0'..'2' are 5-bit codes 0..2, '3'..'9' 6-bit codes 0x19..0x1f (RFC 7541 App. B).
    let bits: Vec<u8> = body
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let read = |from: usize, n: usize| -> Option<u8> {
        let slice = bits.get(from..from + n)?;
        Some(slice.iter().fold(0, |acc, b| acc << 1 | b))
    };
    let mut out = Vec::new();
    let mut at = 0;
    while bits.len() - at >= 5 {
        let five = read(at, 5)?;
        if five < 3 {
            out.push(b'0' + five);
            at += 5;
            continue;
        }
        let Some(six) = read(at, 6) else { break };
        if (0x19..=0x1f).contains(&six) {
            out.push(b'3' + (six - 0x19));
            at += 6;
        } else {
            break;
        }
    }
    Some(out)
}

/// Client TLS for the raw client, offering ALPN `h2` with `config`.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_statuses_decode() {
        // "503" and "401" as h2's encoder writes them (RFC 7541 Appendix B codes).
        let encode = |digits: &str| {
            let mut bits = Vec::new();
            for d in digits.bytes() {
                let (code, n) = match d {
                    b'0'..=b'2' => (d - b'0', 5),
                    _ => (0x19 + d - b'3', 6),
                };
                bits.extend((0..n).rev().map(|i| (code >> i) & 1));
            }
            while bits.len() % 8 != 0 {
                bits.push(1);
            }
            let bytes: Vec<u8> = bits
                .chunks(8)
                .map(|c| c.iter().fold(0, |a, b| a << 1 | b))
                .collect();
            let mut out = vec![0x80 | bytes.len() as u8];
            out.extend(bytes);
            out
        };
        for status in ["503", "401", "429", "200", "400"] {
            assert_eq!(decode_string(&encode(status)).unwrap(), status.as_bytes());
        }
    }
}
