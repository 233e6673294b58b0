//! `tls.keyExchange`: the group both ends agree on in every combination, against ztund peers
//! with each setting and against peers that lack the hybrid group or do not prefer it.

use rustls::NamedGroup;

use super::tests::{Mesh, Seen, handshake};
use super::*;

async fn between(
    client_setting: KeyExchange,
    server_setting: KeyExchange,
) -> (Result<Seen, String>, Result<Seen, String>) {
    let mesh = Mesh::new("cluster.local");
    let (sleep, httpbin) = (mesh.cert("sleep"), mesh.cert("httpbin"));
    let server = server_config_with(&httpbin, server_setting).unwrap();
    let client =
        client_config_with(&sleep, std::slice::from_ref(&httpbin.id), client_setting).unwrap();
    handshake(server, client).await
}

#[cfg(feature = "aws-lc")]
#[tokio::test]
async fn both_ends_agree_the_expected_group_in_every_combination() {
    use KeyExchange::{Classic, PqcOnly, PqcPreferred};
    let hybrid = Some(NamedGroup::X25519MLKEM768);
    let classic = Some(NamedGroup::X25519);
    let cases = [
        (PqcPreferred, PqcPreferred, hybrid),
        (PqcPreferred, PqcOnly, hybrid),
        (PqcOnly, PqcPreferred, hybrid),
        (PqcOnly, PqcOnly, hybrid),
        (PqcPreferred, Classic, classic),
        (Classic, PqcPreferred, classic),
        (Classic, Classic, classic),
    ];
    for (client, server, group) in cases {
        let (server_side, client_side) = between(client, server).await;
        let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
        assert_eq!(client_side.group, group, "client {client}, server {server}");
        assert_eq!(server_side.group, group, "client {client}, server {server}");
        // The hybrid share and an X25519 share go in the first flight: no extra round trip.
        assert!(!client_side.hello_retry, "client {client}, server {server}");
    }
}

#[cfg(feature = "aws-lc")]
#[tokio::test]
async fn pqc_only_and_classic_fail_cleanly_both_ways() {
    for (client, server) in [
        (KeyExchange::PqcOnly, KeyExchange::Classic),
        (KeyExchange::Classic, KeyExchange::PqcOnly),
    ] {
        let (server_side, client_side) = between(client, server).await;
        let err = server_side.expect_err("no group in common");
        assert!(
            err.contains("NoKxGroupsInCommon"),
            "client {client}, server {server}: {err}"
        );
        assert!(client_side.is_err());
    }
}

/// A peer that is not ztund: the backend's stock groups in `groups`' order.
#[cfg(feature = "aws-lc")]
fn foreign_client(
    mesh: &Mesh,
    server: &WorkloadCertificate,
    groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> Arc<ClientConfig> {
    let sleep = mesh.cert("sleep");
    let stock = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: groups,
        ..backend()
    });
    let verifier =
        SpiffeVerifier::one_of(&sleep, std::slice::from_ref(&server.id), &stock).unwrap();
    let mut config = ClientConfig::builder_with_provider(stock)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(sleep.chain.clone(), sleep.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[cfg(feature = "aws-lc")]
#[tokio::test]
async fn a_classic_only_peer_and_one_that_does_not_prefer_the_hybrid_get_x25519() {
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    let mesh = Mesh::new("cluster.local");
    let httpbin = mesh.cert("httpbin");
    let server = server_config(&httpbin).unwrap();

    // No ML-KEM at all (an older ztunnel or Envoy).
    let classic_only = foreign_client(&mesh, &httpbin, vec![X25519, SECP256R1, SECP384R1]);
    let (server_side, client_side) = handshake(server.clone(), classic_only).await;
    let server_side = server_side.unwrap();
    assert_eq!(server_side.group, Some(NamedGroup::X25519));
    assert!(!client_side.unwrap().hello_retry);

    // The hybrid group offered last, with an X25519 share only (ztunnel without
    // COMPLIANCE_POLICY=pqc): the share it sent wins over a retry.
    let late_hybrid = foreign_client(&mesh, &httpbin, vec![X25519, SECP256R1, X25519MLKEM768]);
    let (server_side, client_side) = handshake(server, late_hybrid).await;
    assert_eq!(server_side.unwrap().group, Some(NamedGroup::X25519));
    assert!(!client_side.unwrap().hello_retry);
}

#[test]
fn the_settings_parse_print_and_list_their_groups() {
    for (text, setting) in [
        ("pqc-preferred", KeyExchange::PqcPreferred),
        ("pqc-only", KeyExchange::PqcOnly),
        ("classic", KeyExchange::Classic),
    ] {
        let parsed: KeyExchange = serde_json::from_value(serde_json::json!(text)).unwrap();
        assert_eq!(parsed, setting);
        assert_eq!(setting.to_string(), text);
    }
    assert_eq!(KeyExchange::default(), KeyExchange::PqcPreferred);
    assert!(serde_json::from_value::<KeyExchange>(serde_json::json!("pqc")).is_err());
    #[cfg(feature = "aws-lc")]
    {
        assert_eq!(
            KeyExchange::PqcPreferred.group_names().unwrap(),
            ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]
        );
        assert_eq!(
            KeyExchange::PqcOnly.group_names().unwrap(),
            ["X25519MLKEM768"]
        );
    }
    assert!(
        !KeyExchange::Classic
            .group_names()
            .unwrap()
            .iter()
            .any(|g| g.contains("MLKEM"))
    );
    #[cfg(not(feature = "aws-lc"))]
    assert!(KeyExchange::PqcOnly.group_names().is_err());
}
