//! Pure policy decisions over a snapshot: the effective peer-authentication mode of a
//! (workload, port), the authorization verdict of a connection, the outbound TLS mode of a
//! destination. No I/O of any kind.
//! TODO(policy helper): PeerAuthentication, AuthorizationPolicy, DestinationRule.

/// The policy documents in force, indexed for per-connection decisions.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {}

/// The verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason (which policy) for the access log.
    Deny(String),
}
