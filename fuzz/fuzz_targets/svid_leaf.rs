//! HARDENING.md §8 `svid_leaf`: a leaf certificate built from fuzzed SANs, basic constraints,
//! key usages and EKUs (signed by a test CA, then optionally with one byte of its DER changed)
//! through ztund's HBONE peer verifier on both sides. Whatever the verifier accepts is read again
//! here with x509-parser and must satisfy the SVID rules: not a CA, the EKU of its side when
//! there is an EKU, and a SPIFFE id the side accepts.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::SystemTime;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use x509_parser::extensions::GeneralName;
use ztund::fuzzing;
use ztund::identity::{SpiffeId, WorkloadCertificate};

const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Arbitrary)]
struct Input {
    sans: Vec<San>,
    basic_constraints: Constraints,
    /// One bit per entry of [`KEY_USAGES`].
    key_usages: u16,
    /// `None`: no EKU extension; else one bit per entry of [`EKUS`].
    ekus: Option<u8>,
    /// True: the server side checks a client; false: a client checks a server.
    client_side: bool,
    /// Client side: which of [`NAMES`] the client expects the server to be.
    expected: u8,
    /// One byte of the signed DER changed: (offset, xor).
    corrupt: Option<(u16, u8)>,
}

#[derive(Debug, Arbitrary)]
enum Constraints {
    Absent,
    NotCa,
    Ca,
}

