//! gRPC plumbing shared by the clients of a control plane (xDS) and of a CA: a TLS channel to
//! `https://host:port` verified against a root file (with a server-name override, as
//! `ALT_XDS_HOSTNAME`/`ALT_CA_HOSTNAME` do for ztunnel), and the per-call metadata istiod
//! expects — `authorization: Bearer <token>` re-read from its file on every call, `clusterid`.
//!
//! The channel's sockets carry ztund's mark (0x539) like every socket ztund opens, so the
//! redirection of a captured host (`capture: host`) never sends the daemon's own control-plane
//! traffic back into its proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How to reach a control plane or CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https://host:port` (a value without a scheme gets `https://`).
    pub address: String,
    /// PEM roots the server's certificate must chain to.
    pub root_cert: PathBuf,
    /// The name checked against the server's certificate instead of the address's host.
    pub server_name: Option<String>,
}

/// The metadata attached to every call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallAuth {
    /// A file holding the bearer token (a projected service-account token, or a node token of
    /// `ztund controlplane`); `None` sends no `authorization`.
    pub token_file: Option<PathBuf>,
    /// Sent as `clusterid`.
    pub cluster_id: String,
}

/// Why a channel or a call could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    EmptyToken { path: String },
    #[error("token or cluster id is not valid in gRPC metadata: {0}")]
    Metadata(String),
    #[error("connecting to {address}: {reason}")]
    Connect { address: String, reason: String },
}

/// The connect timeout istiod's clients use (PROTOCOL.md §2.3).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle connection is probed with an HTTP/2 PING.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

impl Target {
    /// The address with its scheme, as tonic wants it.
    pub fn uri(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("https://{}", self.address)
        }
    }

    /// A channel over TLS 1.3/1.2 with ALPN h2, verified against `root_cert`. Connects lazily:
    /// the first call dials, and a broken connection is re-dialled by the next call.
    pub fn channel(&self) -> Result<Channel, GrpcError> {
        self.channel_with_keepalive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
    }

    /// [`Target::channel`] with another HTTP/2 keepalive: a PING every `interval`, and the
    /// connection dropped when one goes unanswered for `timeout` (tests use short ones).
    pub fn channel_with_keepalive(
        &self,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Channel, GrpcError> {
        let uri = self.uri();
        let bad = |reason: String| GrpcError::Address {
            address: self.address.clone(),
            reason,
        };
        let roots = std::fs::read(&self.root_cert).map_err(|source| GrpcError::Read {
            path: self.root_cert.display().to_string(),
            source,
        })?;
        let host = self
            .server_name
            .clone()
            .or_else(|| host_of(&uri))
            .ok_or_else(|| bad("has no host".into()))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(roots))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(300)))
            .tcp_nodelay(true);
        Ok(endpoint.connect_with_connector_lazy(MarkedConnector))
    }
}

/// Dials the channel's TCP connections with [`crate::net::SocketFactory`]: marked 0x539,
/// `TCP_NODELAY`, in the daemon's own namespace.
#[derive(Debug, Clone, Copy)]
struct MarkedConnector;

impl tonic::codegen::Service<http::Uri> for MarkedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let mut last = invalid("the host resolves to no address");
            let sockets = crate::net::SocketFactory {
                netns: None,
                mark: Some(crate::net::ZTUND_MARK),
            };
            for addr in tokio::net::lookup_host((host, port)).await? {
                match sockets.connect(addr, None).await {
                    Ok(stream) => return Ok(hyper_util::rt::TokioIo::new(stream)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

/// The host part of `scheme://host:port/...`, brackets removed from an IPv6 literal.
fn host_of(uri: &str) -> Option<String> {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_string())
}

impl CallAuth {
    /// Adds `authorization` (the token file read now, whitespace trimmed: a token file ending in
    /// a newline must not make every call fail) and `clusterid` to a request.
    pub fn apply<T>(&self, request: &mut tonic::Request<T>) -> Result<(), GrpcError> {
        let metadata = request.metadata_mut();
        if let Some(path) = &self.token_file {
            let token = read_token(path)?;
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|e| GrpcError::Metadata(e.to_string()))?;
            metadata.insert("authorization", value);
        }
        if !self.cluster_id.is_empty() {
            let value = MetadataValue::try_from(self.cluster_id.as_str())
                .map_err(|e| GrpcError::Metadata(e.to_string()))?;
            metadata.insert("clusterid", value);
        }
        Ok(())
    }
}

/// A token file's content without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String, GrpcError> {
    let text = std::fs::read_to_string(path).map_err(|source| GrpcError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(GrpcError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(token.to_string())
}

/// The bearer token of an incoming call, if it carries one (`authorization: Bearer <t>`).
pub fn bearer_token<T>(request: &tonic::Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_addresses() {
        assert_eq!(
            host_of("https://istiod.istio-system.svc:15012").as_deref(),
            Some("istiod.istio-system.svc")
        );
        assert_eq!(
            host_of("https://[fd00::1]:15012").as_deref(),
            Some("fd00::1")
        );
        assert_eq!(
            host_of("https://10.0.0.1:15012/").as_deref(),
            Some("10.0.0.1")
        );
        let target = Target {
            address: "cp:15012".into(),
            root_cert: "r".into(),
            server_name: None,
        };
        assert_eq!(target.uri(), "https://cp:15012");
    }

    #[test]
    fn a_token_file_is_read_on_every_call_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc\n").unwrap();
        let auth = CallAuth {
            token_file: Some(path.clone()),
            cluster_id: "Kubernetes".into(),
        };
        let mut request = tonic::Request::new(());
        auth.apply(&mut request).unwrap();
        assert_eq!(bearer_token(&request), Some("abc"));
        assert_eq!(request.metadata().get("clusterid").unwrap(), "Kubernetes");

        std::fs::write(&path, "  rotated \n").unwrap();
        let mut request = tonic::Request::new(());
        auth.apply(&mut request).unwrap();
        assert_eq!(bearer_token(&request), Some("rotated"));

        std::fs::write(&path, "\n").unwrap();
        let err = auth.apply(&mut tonic::Request::new(())).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
