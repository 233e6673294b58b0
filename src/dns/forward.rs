//! Forwarding a query the mesh does not own to the upstream resolvers: over UDP from a fresh
//! socket (random source port, random query id, connected so only the upstream can answer),
//! again over TCP when the answer comes back truncated (TC=1), each upstream in turn until one
//! answers within the timeout. Sockets are made in the asking pod's namespace with ztund's mark,
//! so the port-53 redirection lets them out. The number of forwards in flight is capped over the
//! whole node ([`Forwarder::try_permit`]).
//!
//! The answer is passed on as the upstream wrote it: only its id is put back to the client's
//! (the two header bytes are read and written in place; nothing else of the answer is parsed).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::net::SocketFactory;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured (dns.upstreams, or nameservers in dns.resolvConf)")]
    NoUpstreams,
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error("asking upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the query is shorter than a DNS header")]
    ShortQuery,
}

/// The upstreams and the node-wide cap on forwards in flight.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

/// The largest DNS message (its TCP length prefix is 16 bits).
const MAX_MESSAGE: usize = 65_535;
/// Header byte 2 holds QR, OPCODE, AA, TC, RD; TC is this bit.
const TC_BIT: u8 = 0x02;

impl Forwarder {
    /// A forwarder over `upstreams`, each given `timeout`, at most `max_in_flight` at once.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, max_in_flight: usize) -> Forwarder {
        Forwarder {
            upstreams,
            timeout,
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// A slot for one forward, or `None` when the cap is reached (the caller answers REFUSED).
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// The upstreams in the order they are tried.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Sends `query` upstream from `sockets`' namespace; `tcp_first` skips the UDP attempt (the
    /// client itself asked over TCP, usually after a truncated answer). Returns the upstream's
    /// answer with the client's id.
    pub async fn forward(
        &self,
        sockets: &SocketFactory,
        query: &[u8],
        tcp_first: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        if query.len() < 12 {
            return Err(ForwardError::ShortQuery);
        }
        let client_id = [query[0], query[1]];
        let mut last = ForwardError::NoUpstreams;
        for upstream in &self.upstreams {
            let id: u16 = rand::random();
            let mut ours = query.to_vec();
            ours[..2].copy_from_slice(&id.to_be_bytes());
            match self.ask(sockets, *upstream, &ours, tcp_first).await {
                Ok(mut answer) => {
                    answer[..2].copy_from_slice(&client_id);
                    return Ok(answer);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        sockets: &SocketFactory,
        upstream: SocketAddr,
        query: &[u8],
        tcp_first: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let timed = |e: tokio::time::error::Elapsed| {
            let _ = e;
            ForwardError::Timeout {
                upstream,
                timeout: self.timeout,
            }
        };
        let io = |source| ForwardError::Io { upstream, source };
        if !tcp_first {
            let answer = tokio::time::timeout(self.timeout, ask_udp(sockets, upstream, query))
                .await
                .map_err(timed)?
                .map_err(io)?;
            if answer[2] & TC_BIT == 0 {
                return Ok(answer);
            }
        }
        tokio::time::timeout(self.timeout, ask_tcp(sockets, upstream, query))
            .await
            .map_err(timed)?
            .map_err(io)
    }
}

/// A UDP socket bound to an ephemeral port in the factory's namespace, with its mark.
pub fn udp_socket(sockets: &SocketFactory, bind: SocketAddr) -> io::Result<UdpSocket> {
    let make = || -> io::Result<Socket> {
        let socket = Socket::new(
            Domain::for_address(bind),
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if let Some(mark) = sockets.mark {
            socket.set_mark(mark)?;
        }
        socket
            .bind(&bind.into())
            .map_err(|e| io::Error::new(e.kind(), format!("binding {bind}: {e}")))?;
        Ok(socket)
    };
    let socket = match &sockets.netns {
        Some(netns) => netns.enter(make)??,
        None => make()?,
    };
    UdpSocket::from_std(socket.into())
}

async fn ask_udp(
    sockets: &SocketFactory,
    upstream: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let any = SocketAddr::new(crate::net::unspecified(upstream.is_ipv6()), 0);
    let socket = udp_socket(sockets, any)?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything else on this port (a late answer to nothing, a spoof attempt) is ignored.
        if n >= 12 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(
    sockets: &SocketFactory,
    upstream: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let mut stream = sockets.connect(upstream, None::<IpAddr>).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    loop {
        let len = usize::from(stream.read_u16().await?);
        let mut answer = vec![0u8; len];
        stream.read_exact(&mut answer).await?;
        if len >= 12 && answer[..2] == query[..2] {
            return Ok(answer);
        }
    }
}
