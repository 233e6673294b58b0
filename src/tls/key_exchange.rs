//! The crypto library under every TLS stack in ztund and the key-exchange groups HBONE offers:
//! `tls.keyExchange` picks hybrid post-quantum X25519MLKEM768 first (so traffic recorded today
//! cannot be decrypted once ML-KEM's classical partner falls), only it, or classic groups only.
//! One cached provider per setting, with Istio's TLS 1.3 suites only (no ChaCha20).

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use serde::{Deserialize, Serialize};

use super::TlsError;

#[cfg(not(any(feature = "aws-lc", feature = "ring")))]
compile_error!("ztund needs a crypto backend: the `aws-lc` (default) or the `ring` feature");

/// Which key-exchange groups the HBONE client offers (in order) and the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 first, then X25519, P-256, P-384: a peer without the hybrid group (ztunnel
    /// unless `COMPLIANCE_POLICY=pqc`) agrees X25519 in the same round trip. In a `ring` build,
    /// which has no ML-KEM, the classic groups only.
    #[default]
    PqcPreferred,
    /// X25519MLKEM768 only: a classic-only peer fails the handshake (no shared group).
    PqcOnly,
    /// X25519, P-256, P-384 only: never ML-KEM.
    Classic,
}

impl fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyExchange::PqcPreferred => "pqc-preferred",
            KeyExchange::PqcOnly => "pqc-only",
            KeyExchange::Classic => "classic",
        })
    }
}

impl KeyExchange {
    /// The groups in preference order, by their IANA names (for `/config_dump`).
    pub fn group_names(self) -> Result<Vec<String>, TlsError> {
        Ok(groups(self)?
            .iter()
            .map(|group| format!("{:?}", group.name()))
            .collect())
    }
}

/// The crypto library under rustls, tonic and webpki: AWS-LC (default build) or ring.
pub fn backend() -> CryptoProvider {
    #[cfg(feature = "aws-lc")]
    return rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc"))]
    return rustls::crypto::ring::default_provider();
}

/// The backend's name, for `/config_dump` and logs.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "aws-lc") {
        "aws-lc-rs"
    } else {
        "ring"
    }
}

/// Makes [`backend`] the process default, so that the TLS stacks that pick a provider
/// themselves (tonic's gRPC client to the control plane and CA) use the same library even in a
/// build where both are compiled in. Later calls are no-ops.
pub fn install_process_default() {
    let _ = backend().install_default();
}

#[cfg(feature = "aws-lc")]
fn groups(setting: KeyExchange) -> Result<Vec<&'static dyn SupportedKxGroup>, TlsError> {
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    Ok(match setting {
        KeyExchange::PqcPreferred => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
        KeyExchange::PqcOnly => vec![X25519MLKEM768],
        KeyExchange::Classic => vec![X25519, SECP256R1, SECP384R1],
    })
}

#[cfg(not(feature = "aws-lc"))]
fn groups(setting: KeyExchange) -> Result<Vec<&'static dyn SupportedKxGroup>, TlsError> {
    use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
    match setting {
        KeyExchange::PqcOnly => Err(TlsError::KeyExchange {
            setting,
            reason: "this ztund is built with ring, which has no ML-KEM; use the default (aws-lc) build",
        }),
        KeyExchange::PqcPreferred | KeyExchange::Classic => Ok(vec![X25519, SECP256R1, SECP384R1]),
    }
}

/// The backend with Istio's TLS 1.3 suites and `setting`'s groups, built once per setting.
pub(super) fn provider(setting: KeyExchange) -> Result<&'static Arc<CryptoProvider>, TlsError> {
    #[cfg(feature = "aws-lc")]
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    #[cfg(not(feature = "aws-lc"))]
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    static PROVIDERS: [OnceLock<Arc<CryptoProvider>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = &PROVIDERS[setting as usize];
    if let Some(provider) = slot.get() {
        return Ok(provider);
    }
    let kx_groups = groups(setting)?;
    Ok(slot.get_or_init(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
            kx_groups,
            ..backend()
        })
    }))
}
