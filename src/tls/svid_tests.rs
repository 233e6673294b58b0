//! HARDENING T1–T8: hostile certificates, hand-made with rcgen, against the real verifier in a
//! real handshake on both sides (as a client of our server, and as a server our client dials).
//! Each is refused, nothing reaches the other side's application, and the refusal names the rule.

use std::time::{Duration, Instant};

use rcgen::{DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::UnixTime;
use rustls::server::danger::ClientCertVerifier;

use super::forge::{Forge, TRUST_DOMAIN, der, id, raw_extension, svid_params, uri_san};
use super::svid::{Purpose, SvidError, check_leaf};
use super::tests::handshake;
use super::*;

/// `bad` as a client of a correct server, then as the server a correct client dials (expecting
/// `bad.id`): both handshakes fail, the side that checks `bad` says `reason`, and the greeting
/// each side sends after its handshake never arrives (nothing reached the application). The
/// hostile side presents `bad` as is (rustls' own consistency check would refuse some of them
/// before they ever reach the wire) and accepts whatever it is shown.
async fn refused_both_ways(forge: &Forge, bad: &WorkloadCertificate, reason: &str) {
    let good_server = forge.svid("httpbin");
    let server = server_config(&good_server).unwrap();
    let (server_side, client_side) = handshake(server, hostile_client(bad)).await;
    let err = server_side.expect_err("inbound: server accepted the hostile client");
    assert!(
        err.contains(reason),
        "inbound refusal {err:?} lacks {reason:?}"
    );
    assert!(client_side.is_err(), "inbound: client exchanged data");

    let good_client = forge.svid("sleep");
    let client = client_config(&good_client, std::slice::from_ref(&bad.id)).unwrap();
    let (server_side, client_side) = handshake(hostile_server(bad), client).await;
    let err = client_side.expect_err("outbound: client accepted the hostile server");
    assert!(
        err.contains(reason),
        "outbound refusal {err:?} lacks {reason:?}"
    );
    assert!(server_side.is_err(), "outbound: server exchanged data");
}

/// Presents one certificate, whatever it holds.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl Fixed {
    fn of(cert: &WorkloadCertificate) -> Arc<Fixed> {
        let provider = provider(KeyExchange::default()).unwrap();
        let key = provider
            .key_provider
            .load_private_key(cert.key.clone_key())
            .unwrap();
        Arc::new(Fixed(Arc::new(rustls::sign::CertifiedKey::new(
            cert.chain.clone(),
            key,
        ))))
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An attacker's client: trusts any server, presents `bad`.
#[derive(Debug)]
struct TrustsAnything {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for TrustsAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    super::signature_checks!();
}

fn hostile_client(bad: &WorkloadCertificate) -> Arc<ClientConfig> {
    let provider = provider(KeyExchange::default()).unwrap();
    let trusting = TrustsAnything {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(trusting))
        .with_client_cert_resolver(Fixed::of(bad));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// An attacker's server: presents `bad`, asks for no client certificate.
fn hostile_server(bad: &WorkloadCertificate) -> Arc<ServerConfig> {
    let provider = provider(KeyExchange::default()).unwrap();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Fixed::of(bad));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

fn forged() -> SpiffeId {
    id("forged")
}

// HARDENING T1
#[tokio::test]
async fn self_signed_expired_and_not_yet_valid_leaves_are_refused_both_ways() {
    let forge = Forge::root("mesh root");

    let key = KeyPair::generate().unwrap();
    let self_signed = svid_params(&forged().to_string())
        .self_signed(&key)
        .unwrap();
    let self_signed = forge.workload(&forged(), self_signed.der().clone(), &key);
    refused_both_ways(&forge, &self_signed, "UnknownIssuer").await;

    let now = time::OffsetDateTime::now_utc();
    let expired = forge.leaf(&forged(), |p| {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now - time::Duration::seconds(1);
    });
    refused_both_ways(&forge, &expired, "Expired").await;

    let early = forge.leaf(&forged(), |p| {
        p.not_before = now + time::Duration::minutes(5);
        p.not_after = now + time::Duration::hours(1);
    });
    refused_both_ways(&forge, &early, "NotValidYet").await;

    // A foreign CA whose root the hostile side even bundles: only the verifier can stop it.
    let foreign = Forge::root("mesh root");
    let mut intruder = foreign.svid("forged");
    intruder.roots = vec![forge.root_der()];
    refused_both_ways(&forge, &intruder, "invalid peer certificate").await;
}

// HARDENING T2
#[tokio::test]
async fn leaves_without_exactly_one_spiffe_uri_san_are_refused_both_ways() {
    let forge = Forge::root("mesh root");
    let ours = forged().to_string();
    let theirs = "spiffe://cluster.local/ns/kube-system/sa/admin";
    let cases: Vec<(&str, Vec<SanType>, &str)> = vec![
        (
            "two SPIFFE ids",
            vec![uri_san(&ours), uri_san(theirs)],
            "2 URI SANs",
        ),
        (
            "two SPIFFE ids, other order",
            vec![uri_san(theirs), uri_san(&ours)],
            "2 URI SANs",
        ),
        (
            "SPIFFE then https",
            vec![uri_san(&ours), uri_san("https://example.com/")],
            "2 URI SANs",
        ),
        (
            "https then SPIFFE",
            vec![uri_san("https://example.com/"), uri_san(&ours)],
            "2 URI SANs",
        ),
        (
            "non-SPIFFE URI only",
            vec![uri_san("https://cluster.local/ns/default/sa/forged")],
            "not a SPIFFE id",
        ),
        (
            "DNS only",
            vec![SanType::DnsName("forged.default.svc".try_into().unwrap())],
            "no URI SAN",
        ),
        ("no SAN at all", vec![], "no SubjectAltName"),
    ];
    for (what, sans, reason) in cases {
        let bad = forge.leaf(&forged(), |p| {
            p.subject_alt_names = sans;
            // The CN says the right thing: it must never be read.
            p.distinguished_name.push(DnType::CommonName, ours.as_str());
        });
        eprintln!("T2 case: {what}");
        refused_both_ways(&forge, &bad, reason).await;
    }
    // A DNS SAN beside the one SPIFFE URI is allowed (X509-SVID §2).
    let with_dns = forge.leaf(&forged(), |p| {
        p.subject_alt_names
            .push(SanType::DnsName("forged.default.svc".try_into().unwrap()));
    });
    let server = server_config(&forge.svid("httpbin")).unwrap();
    let client = client_config(&with_dns, &[id("httpbin")]).unwrap();
    let (server_side, _) = handshake(server, client).await;
    assert_eq!(server_side.unwrap().peer, Some(forged()));
}

// HARDENING T3
#[tokio::test]
async fn a_valid_chain_to_a_bundled_root_of_another_trust_domain_is_refused_both_ways() {
    let ours = Forge::root("cluster.local root");
    let other = Forge::root("other.example root");
    let bundle = vec![ours.root_der(), other.root_der()];
    let stranger_id = SpiffeId::new("other.example", "default", "sleep").unwrap();
    let mut stranger = other.leaf(&stranger_id, |_| {});
    stranger.roots = bundle.clone();

    // Inbound: a client of other.example, its chain fine against our bundle.
    let mut server_cert = ours.svid("httpbin");
    server_cert.roots = bundle.clone();
    let server = server_config(&server_cert).unwrap();
    let (server_side, client_side) = handshake(server, hostile_client(&stranger)).await;
    let err = server_side.unwrap_err();
    assert!(err.contains("not in trust domain cluster.local"), "{err}");
    assert!(client_side.is_err());

    // Outbound: even when the mesh asks for exactly that id, another trust domain is refused.
    let mut client_cert = ours.svid("sleep");
    client_cert.roots = bundle;
    let server = hostile_server(&stranger);
    let client = client_config(&client_cert, std::slice::from_ref(&stranger_id)).unwrap();
    let (_, client_side) = handshake(server, client).await;
    let err = client_side.unwrap_err();
    assert!(err.contains("not in trust domain cluster.local"), "{err}");
}

// HARDENING T4
#[tokio::test]
async fn certificates_carrying_malformed_spiffe_ids_are_refused_both_ways() {
    let forge = Forge::root("mesh root");
    let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(2100));
    for uri in [
        "spiffe://cluster.local/ns/a/sa/b/c",
        "spiffe:///ns//sa/",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe://cluster.local/ns/a/sa/b#f",
        "spiffe://cluster.local:443/ns/a/sa/b",
        "spiffe://u@cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a%2Fb/sa/c",
        "spiffe://cluster.local/ns/../sa/b",
        long.as_str(),
    ] {
        let bad = forge.leaf(&forged(), |p| p.subject_alt_names = vec![uri_san(uri)]);
        refused_both_ways(&forge, &bad, "not a SPIFFE id").await;
    }
}

// HARDENING T5
#[tokio::test]
async fn ca_shaped_leaves_and_wrong_key_usage_are_refused_both_ways() {
    let forge = Forge::root("mesh root");
    let ca_leaf = forge.leaf(&forged(), |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    });
    // webpki stops this one itself.
    refused_both_ways(&forge, &ca_leaf, "CaUsedAsEndEntity").await;

    let cases: Vec<(Vec<KeyUsagePurpose>, &str)> = vec![
        (
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ],
            "keyCertSign, which only a CA may have",
        ),
        (
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
            "cRLSign, which only a CA may have",
        ),
        (
            vec![KeyUsagePurpose::KeyEncipherment],
            "lacks digitalSignature",
        ),
        (vec![], "no KeyUsage extension"),
    ];
    for (usages, reason) in cases {
        let bad = forge.leaf(&forged(), |p| p.key_usages = usages);
        refused_both_ways(&forge, &bad, reason).await;
    }

    // BasicConstraints whose content is not a SEQUENCE: webpki's DER check or ours refuses it.
    let malformed = forge.leaf(&forged(), |p| {
        p.is_ca = IsCa::NoCa;
        p.custom_extensions = vec![raw_extension(&[2, 5, 29, 19], vec![0x04, 0x00], true)];
    });
    refused_both_ways(&forge, &malformed, "invalid peer certificate").await;
    assert_eq!(
        check_leaf(&malformed.chain[0], &[Purpose::ClientAuth]),
        Err(SvidError::MalformedExtension {
            extension: "BasicConstraints"
        })
    );
}

