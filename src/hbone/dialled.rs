//! What a dial function hands the pool: the TLS stream (the server's identity already checked)
//! and, when the caller knows it, when the certificate our side presented expires. The pool
//! opens no new stream on a connection past the earlier of that and the peer's certificate's
//! expiry (HARDENING F4): rotation must not leave a long-lived pooled connection standing on an
//! identity proof that is no longer valid.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;

/// A dialled HBONE connection, as the pool takes it.
pub trait Dialled: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn into_parts(self) -> (TlsStream<Self::Io>, Option<SystemTime>);
}

impl<IO> Dialled for TlsStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = IO;

    fn into_parts(self) -> (TlsStream<IO>, Option<SystemTime>) {
        (self, None)
    }
}

/// A dialled stream and the expiry of the certificate our side presented on it: past that
/// instant (or the peer's certificate's), no new stream goes over the connection.
pub struct WithCertExpiry<IO> {
    pub tls: TlsStream<IO>,
    pub local_not_after: SystemTime,
}

impl<IO> Dialled for WithCertExpiry<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = IO;

    fn into_parts(self) -> (TlsStream<IO>, Option<SystemTime>) {
        (self.tls, Some(self.local_not_after))
    }
}

/// When a connection stops taking new streams: the earlier of our certificate's expiry (if
/// known) and the peer's leaf's.
pub(super) fn connection_expiry(
    local_not_after: Option<SystemTime>,
    tls: &rustls::CommonState,
) -> Option<SystemTime> {
    match (local_not_after, peer_not_after(tls)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When the peer's leaf certificate expires, if it can be read.
pub(crate) fn peer_not_after(state: &rustls::CommonState) -> Option<SystemTime> {
    let leaf = state.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
