//! Pure policy decisions over a snapshot: the effective peer-authentication mode of a
//! (workload, port), the authorization verdict of a connection, the outbound TLS mode of a
//! destination. No I/O of any kind.
//! TODO(policy helper): PeerAuthentication, AuthorizationPolicy, DestinationRule.

use crate::mesh::{DocRef, RawDocument};

/// The policy documents in force, indexed for per-connection decisions.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {}

impl PolicySet {
    /// Reads the security documents (PeerAuthentication, AuthorizationPolicy, DestinationRule)
    /// among `docs`, ignoring other kinds. Any invalid value refuses the whole set.
    pub fn from_documents(
        docs: &[RawDocument],
        root_namespace: &str,
    ) -> Result<PolicySet, PolicyError> {
        let _ = (docs, root_namespace);
        Ok(PolicySet::default())
    }
}

/// A security document ztund cannot enforce as written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyError {
    #[error("{doc}: field `{field}`: {reason}")]
    Invalid {
        doc: DocRef,
        field: String,
        reason: String,
    },
}

/// The verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason (which policy) for the access log.
    Deny(String),
}