// HARDENING T6
#[tokio::test]
async fn the_wrong_or_a_missing_extended_key_usage_is_refused() {
    let forge = Forge::root("mesh root");
    let server_only = forge.leaf(&forged(), |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let client_only = forge.leaf(&forged(), |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });

    // Inbound needs clientAuth.
    let server = server_config(&forge.svid("httpbin")).unwrap();
    let (server_side, _) = handshake(server, hostile_client(&server_only)).await;
    let err = server_side.unwrap_err();
    assert!(
        err.contains("InvalidPurpose") || err.contains("clientAuth"),
        "{err}"
    );

    // Outbound needs serverAuth.
    let server = hostile_server(&client_only);
    let client = client_config(&forge.svid("sleep"), &[forged()]).unwrap();
    let (_, client_side) = handshake(server, client).await;
    let err = client_side.unwrap_err();
    assert!(
        err.contains("InvalidPurpose") || err.contains("serverAuth"),
        "{err}"
    );

    // Pinned: no EKU at all is refused on both sides (webpki alone would accept it).
    let no_eku = forge.leaf(&forged(), |p| p.extended_key_usages.clear());
    refused_both_ways(&forge, &no_eku, "no ExtendedKeyUsage").await;
}

// HARDENING T7
#[tokio::test]
async fn an_intermediate_with_uri_name_constraints_fails_cleanly() {
    let root = Forge::root("mesh root");
    // permittedSubtrees: [ uniformResourceIdentifier "cluster.local" ], critical.
    let constraints = der(
        0x30,
        &der(0xa0, &der(0x30, &der(0x86, TRUST_DOMAIN.as_bytes()))),
    );
    let constrained = root.intermediate("constrained intermediate", |p| {
        p.custom_extensions = vec![raw_extension(&[2, 5, 29, 30], constraints, true)];
    });
    let bad = constrained.svid("forged");
    assert_eq!(bad.chain.len(), 2, "leaf and the constrained intermediate");
    refused_both_ways(&root, &bad, "invalid peer certificate").await;
}

