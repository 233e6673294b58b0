//! The SOCKS5 handshake (RFC 1928): no authentication, CONNECT only, IPv4, IPv6 and domain-name
//! targets. The listener in `outbound` uses it as a way into the mesh without transparent capture.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// Where the client asked to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Domain(String, u16),
}

/// RFC 1928 reply codes ztund uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// A client that did not speak SOCKS5 as ztund supports it.
#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS version {0} is not 5")]
    Version(u8),
    #[error("client offers no 'no authentication' method")]
    NoAcceptableMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is unknown")]
    AddressType(u8),
    #[error("domain name is not UTF-8")]
    DomainEncoding,
    #[error("reading the handshake: {0}")]
    Io(#[from] std::io::Error),
}

/// The longest greeting (2 + 255 methods) followed by the longest request (4 + 1 + 255 + 2).
const MAX_HANDSHAKE: usize = 2 + 255 + 4 + 1 + 255 + 2;
/// The shortest request: a domain name of length zero.
const MIN_REQUEST: usize = 4 + 1 + 2;

/// A parsed request, waiting for [`Handshake::reply`].
#[derive(Debug)]
pub struct Handshake {
    pub target: Target,
    /// A client that pipelined its request did not wait for the method selection; it goes out
    /// with the reply, in one segment.
    method_selection_owed: bool,
}

impl Handshake {
    /// Sends the reply to the request (after the method selection, if still owed).
    pub async fn reply<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        code: Reply,
    ) -> std::io::Result<()> {
        answer(stream, self.method_selection_owed, code).await
    }
}

/// Reads the greeting and the request, answering the greeting; the caller answers the request
/// with [`Handshake::reply`] once it knows the outcome.
///
/// Each read asks for no more than the bytes known to belong to the handshake, so a client that
/// pipelines greeting and request costs two or three reads, and bytes it sends after its
/// request stay in the stream for the upstream.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Handshake, Socks5Error> {
    let mut bytes = Received::default();
    // Whatever the method count, a greeting and the shortest request make at least 9 bytes.
    bytes.fill(stream, 2, 2 + MIN_REQUEST).await?;
    if bytes.at(0) != VERSION {
        return Err(Socks5Error::Version(bytes.at(0)));
    }
    let greeting = 2 + bytes.at(1) as usize;
    bytes.fill(stream, greeting, greeting + MIN_REQUEST).await?;
    if !bytes.get(2..greeting).contains(&NO_AUTH) {
        stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    let pipelined = bytes.len > greeting;
    if !pipelined {
        // The client may be waiting for the method selection before it sends the request.
        stream.write_all(&[VERSION, NO_AUTH]).await?;
    }
    let owed = pipelined;

    let head = greeting;
    bytes.fill(stream, head + 4, head + MIN_REQUEST).await?;
    let [version, command, _reserved, address_type] = [
        bytes.at(head),
        bytes.at(head + 1),
        bytes.at(head + 2),
        bytes.at(head + 3),
    ];
    if version != VERSION {
        if owed {
            let _ = stream.write_all(&[VERSION, NO_AUTH]).await;
        }
        return Err(Socks5Error::Version(version));
    }
    if command != CMD_CONNECT {
        answer(stream, owed, Reply::CommandNotSupported).await?;
        return Err(Socks5Error::Command(command));
    }
    let address = head + 4;
    let target = match address_type {
        ATYP_V4 => {
            let end = address + 4 + 2;
            bytes.fill(stream, end, end).await?;
            let ip: [u8; 4] = bytes.array(address);
            Target::Addr(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(ip)),
                bytes.port(address + 4),
            ))
        }
        ATYP_V6 => {
            let end = address + 16 + 2;
            bytes.fill(stream, end, end).await?;
            let ip: [u8; 16] = bytes.array(address);
            Target::Addr(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                bytes.port(address + 16),
            ))
        }
        ATYP_DOMAIN => {
            bytes.fill(stream, address + 1, address + 1).await?;
            let len = bytes.at(address) as usize;
            let end = address + 1 + len + 2;
            bytes.fill(stream, end, end).await?;
            let name = std::str::from_utf8(bytes.get(address + 1..address + 1 + len))
                .map_err(|_| Socks5Error::DomainEncoding)?;
            let port = bytes.port(address + 1 + len);
            // A client may send an IP literal as a "domain"; treat it as the address it is.
            match name.parse::<IpAddr>() {
                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                Err(_) => Target::Domain(name.to_string(), port),
            }
        }
        other => {
            answer(stream, owed, Reply::AddressTypeNotSupported).await?;
            return Err(Socks5Error::AddressType(other));
        }
    };
    Ok(Handshake {
        target,
        method_selection_owed: owed,
    })
}

