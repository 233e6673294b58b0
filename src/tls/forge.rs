//! Hand-made certificates for the hardening tests: a root (or intermediate) CA that signs
//! whatever leaf a test shapes, starting from a correct X509-SVID and breaking one rule.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{SpiffeId, WorkloadCertificate};

pub(super) const TRUST_DOMAIN: &str = "cluster.local";

/// A signing CA: a root, or an intermediate with its chain up to (not including) the root.
pub(super) struct Forge {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Intermediates from this CA up, this CA's own certificate first (empty for a root).
    chain: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

impl Forge {
    /// A self-signed root named `cn`.
    pub(super) fn root(cn: &str) -> Forge {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(cn).self_signed(&key).unwrap();
        let root = cert.der().clone();
        Forge {
            cert,
            key,
            chain: Vec::new(),
            root,
        }
    }

    /// An intermediate under this CA, shaped by `customise`.
    pub(super) fn intermediate(
        &self,
        cn: &str,
        customise: impl FnOnce(&mut CertificateParams),
    ) -> Forge {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(cn);
        customise(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Forge {
            cert,
            key,
            chain,
            root: self.root.clone(),
        }
    }

    pub(super) fn root_der(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// This CA's certificate.
    pub(super) fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A correct SVID for `sa` in the default namespace of [`TRUST_DOMAIN`].
    pub(super) fn svid(&self, sa: &str) -> WorkloadCertificate {
        self.leaf(&id(sa), |_| {})
    }

    /// An SVID for `id` as `customise` reshapes it, signed by this CA, trusting its root. The
    /// certificate's `id` field is `id` whatever the SANs say (it is what we ask for, or claim).
    pub(super) fn leaf(
        &self,
        id: &SpiffeId,
        customise: impl FnOnce(&mut CertificateParams),
    ) -> WorkloadCertificate {
        let key = KeyPair::generate().unwrap();
        let mut params = svid_params(&id.to_string());
        customise(&mut params);
        let leaf = params.signed_by(&key, &self.cert, &self.key).unwrap();
        self.workload(id, leaf.der().clone(), &key)
    }

    /// `leaf` and this CA's chain, with `key`, trusting this CA's root.
    pub(super) fn workload(
        &self,
        id: &SpiffeId,
        leaf: CertificateDer<'static>,
        key: &KeyPair,
    ) -> WorkloadCertificate {
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        WorkloadCertificate {
            id: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: vec![self.root.clone()],
            not_before: SystemTime::now() - Duration::from_secs(60),
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }
}

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub(super) fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", sa).unwrap()
}

pub(super) fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// What istiod and the built-in CA issue: one URI SAN, not a CA, digitalSignature, both EKUs.
pub(super) fn svid_params(uri: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri_san(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::hours(1);
    params
}

pub(super) fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

/// A DER TLV: the one `identity::pem` writes keys with.
pub(super) use crate::identity::pem::der;

/// An extension rcgen cannot express, with `oid` and raw `content`.
pub(super) fn raw_extension(oid: &[u64], content: Vec<u8>, critical: bool) -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(oid, content);
    ext.set_criticality(critical);
    ext
}
