//! Tests of the built-in CA and of `cacerts` directories holding an organisation's intermediate.

use std::os::unix::fs::PermissionsExt;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;

fn id(td: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(td, "default", sa).unwrap()
}

/// Verifies `chain` (leaf first) against `roots` the way a peer does.
pub(crate) fn verify(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|root| webpki::anchor_from_trusted_cert(root).unwrap().to_owned())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0])?;
    let algorithms = crate::tls::backend().signature_verification_algorithms;
    leaf.verify_for_usage(
        algorithms.all,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn issued_leaf_carries_exactly_the_identity_and_workload_usages() {
    let dir = tempfile::tempdir().unwrap();
    CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
    let ttl = Duration::from_secs(3600);
    let ca = CertificateAuthority::load(dir.path(), "cluster.local", ttl).unwrap();
    let sleep = id("cluster.local", "sleep");
    let issued_at = SystemTime::now();
    let cert = ca.issue_now(&sleep).unwrap();

    assert_eq!(cert.id, sleep);
    assert_eq!(cert.chain.len(), 1, "the built-in root is not sent");
    assert_eq!(cert.roots, ca.roots());
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();

    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject requires a critical SAN");
    let names = &san.value.general_names;
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(matches!(names[0], GeneralName::URI(uri) if uri == sleep.to_string()));
    assert_eq!(leaf.subject().iter().count(), 0, "subject is empty");

    let key_usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(key_usage.digital_signature());
    assert!(!key_usage.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
    let basic = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!basic.ca);

    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    let issued = issued_at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(
        (issued - 61..=issued - 59).contains(&not_before),
        "backdated a minute"
    );
    assert!((not_after - issued - 3600).abs() <= 1, "lives the ttl");
    assert_eq!(
        cert.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64,
        not_after
    );
    assert!(cert.refresh_at() > SystemTime::now());

    let has_authority_key_id = leaf.extensions().iter().any(|ext| {
        matches!(
            ext.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )
    });
    assert!(has_authority_key_id, "OpenSSL peers build chains by key id");

    verify(&cert.chain, &cert.roots, webpki::KeyUsage::server_auth()).unwrap();
    verify(&cert.chain, &cert.roots, webpki::KeyUsage::client_auth()).unwrap();

    let again = ca.issue_now(&sleep).unwrap();
    let (_, second) = x509_parser::parse_x509_certificate(&again.chain[0]).unwrap();
    assert_ne!(leaf.serial, second.serial, "serials are random");
    assert_ne!(
        leaf.public_key().raw,
        second.public_key().raw,
        "fresh key each time"
    );
}

#[test]
fn init_writes_the_cacerts_layout_with_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    CertificateAuthority::init(&ca_dir, "cluster.local").unwrap();

    let mode = std::fs::metadata(ca_dir.join(CA_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let root = std::fs::read(ca_dir.join(ROOT_CERT)).unwrap();
    assert_eq!(std::fs::read(ca_dir.join(CA_CERT)).unwrap(), root);
    assert_eq!(std::fs::read(ca_dir.join(CERT_CHAIN)).unwrap(), root);
    let roots = read_certs(&ca_dir.join(ROOT_CERT)).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
    assert!(parsed.is_ca());
    let usage = parsed.key_usage().unwrap().unwrap().value;
    assert!(usage.key_cert_sign() && usage.crl_sign());
    let years = (parsed.validity().not_after.timestamp()
        - parsed.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);

    let key_before = std::fs::read(ca_dir.join(CA_KEY)).unwrap();
    let err = CertificateAuthority::init(&ca_dir, "cluster.local").unwrap_err();
    assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(ca_dir.join(CA_KEY)).unwrap(), key_before);
    assert_eq!(std::fs::read(ca_dir.join(ROOT_CERT)).unwrap(), root);
}

#[test]
fn init_refuses_an_invalid_trust_domain_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = CertificateAuthority::init(dir.path(), "Not/A/Domain").unwrap_err();
    assert!(matches!(err, IdentityError::BadTrustDomain { .. }), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn identities_of_another_trust_domain_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
    let err = ca.issue_now(&id("example.org", "sleep")).unwrap_err();
    assert!(
        matches!(err, IdentityError::ForeignTrustDomain { .. }),
        "{err}"
    );
}

/// An organisation's hierarchy: root → intermediate, written out as `cacerts` by hand.
pub(crate) struct Hierarchy {
    pub(crate) root: rcgen::Certificate,
    pub(crate) intermediate: rcgen::Certificate,
    pub(crate) intermediate_key: KeyPair,
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Example Corp");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    params
}

pub(crate) fn hierarchy() -> Hierarchy {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let root = ca_params("Example Root").self_signed(&root_key).unwrap();
    let intermediate_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = ca_params("Example Mesh Intermediate")
        .signed_by(&intermediate_key, &root, &root_key)
        .unwrap();
    Hierarchy {
        root,
        intermediate,
        intermediate_key,
    }
}

pub(crate) fn write_cacerts(dir: &Path, h: &Hierarchy, extra_root: Option<&rcgen::Certificate>) {
    std::fs::write(dir.join(CA_CERT), h.intermediate.pem()).unwrap();
    std::fs::write(dir.join(CA_KEY), h.intermediate_key.serialize_pem()).unwrap();
    let mut bundle = h.root.pem();
    if let Some(extra) = extra_root {
        bundle = format!("{}{bundle}", extra.pem());
    }
    std::fs::write(dir.join(ROOT_CERT), bundle).unwrap();
    let chain = format!("{}{}", h.intermediate.pem(), h.root.pem());
    std::fs::write(dir.join(CERT_CHAIN), chain).unwrap();
}

#[test]
fn an_organisation_intermediate_issues_leaf_plus_intermediate_chains() {
    let dir = tempfile::tempdir().unwrap();
    let org = hierarchy();
    let unrelated = hierarchy();
    write_cacerts(dir.path(), &org, Some(&unrelated.root));

    let ca = CertificateAuthority::load(dir.path(), "corp.example", DEFAULT_LEAF_TTL).unwrap();
    assert_eq!(
        ca.roots().len(),
        2,
        "every cert in root-cert.pem is trusted"
    );
    let cert = ca.issue_now(&id("corp.example", "api")).unwrap();
    assert_eq!(cert.chain.len(), 2);
    assert_eq!(&cert.chain[1], org.intermediate.der());
    verify(
        &cert.chain,
        &[org.root.der().clone()],
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();
    verify(&cert.chain, &cert.roots, webpki::KeyUsage::server_auth()).unwrap();

    let without_intermediate = verify(
        &cert.chain[..1],
        &cert.roots,
        webpki::KeyUsage::server_auth(),
    );
    assert!(
        without_intermediate.is_err(),
        "the intermediate is what links leaf and root"
    );
}

#[test]
fn a_cert_chain_without_the_ca_cert_still_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let org = hierarchy();
    write_cacerts(dir.path(), &org, None);
    std::fs::write(dir.path().join(CERT_CHAIN), org.root.pem()).unwrap();
    let ca = CertificateAuthority::load(dir.path(), "corp.example", DEFAULT_LEAF_TTL).unwrap();
    let cert = ca.issue_now(&id("corp.example", "api")).unwrap();
    assert_eq!(cert.chain.len(), 2);
    verify(&cert.chain, &cert.roots, webpki::KeyUsage::client_auth()).unwrap();
}

fn load_error(dir: &Path) -> String {
    CertificateAuthority::load(dir, "corp.example", DEFAULT_LEAF_TTL)
        .unwrap_err()
        .to_string()
}

#[test]
fn load_errors_name_the_file_at_fault() {
    let org = hierarchy();
    let other = hierarchy();

    for missing in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), &org, None);
        std::fs::remove_file(dir.path().join(missing)).unwrap();
        let err = load_error(dir.path());
        assert!(err.contains(missing), "missing {missing}: {err}");
    }

    for garbled in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), &org, None);
        std::fs::write(dir.path().join(garbled), "-----BEGIN nonsense\n").unwrap();
        let err = load_error(dir.path());
        assert!(err.contains(garbled), "garbled {garbled}: {err}");
    }

    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &org, None);
    std::fs::write(
        dir.path().join(CA_KEY),
        other.intermediate_key.serialize_pem(),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(CA_KEY) && err.contains("does not hold the key"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_cacerts(dir.path(), &org, None);
    std::fs::write(dir.path().join(ROOT_CERT), other.root.pem()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(CERT_CHAIN) && err.contains(ROOT_CERT), "{err}");
}

#[test]
fn a_leaf_certificate_cannot_pose_as_the_signing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let org = hierarchy();
    write_cacerts(dir.path(), &org, None);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["not-a-ca.example".to_string()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    let not_ca = params
        .signed_by(&leaf_key, &org.intermediate, &org.intermediate_key)
        .unwrap();
    std::fs::write(dir.path().join(CA_CERT), not_ca.pem()).unwrap();
    std::fs::write(dir.path().join(CA_KEY), leaf_key.serialize_pem()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(CA_CERT), "{err}");
}