/// The handshake bytes read so far.
struct Received {
    buf: [u8; MAX_HANDSHAKE],
    len: usize,
}

impl Default for Received {
    fn default() -> Self {
        Received {
            buf: [0; MAX_HANDSHAKE],
            len: 0,
        }
    }
}

impl Received {
    /// Reads until at least `need` bytes are in, never past `limit` (the most that is known to
    /// belong to the handshake). An end of stream before `need` is an error.
    async fn fill<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        need: usize,
        limit: usize,
    ) -> std::io::Result<()> {
        let limit = limit.min(MAX_HANDSHAKE);
        while self.len < need {
            let read = stream.read(&mut self.buf[self.len..limit]).await?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.len += read;
        }
        Ok(())
    }

    // Callers only index below a `need` that `fill` has reached; the bounds are those of
    // MAX_HANDSHAKE, which no field can exceed (one-byte lengths).
    fn at(&self, i: usize) -> u8 {
        self.buf[i]
    }

    fn get(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    fn array<const N: usize>(&self, start: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[start..start + N]);
        out
    }

    fn port(&self, start: usize) -> u16 {
        u16::from_be_bytes(self.array(start))
    }
}

/// The reply to the request, after the method selection when that is still owed: one write.
async fn answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    method_selection_owed: bool,
    code: Reply,
) -> std::io::Result<()> {
    // The bound address is not meaningful here and is all zeros.
    let both = [
        VERSION, NO_AUTH, VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0,
    ];
    let bytes = if method_selection_owed {
        &both[..]
    } else {
        &both[2..]
    };
    stream.write_all(bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `client_bytes` at once, runs the handshake (replying `Succeeded` when it parses)
    /// and returns the target and every byte the client got back.
    async fn run(client_bytes: Vec<u8>) -> (Result<Target, Socks5Error>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&client_bytes).await.unwrap();
        // The client sends nothing more: a handshake cut short must end, not wait.
        client.shutdown().await.unwrap();
        let result = accept(&mut server).await;
        if let Ok(handshake) = &result {
            handshake
                .reply(&mut server, Reply::Succeeded)
                .await
                .unwrap();
        }
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (result.map(|h| h.target), answer)
    }

    const SUCCEEDED: [u8; 10] = [5, 0, 0, 1, 0, 0, 0, 0, 0, 0];

    #[tokio::test]
    async fn connect_ipv4() {
        let (target, answer) = run(vec![5, 1, 0, 5, 1, 0, 1, 10, 1, 2, 3, 0x1f, 0x90]).await;
        assert_eq!(
            target.unwrap(),
            Target::Addr("10.1.2.3:8080".parse().unwrap())
        );
        // Pipelined: the method selection and the reply leave together.
        assert_eq!(answer[..2], [5, 0]);
        assert_eq!(answer[2..], SUCCEEDED);
    }

    #[tokio::test]
    async fn a_request_split_into_one_byte_segments_still_parses() {
        let mut bytes = vec![5, 2, 2, 0, 5, 1, 0, 3, 15];
        bytes.extend_from_slice(b"echo.default.sv");
        bytes.extend_from_slice(&8080u16.to_be_bytes());
        let (mut client, mut server) = tokio::io::duplex(1024);
        let sender = tokio::spawn(async move {
            for byte in bytes {
                client.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let handshake = accept(&mut server).await.unwrap();
        assert_eq!(
            handshake.target,
            Target::Domain("echo.default.sv".into(), 8080)
        );
        handshake
            .reply(&mut server, Reply::Succeeded)
            .await
            .unwrap();
        drop(server);
        let mut answer = Vec::new();
        let mut client = sender.await.unwrap();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer[..2], [5, 0]);
        assert_eq!(answer[2..], SUCCEEDED);
    }

    #[tokio::test]
    async fn a_client_that_waits_gets_the_method_selection_before_it_sends_the_request() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let client_side = tokio::spawn(async move {
            client.write_all(&[5, 1, 0]).await.unwrap();
            let mut selection = [0u8; 2];
            client.read_exact(&mut selection).await.unwrap();
            assert_eq!(selection, [5, 0]);
            client
                .write_all(&[5, 1, 0, 1, 10, 1, 2, 3, 0, 80])
                .await
                .unwrap();
            let mut reply = [0u8; 10];
            client.read_exact(&mut reply).await.unwrap();
            reply
        });
        let handshake =
            tokio::time::timeout(std::time::Duration::from_secs(5), accept(&mut server))
                .await
                .expect("the handshake does not wait for a request the client holds back")
                .unwrap();
        assert_eq!(
            handshake.target,
            Target::Addr("10.1.2.3:80".parse().unwrap())
        );
        handshake
            .reply(&mut server, Reply::Succeeded)
            .await
            .unwrap();
        assert_eq!(client_side.await.unwrap(), SUCCEEDED);
    }

    #[tokio::test]
    async fn bytes_pipelined_after_the_request_stay_in_the_stream() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut bytes = vec![5, 1, 0, 5, 1, 0, 1, 10, 1, 2, 3, 0, 80];
        bytes.extend_from_slice(b"GET / HTTP/1.1");
        client.write_all(&bytes).await.unwrap();
        drop(client);
        let handshake = accept(&mut server).await.unwrap();
        assert_eq!(
            handshake.target,
            Target::Addr("10.1.2.3:80".parse().unwrap())
        );
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn a_handshake_cut_short_is_an_error() {
        let (r, _) = run(vec![5, 1, 0, 5, 1, 0, 1, 10, 1]).await;
        assert!(
            matches!(&r, Err(Socks5Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn connect_ipv6() {
        let mut bytes = vec![5, 1, 0, 5, 1, 0, 4];
        bytes.extend_from_slice(&"fd00::3".parse::<Ipv6Addr>().unwrap().octets());
        bytes.extend_from_slice(&80u16.to_be_bytes());
        let (target, _) = run(bytes).await;
        assert_eq!(
            target.unwrap(),
            Target::Addr("[fd00::3]:80".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn connect_domain() {
        let mut bytes = vec![5, 2, 2, 0, 5, 1, 0, 3, 4];
        bytes.extend_from_slice(b"echo");
        bytes.extend_from_slice(&80u16.to_be_bytes());
        let (target, _) = run(bytes).await;
        assert_eq!(target.unwrap(), Target::Domain("echo".into(), 80));
    }

    #[tokio::test]
    async fn refusals() {
        let (r, _) = run(vec![4, 1, 0]).await;
        assert!(matches!(r, Err(Socks5Error::Version(4))));
        let (r, answer) = run(vec![5, 1, 2]).await;
        assert!(matches!(r, Err(Socks5Error::NoAcceptableMethod)));
        assert_eq!(answer, vec![5, 0xff]);
        let (r, answer) = run(vec![5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]).await;
        assert!(matches!(r, Err(Socks5Error::Command(2))));
        assert_eq!(answer[2..4], [5, 7]);
        let (r, answer) = run(vec![5, 1, 0, 5, 1, 0, 9]).await;
        assert!(matches!(r, Err(Socks5Error::AddressType(9))));
        assert_eq!(answer[2..4], [5, 8]);
    }
}
