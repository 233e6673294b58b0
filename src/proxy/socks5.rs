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

/// Reads the greeting and the request, answering the greeting; the caller answers the request
/// with [`reply`] once it knows the outcome.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Target, Socks5Error> {
    let version = stream.read_u8().await?;
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let count = stream.read_u8().await? as usize;
    let mut methods = vec![0u8; count];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    stream.write_all(&[VERSION, NO_AUTH]).await?;

    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let [version, command, _reserved, address_type] = head;
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    if command != CMD_CONNECT {
        reply(stream, Reply::CommandNotSupported).await?;
        return Err(Socks5Error::Command(command));
    }
    let target = match address_type {
        ATYP_V4 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await?;
            let port = stream.read_u16().await?;
            Target::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        ATYP_V6 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await?;
            let port = stream.read_u16().await?;
            Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        ATYP_DOMAIN => {
            let len = stream.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            let port = stream.read_u16().await?;
            let name = String::from_utf8(name).map_err(|_| Socks5Error::DomainEncoding)?;
            // A client may send an IP literal as a "domain"; treat it as the address it is.
            match name.parse::<IpAddr>() {
                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                Err(_) => Target::Domain(name, port),
            }
        }
        other => {
            reply(stream, Reply::AddressTypeNotSupported).await?;
            return Err(Socks5Error::AddressType(other));
        }
    };
    Ok(target)
}

/// Sends the reply to the request; the bound address is not meaningful here and is all zeros.
pub async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, code: Reply) -> std::io::Result<()> {
    stream
        .write_all(&[VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(client_bytes: Vec<u8>) -> (Result<Target, Socks5Error>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&client_bytes).await.unwrap();
        let result = accept(&mut server).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (result, answer)
    }

    #[tokio::test]
    async fn connect_ipv4() {
        let (target, answer) = run(vec![5, 1, 0, 5, 1, 0, 1, 10, 1, 2, 3, 0x1f, 0x90]).await;
        assert_eq!(
            target.unwrap(),
            Target::Addr("10.1.2.3:8080".parse().unwrap())
        );
        assert_eq!(answer, vec![5, 0]);
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
