//! One certificate per identity, fetched on demand, renewed at half its life.
//! TODO(identity helper): implement.

/// Placeholder until the identity helper lands the real cache.
#[derive(Debug, Default)]
pub struct CertManager;
