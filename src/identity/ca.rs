//! The built-in CA (`rcgen`, ECDSA P-256) and an organisation's Istio-style `cacerts` directory:
//! `ca-cert.pem` + `ca-key.pem` sign, `root-cert.pem` is the trust bundle, `cert-chain.pem` leads
//! from `ca-cert.pem` up to a root. Issues workload leaves; does not cache or renew them
//! (`manager` does) and knows nothing about TLS configurations.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;

use super::pem::{read_certs, read_key};
use super::{BoxFuture, IdentityError, IdentitySource, SpiffeId, WorkloadCertificate};

/// The signing (possibly intermediate) CA certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing CA's private key; written with mode 0600.
pub const CA_KEY: &str = "ca-key.pem";
/// The trust bundle: one or more root certificates.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The chain from `ca-cert.pem` up to its root.
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Istio's default `SECRET_TTL`.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How far `not_before` is backdated so peers with slightly slow clocks accept a fresh cert.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A CA that signs workload certificates for one trust domain.
pub struct CertificateAuthority {
    dir: PathBuf,
    trust_domain: String,
    leaf_ttl: Duration,
    signer: KeyPair,
    /// rcgen's view of `ca-cert.pem`: the issuer name and key identifier leaves are stamped with.
    issuer: rcgen::Certificate,
    write_authority_key_id: bool,
    issuer_not_after: SystemTime,
    /// Sent after the leaf: `ca-cert.pem` and its parents, roots excluded.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("leaf_ttl", &self.leaf_ttl)
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a self-signed root for `trust_domain` in `dir` (Istio's `cacerts` layout) and loads
    /// it with the default leaf lifetime. Refuses to touch a directory that already holds a CA.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, IdentityError> {
        check_trust_domain(trust_domain)?;
        let files = [CA_KEY, CA_CERT, ROOT_CERT, CERT_CHAIN];
        if files.iter().any(|name| dir.join(name).exists()) {
            return Err(IdentityError::AlreadyExists {
                dir: dir.display().to_string(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
            path: dir.display().to_string(),
            source,
        })?;

        let signing = |reason: rcgen::Error| IdentityError::Signing {
            id: format!("the root CA of {trust_domain}"),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(signing)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "ztund root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let (not_before, not_after) = validity(SystemTime::now(), CLOCK_SKEW, ROOT_LIFETIME);
        params.not_before = offset_time(not_before);
        params.not_after = offset_time(not_after);
        let root = params.self_signed(&key).map_err(signing)?;

        // The key goes first: `create_new` makes a concurrent `init` lose cleanly here.
        write_new(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        for name in [CA_CERT, ROOT_CERT, CERT_CHAIN] {
            write_new(&dir.join(name), root.pem().as_bytes(), 0o644)?;
        }
        Self::load(dir, trust_domain, DEFAULT_LEAF_TTL)
    }

    /// Reads a `cacerts` directory: the built-in CA's, or an organisation's intermediate CA.
    pub fn load(
        dir: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<CertificateAuthority, IdentityError> {
        check_trust_domain(trust_domain)?;
        let path = |name: &str| dir.join(name);
        let bad = |name: &str, reason: String| IdentityError::BadPem {
            path: path(name).display().to_string(),
            reason,
        };

        let ca_cert = read_certs(&path(CA_CERT))?.swap_remove(0);
        let signer = KeyPair::try_from(read_key(&path(CA_KEY))?.secret_pkcs8_der())
            .map_err(|err| bad(CA_KEY, format!("not a key rcgen can sign with: {err}")))?;
        let roots = read_certs(&path(ROOT_CERT))?;
        let chain = read_certs(&path(CERT_CHAIN))?;

        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_cert)
            .map_err(|err| bad(CA_CERT, format!("not an X.509 certificate: {err}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != signer.public_key_raw() {
            return Err(bad(CA_KEY, format!("does not hold the key of {CA_CERT}")));
        }
        let issuer_not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );

        let params = CertificateParams::from_ca_cert_der(&ca_cert)
            .map_err(|err| bad(CA_CERT, format!("cannot sign with this certificate: {err}")))?;
        let write_authority_key_id =
            matches!(params.key_identifier_method, KeyIdMethod::PreSpecified(_));
        let issuer = params
            .self_signed(&signer)
            .map_err(|err| bad(CA_CERT, format!("cannot sign with this certificate: {err}")))?;

        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        if chain.first() != Some(&ca_cert) {
            intermediates.push(ca_cert.clone());
        }
        intermediates.extend(chain);
        intermediates.retain(|cert| !roots.contains(cert));
        intermediates.dedup();

        let ca = CertificateAuthority {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            leaf_ttl,
            signer,
            issuer,
            write_authority_key_id,
            issuer_not_after,
            intermediates,
            roots,
        };
        ca.check_probe_leaf(&ca_cert)?;
        Ok(ca)
    }

    /// The trust domain whose identities this CA signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle handed out with every certificate.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// How long issued leaves live.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs a fresh key pair for `id`: one (critical) URI SAN, empty subject, client and server
    /// auth, valid for the leaf lifetime.
    pub fn issue_now(&self, id: &SpiffeId) -> Result<WorkloadCertificate, IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let signing = |reason: rcgen::Error| IdentityError::Signing {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(signing)?;

        // A short-lived leaf must not spend most of its life backdated, or it would be due for
        // renewal the moment it is issued.
        let skew = CLOCK_SKEW.min(self.leaf_ttl / 4);
        let (not_before, mut not_after) = validity(SystemTime::now(), skew, self.leaf_ttl);
        not_after = not_after.min(self.issuer_not_after);

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(random_serial());
        params.not_before = offset_time(not_before);
        params.not_after = offset_time(not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = self.write_authority_key_id;
        params.custom_extensions = vec![uri_san(&id.to_string())];
        let leaf = params
            .signed_by(&key, &self.issuer, &self.signer)
            .map_err(signing)?;

        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(WorkloadCertificate {
            id: id.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            roots: self.roots.clone(),
            not_before,
            not_after,
        })
    }

    /// Signs a PKCS#10 CSR (PEM) for `id`: its signature must verify and its one URI SAN must be
    /// `id`. The leaf carries that SAN (critical, empty subject), client and server auth, is no
    /// CA, and lives `ttl` (capped by the CA's own expiry). Returns leaf then intermediates,
    /// each one PEM; the roots are [`CertificateAuthority::roots`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let key = csr_public_key(csr_pem, id)?;
        let leaf = self.sign_leaf(&key, id, ttl, |params| {
            params.custom_extensions = vec![uri_san(&id.to_string())];
        })?;
        Ok(self.pem_chain(leaf.der()))
    }

    /// A server certificate for the control plane's own endpoint: a fresh key, the given DNS
    /// names and IP addresses as SANs, server auth. Returns (chain PEM, key PEM).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), IdentityError> {
        let what = format!("the serving certificate ({dns_names:?} {ips:?})");
        let signing = |reason: rcgen::Error| IdentityError::Signing {
            id: what.clone(),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(signing)?;
        let mut names = Vec::new();
        for dns in dns_names {
            let name = dns.clone().try_into().map_err(signing)?;
            names.push(rcgen::SanType::DnsName(name));
        }
        names.extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        let leaf = self.sign_leaf(&key, &what, ttl, |params| {
            params.subject_alt_names = names;
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        })?;
        Ok((self.pem_chain(leaf.der()).concat(), key.serialize_pem()))
    }

    /// Signs a leaf for `public_key`; `customise` sets the names and usages.
    fn sign_leaf(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        what: &dyn std::fmt::Display,
        ttl: Duration,
        customise: impl FnOnce(&mut CertificateParams),
    ) -> Result<rcgen::Certificate, IdentityError> {
        let skew = CLOCK_SKEW.min(ttl / 4);
        let (not_before, not_after) = validity(SystemTime::now(), skew, ttl);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(random_serial());
        params.not_before = offset_time(not_before);
        params.not_after = offset_time(not_after.min(self.issuer_not_after));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = self.write_authority_key_id;
        customise(&mut params);
        params
            .signed_by(public_key, &self.issuer, &self.signer)
            .map_err(|reason| IdentityError::Signing {
                id: what.to_string(),
                reason: reason.to_string(),
            })
    }

    /// `leaf` then the intermediates, each one PEM ending in a newline.
    fn pem_chain(&self, leaf: &CertificateDer<'_>) -> Vec<String> {
        std::iter::once(leaf)
            .chain(self.intermediates.iter())
            .map(|der| pem_of(der))
            .collect()
    }

    /// Signs a throw-away leaf and verifies it the way peers will, so that a `cacerts` directory
    /// whose pieces do not fit together fails at start-up, naming the file, not at the first
    /// handshake.
    fn check_probe_leaf(&self, ca_cert: &CertificateDer<'static>) -> Result<(), IdentityError> {
        let bad = |name: &str, reason: String| IdentityError::BadPem {
            path: self.dir.join(name).display().to_string(),
            reason,
        };
        let probe = SpiffeId::new(&self.trust_domain, "ztund-probe", "probe")
            .map_err(|err| bad(CA_CERT, err.to_string()))?;
        let leaf = self.issue_now(&probe)?;
        let algorithms = crate::tls::backend().signature_verification_algorithms;
        let now = UnixTime::now();
        let end_entity = webpki::EndEntityCert::try_from(&leaf.chain[0])
            .map_err(|err| bad(CA_CERT, format!("signs unparsable leaves: {err}")))?;

        let own_anchor = webpki::anchor_from_trusted_cert(ca_cert)
            .map_err(|err| bad(CA_CERT, format!("not usable as a CA: {err}")))?;
        end_entity
            .verify_for_usage(
                algorithms.all,
                &[own_anchor],
                &[],
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|err| {
                bad(
                    CA_CERT,
                    format!("leaves it signs do not verify against it ({err}); is it a CA certificate that is valid now?"),
                )
            })?;

        let anchors = self
            .roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map(|anchor| anchor.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| {
                bad(
                    ROOT_CERT,
                    format!("holds a certificate that is not a usable root: {err}"),
                )
            })?;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            end_entity
                .verify_for_usage(
                    algorithms.all,
                    &anchors,
                    &leaf.chain[1..],
                    now,
                    usage,
                    None,
                    None,
                )
                .map_err(|err| {
                    bad(
                        CERT_CHAIN,
                        format!(
                            "{CA_CERT} does not chain through it to a root in {ROOT_CERT}: {err}"
                        ),
                    )
                })?;
        }
        Ok(())
    }
}

impl IdentitySource for CertificateAuthority {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move { self.issue_now(id) })
    }
}

/// One certificate as PEM, ending in a newline.
pub fn pem_of(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut base64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                base64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                base64.push(b'=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in base64.chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The public key of a CSR whose signature verifies and whose only URI SAN is `id`.
struct CsrKey {
    der: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }
    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

fn csr_public_key(csr_pem: &str, id: &SpiffeId) -> Result<CsrKey, IdentityError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let bad = |reason: String| IdentityError::Csr {
        id: id.to_string(),
        reason,
    };
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::{Error as PemError, PemObject};
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| match e {
            PemError::NoItemsFound => bad("no CERTIFICATE REQUEST block in the PEM".into()),
            e => bad(format!("not PEM: {e}")),
        })?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("not a PKCS#10 request: {e}")))?;
    csr.verify_signature()
        .map_err(|e| bad(format!("its signature does not verify: {e}")))?;
    let mut uris = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(uri.to_string());
                }
            }
        }
    }
    if uris != [id.to_string()] {
        return Err(bad(format!(
            "must carry exactly one URI SAN, {id}; it carries {uris:?}"
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let algorithm_oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.to_id_string());
    let algorithm = match (algorithm_oid.as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => &rcgen::PKCS_ECDSA_P256_SHA256,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => &rcgen::PKCS_ECDSA_P384_SHA384,
        ("1.3.101.112", _) => &rcgen::PKCS_ED25519,
        ("1.2.840.113549.1.1.1", _) => &rcgen::PKCS_RSA_SHA256,
        (other, curve) => {
            return Err(bad(format!(
                "key algorithm {other} (parameters {curve:?}) is not one ztund signs"
            )));
        }
    };
    Ok(CsrKey {
        der: spki.subject_public_key.data.to_vec(),
        algorithm,
    })
}

/// The trust domain must be one a SPIFFE id could carry.
fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    SpiffeId::new(trust_domain, "ns", "sa")
        .map(|_| ())
        .map_err(|source| IdentityError::BadTrustDomain {
            trust_domain: trust_domain.to_string(),
            source,
        })
}

/// A critical SubjectAltName holding one URI: critical because the subject is empty (RFC 5280
/// §4.2.1.6), as in the certificates istiod issues.
pub(super) fn uri_san(uri: &str) -> CustomExtension {
    const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];
    const TAG_URI: u8 = 0x86; // [6] IMPLICIT IA5String
    const TAG_SEQUENCE: u8 = 0x30;
    let names = der(TAG_SEQUENCE, &der(TAG_URI, uri.as_bytes()));
    let mut extension = CustomExtension::from_oid_content(OID_SUBJECT_ALT_NAME, names);
    extension.set_criticality(true);
    extension
}

fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(value);
    out
}

/// A positive 16-byte random serial (RFC 5280 allows up to 20; leading byte non-zero).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x10;
    SerialNumber::from_slice(&bytes)
}

/// Validity on whole seconds, as the certificate will carry it.
fn validity(now: SystemTime, backdate: Duration, life: Duration) -> (SystemTime, SystemTime) {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let not_before = UNIX_EPOCH + Duration::from_secs(now.saturating_sub(backdate.as_secs()));
    let not_after = UNIX_EPOCH + Duration::from_secs(now + life.as_secs().max(1));
    (not_before, not_after)
}

fn offset_time(at: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(at)
}

/// Writes a file that must not exist yet, with `mode` from the start (no window where the key is
/// readable by others).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| IdentityError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists {
                    dir: path.parent().unwrap_or(path).display().to_string(),
                }
            } else {
                write_error(err)
            }
        })?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
#[path = "ca_tests.rs"]
pub(crate) mod tests;