/// A verifier of our trust domain over `roots`, called directly.
fn verifier_over(roots: Vec<rustls::pki_types::CertificateDer<'static>>) -> SpiffeVerifier {
    let own = WorkloadCertificate {
        roots,
        ..Forge::root("unused").svid("httpbin")
    };
    SpiffeVerifier::same_trust_domain(&own, provider(KeyExchange::default()).unwrap()).unwrap()
}

// HARDENING T8
#[tokio::test]
async fn deep_chains_issuer_floods_and_huge_certificates_fail_fast() {
    // Seven intermediates: one more than webpki follows.
    let root = Forge::root("mesh root");
    let mut ca = root.intermediate("sub-ca 1", |_| {});
    for depth in 2..=7 {
        ca = ca.intermediate(&format!("sub-ca {depth}"), |_| {});
    }
    let deep = ca.svid("forged");
    assert_eq!(deep.chain.len(), 8);
    let started = Instant::now();
    let err = verifier_over(vec![root.root_der()])
        .verify_client_cert(&deep.chain[0], &deep.chain[1..], UnixTime::now())
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("MaximumPathDepthExceeded"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // 150 intermediates all named like the leaf's issuer, none of them its signer.
    let decoys: Vec<_> = (0..150)
        .map(|_| root.intermediate("issuer", |_| {}).der())
        .collect();
    let real = root.intermediate("issuer", |_| {});
    let leaf = real.svid("forged");
    let started = Instant::now();
    let err = verifier_over(vec![root.root_der()])
        .verify_client_cert(&leaf.chain[0], &decoys, UnixTime::now())
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("MaximumSignatureChecksExceeded"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // A 100 KiB leaf (one big non-critical extension): over rustls' 64 KiB handshake message cap.
    let forge = Forge::root("mesh root");
    let huge = forge.leaf(&forged(), |p| {
        p.custom_extensions = vec![raw_extension(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            der(0x04, &vec![0x41; 100 * 1024]),
            false,
        )];
    });
    assert!(huge.chain[0].len() > 100 * 1024);
    let started = Instant::now();
    refused_both_ways(&forge, &huge, "").await;
    assert!(started.elapsed() < Duration::from_secs(3));

    // The server verifier's path through ServerCertVerifier refuses the deep chain as well.
    let own = root.svid("sleep");
    let client_side =
        SpiffeVerifier::one_of(&own, &[forged()], provider(KeyExchange::default()).unwrap())
            .unwrap();
    assert!(
        client_side
            .verify_server_cert(
                &deep.chain[0],
                &deep.chain[1..],
                &dummy_server_name(),
                &[],
                UnixTime::now()
            )
            .is_err()
    );
}

#[test]
fn a_correct_svid_passes_and_names_its_identity() {
    let forge = Forge::root("mesh root");
    let good = forge.svid("sleep");
    assert_eq!(
        check_leaf(&good.chain[0], &[Purpose::ClientAuth, Purpose::ServerAuth]),
        Ok(id("sleep"))
    );
}
