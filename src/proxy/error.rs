//! Why one proxied connection ended with an error, for every listener (outbound, inbound HBONE,
//! inbound plaintext). Logged once where the connection ends ([`super::accept`]); a refusal is
//! also counted and logged by [`super::refusals`] where it is decided.

use std::net::SocketAddr;

use crate::hbone::HboneError;
use crate::shard::PlacementError;
use crate::tls::TlsError;

use super::socks5::Socks5Error;

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket could not tell its own or its original destination address.
    #[error("{0}")]
    Address(#[source] std::io::Error),
    /// Nothing on this node owns the address the connection was made to.
    #[error("no local workload owns {addr}; closing")]
    NoLocalWorkload { addr: SocketAddr },
    /// The connection targets one of ztund's own ports: a loop.
    #[error("{addr} is one of ztund's own ports")]
    OwnPort { addr: SocketAddr },
    /// The local workload's certificate could not be had.
    #[error(transparent)]
    Credentials(#[from] TlsError),
    /// Handshake admission shed it before its TLS handshake finished.
    #[error("shed before its TLS handshake finished")]
    Shed,
    /// The HBONE handshake or session failed.
    #[error(transparent)]
    Hbone(#[from] HboneError),
    /// The local workload could not be connected to.
    #[error("connecting to {target}: {source}")]
    Connect {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The SOCKS5 exchange failed or was malformed.
    #[error(transparent)]
    Socks5(#[from] Socks5Error),
    /// The SOCKS5 reply could not be sent.
    #[error("{0}")]
    Socks5Reply(#[source] std::io::Error),
    /// A SOCKS5 client that is not a workload of this node.
    #[error("{peer} is not a workload of this node")]
    NotAWorkload { peer: SocketAddr },
    /// A SOCKS5 host name that names no mesh service.
    #[error("{name} is not a mesh service")]
    NotAService { name: String },
    /// The connection could not move to the shard chosen for it.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}
