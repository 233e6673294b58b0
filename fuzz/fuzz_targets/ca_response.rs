//! HARDENING.md §8 `ca_response`: a fuzzed answer of Istio's CA to a CSR (the leaf's URI SANs,
//! whose key it certifies, its validity, how many chain elements, garbage in an element, one
//! byte of the leaf changed) through ztund's reader of the response. A certificate it accepts
//! is read again here: it names exactly the identity asked for, certifies the CSR's key and has
//! not expired.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use x509_parser::extensions::GeneralName;
use ztund::fuzzing;
use ztund::identity::SpiffeId;

const ASKED: &str = "spiffe://cluster.local/ns/default/sa/sleep";

#[derive(Debug, Arbitrary)]
struct Input {
    uris: Vec<Uri>,
    dns_san: bool,
    /// False: the CA certified another key than the CSR's.
    csr_key: bool,
    /// Hours around now: (not_before, not_after).
    validity: (i8, i8),
    /// How many leaf-and-intermediate elements precede the bundle (0..=2).
    elements: u8,
    /// Text put in front of one element: (index, text).
    garbage: Option<(u8, String)>,
    corrupt: Option<(u16, u8)>,
    bundle: Bundle,
}

#[derive(Debug, Arbitrary)]
enum Uri {
    Asked,
    /// The asked id with one character changed: (position, replacement).
    Altered(u8, char),
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Bundle {
    TheRoot,
    Empty,
    Garbage(String),
}

struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    csr_key: KeyPair,
    other_key: KeyPair,
    root_pem: String,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = params.self_signed(&ca_key).unwrap();
        let root_pem = ca.pem();
        Pki {
            ca,
            ca_key,
            csr_key: KeyPair::generate().unwrap(),
            other_key: KeyPair::generate().unwrap(),
            root_pem,
        }
    })
}

fn uri(uri: &Uri) -> String {
    match uri {
        Uri::Asked => ASKED.to_string(),
        Uri::Altered(at, c) => {
            let mut chars: Vec<char> = ASKED.chars().collect();
            let at = usize::from(*at) % chars.len();
            chars[at] = *c;
            chars.into_iter().collect()
        }
        Uri::Other(text) => text.clone(),
    }
}

fn hours(h: i8) -> SystemTime {
    let offset = Duration::from_secs(3600 * u64::from(h.unsigned_abs()));
    if h < 0 {
        SystemTime::now() - offset
    } else {
        SystemTime::now() + offset
    }
}

fn response(input: &Input) -> Option<Vec<String>> {
    let pki = pki();
    let mut params = CertificateParams::new(Vec::<String>::new()).ok()?;
    for u in input.uris.iter().take(3) {
        params
            .subject_alt_names
            .push(SanType::URI(uri(u).try_into().ok()?));
    }
    if input.dns_san {
        params
            .subject_alt_names
            .push(SanType::DnsName("sleep.default".try_into().ok()?));
    }
    params.not_before = hours(input.validity.0).into();
    params.not_after = hours(input.validity.1).into();
    let key = if input.csr_key {
        &pki.csr_key
    } else {
        &pki.other_key
    };
    let leaf = params.signed_by(key, &pki.ca, &pki.ca_key).ok()?;
    let mut der = leaf.der().to_vec();
    if let Some((offset, xor)) = input.corrupt {
        let len = der.len();
        der[usize::from(offset) % len] ^= xor;
    }
    let mut chain = vec![ztund::identity::ca::pem_of(&der)];
    if input.elements % 3 == 2 {
        chain.push(pki.root_pem.clone());
    }
    chain.truncate(usize::from(input.elements % 3));
    chain.push(match &input.bundle {
        Bundle::TheRoot => pki.root_pem.clone(),
        Bundle::Empty => String::new(),
        Bundle::Garbage(text) => text.clone(),
    });
    if let Some((index, text)) = &input.garbage {
        let len = chain.len();
        chain[usize::from(*index) % len].insert_str(0, text);
    }
    Some(chain)
}

fuzz_target!(|input: Input| {
    let Some(chain) = response(&input) else {
        return;
    };
    let id: SpiffeId = ASKED.parse().unwrap();
    let pki = pki();
    let Ok(cert) = fuzzing::istio_ca_response(&id, &pki.csr_key, &chain) else {
        return;
    };
    assert_eq!(cert.id, id);
    assert!(!cert.chain.is_empty() && !cert.roots.is_empty());
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0])
        .unwrap_or_else(|e| panic!("accepted a leaf x509-parser cannot read: {e}"));
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            (san.value.general_names.iter())
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(uris, [ASKED], "accepted a leaf for {uris:?} ({input:?})");
    assert_eq!(
        leaf.tbs_certificate.subject_pki.raw,
        pki.csr_key.public_key_der().as_slice(),
        "accepted a leaf for another key"
    );
    assert!(
        leaf.validity().not_after.timestamp() > time_now(),
        "accepted an expired leaf"
    );
    // X7: the chain verifies against the bundle the CA sent.
    chain_verifies(&cert);
});

fn time_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Now, or the leaf's start if a CA clock up to five minutes ahead put it there (ztund checks
/// such a leaf as of its start and renews it early).
fn verification_time(not_before: SystemTime) -> rustls::pki_types::UnixTime {
    let now = SystemTime::now();
    let at = if not_before > now && not_before <= now + std::time::Duration::from_secs(300) {
        not_before
    } else {
        now
    };
    rustls::pki_types::UnixTime::since_unix_epoch(
        at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default(),
    )
}

fn chain_verifies(cert: &ztund::identity::WorkloadCertificate) {
    let anchors: Vec<_> = (cert.roots.iter())
        .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&cert.chain[0]).expect("a parsable leaf");
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let verified = leaf.verify_for_usage(
        algorithms.all,
        &anchors,
        &cert.chain[1..],
        verification_time(cert.not_before),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    );
    assert!(
        verified.is_ok(),
        "accepted a chain that does not verify: {:?}",
        verified.err()
    );
}