#[derive(Debug, Arbitrary)]
enum San {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>` from small alphabets, so ids repeat and match.
    Spiffe {
        td: u8,
        ns: u8,
        sa: u8,
    },
    Uri(String),
    Dns(u8),
    Ip([u8; 4]),
}

const TRUST_DOMAINS: [&str; 3] = [TRUST_DOMAIN, "example.org", "Cluster.Local"];
const NAMES: [&str; 4] = ["default", "prod", "", ".."];
const KEY_USAGES: [KeyUsagePurpose; 9] = [
    KeyUsagePurpose::DigitalSignature,
    KeyUsagePurpose::ContentCommitment,
    KeyUsagePurpose::KeyEncipherment,
    KeyUsagePurpose::DataEncipherment,
    KeyUsagePurpose::KeyAgreement,
    KeyUsagePurpose::KeyCertSign,
    KeyUsagePurpose::CrlSign,
    KeyUsagePurpose::EncipherOnly,
    KeyUsagePurpose::DecipherOnly,
];
const EKUS: [ExtendedKeyUsagePurpose; 5] = [
    ExtendedKeyUsagePurpose::ServerAuth,
    ExtendedKeyUsagePurpose::ClientAuth,
    ExtendedKeyUsagePurpose::CodeSigning,
    ExtendedKeyUsagePurpose::Any,
    ExtendedKeyUsagePurpose::EmailProtection,
];

struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    leaf_key: KeyPair,
    /// The verifying side's own certificate: only its id and roots are read.
    local: WorkloadCertificate,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let local = WorkloadCertificate {
            id: SpiffeId::new(TRUST_DOMAIN, "default", "local").unwrap(),
            chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            roots: vec![ca.der().clone()],
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::now() + std::time::Duration::from_secs(86400),
        };
        Pki {
            ca,
            ca_key,
            leaf_key,
            local,
        }
    })
}

fn san(san: &San) -> Option<SanType> {
    Some(match san {
        San::Spiffe { td, ns, sa } => {
            let td = TRUST_DOMAINS[usize::from(*td) % TRUST_DOMAINS.len()];
            let ns = NAMES[usize::from(*ns) % NAMES.len()];
            let sa = NAMES[usize::from(*sa) % NAMES.len()];
            SanType::URI(format!("spiffe://{td}/ns/{ns}/sa/{sa}").try_into().ok()?)
        }
        San::Uri(text) => SanType::URI(text.clone().try_into().ok()?),
        San::Dns(n) => SanType::DnsName(format!("host{n}.example").try_into().ok()?),
        San::Ip(octets) => SanType::IpAddress(IpAddr::V4(Ipv4Addr::from(*octets))),
    })
}

fn leaf(input: &Input) -> Option<Vec<u8>> {
    let pki = pki();
    let mut params = CertificateParams::new(Vec::<String>::new()).ok()?;
    params.subject_alt_names = input.sans.iter().take(4).map(san).collect::<Option<_>>()?;
    params.is_ca = match input.basic_constraints {
        Constraints::Absent => IsCa::NoCa,
        Constraints::NotCa => IsCa::ExplicitNoCa,
        Constraints::Ca => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = (KEY_USAGES.iter().enumerate())
        .filter(|(i, _)| input.key_usages & (1 << i) != 0)
        .map(|(_, usage)| *usage)
        .collect();
    if let Some(bits) = input.ekus {
        params.extended_key_usages = (EKUS.iter().enumerate())
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, eku)| eku.clone())
            .collect();
    }
    let mut der = params
        .signed_by(&pki.leaf_key, &pki.ca, &pki.ca_key)
        .ok()?
        .der()
        .to_vec();
    if let Some((offset, xor)) = input.corrupt {
        let len = der.len();
        der[usize::from(offset) % len] ^= xor;
    }
    Some(der)
}

fuzz_target!(|input: Input| {
    let Some(der) = leaf(&input) else {
        return;
    };
    let pki = pki();
    let leaf = CertificateDer::from(der.as_slice());
    let expected_id = SpiffeId::new(
        TRUST_DOMAIN,
        NAMES[usize::from(input.expected) % 2],
        NAMES[usize::from(input.expected / 2) % 2],
    )
    .unwrap();
    let verdict = if input.client_side {
        fuzzing::verify_client_leaf(&pki.local, &leaf, &[], UnixTime::now())
    } else {
        let expected = std::slice::from_ref(&expected_id);
        fuzzing::verify_server_leaf(&pki.local, expected, &leaf, &[], UnixTime::now())
    }
    .expect("the verifier builds from a good trust bundle");
    if verdict.is_err() {
        return;
    }

    // Accepted: read the certificate again, independently of the verifier.
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .unwrap_or_else(|e| panic!("accepted a leaf x509-parser cannot read: {e}"));
    let is_ca = cert
        .basic_constraints()
        .expect("one basicConstraints")
        .is_some_and(|bc| bc.value.ca);
    assert!(!is_ca, "accepted a CA certificate as a leaf ({input:?})");
    if let Some(eku) = cert.extended_key_usage().expect("one EKU extension") {
        let fits = match input.client_side {
            true => eku.value.client_auth,
            false => eku.value.server_auth,
        };
        assert!(
            fits || eku.value.any,
            "accepted a leaf without its side's EKU ({input:?})"
        );
    }
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .expect("one SubjectAltName")
        .map(|san| {
            (san.value.general_names.iter())
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let ids: Vec<SpiffeId> = uris.iter().filter_map(|uri| uri.parse().ok()).collect();
    let fits = |id: &SpiffeId| match input.client_side {
        true => id.trust_domain() == TRUST_DOMAIN,
        false => *id == expected_id,
    };
    assert!(
        ids.iter().any(fits),
        "accepted a leaf whose URI SANs {uris:?} do not fit ({input:?})"
    );
    // T2: exactly one URI SAN, a SPIFFE id; T5: KeyUsage with digitalSignature and neither
    // keyCertSign nor cRLSign.
    {
        assert_eq!(uris.len(), 1, "accepted a leaf with URI SANs {uris:?}");
        assert_eq!(ids.len(), 1, "accepted a leaf with URI SANs {uris:?}");
        let usage = cert.key_usage().expect("one KeyUsage");
        assert!(
            usage.as_ref().is_some_and(|ku| ku.value.digital_signature()
                && !ku.value.key_cert_sign()
                && !ku.value.crl_sign()),
            "accepted a leaf with key usage {:?} ({input:?})",
            usage.map(|ku| ku.value)
        );
    }
});
