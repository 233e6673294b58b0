//! Outbound TLS: which DestinationRule applies (exact, wildcard, namespace order) and what it says
//! for a port (portLevelSettings over trafficPolicy).

use super::policies;
use crate::policy::{OutboundTls, TlsOrigination, destination_rule_for, outbound_tls};

fn dr(ns: &str, name: &str, host: &str, traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: '{host}'\n  trafficPolicy: {traffic_policy}\n---\n"
    )
}

const DISABLE: &str = "{tls: {mode: DISABLE}}";
const MESH: &str = "{tls: {mode: ISTIO_MUTUAL}}";
const REVIEWS: &str = "reviews.prod.svc.cluster.local";

/// (what, documents, client namespace, port, expected rule `ns/name` or none, expected TLS)
type Case = (
    &'static str,
    String,
    &'static str,
    u16,
    Option<&'static str>,
    OutboundTls,
);

#[test]
fn lookup_table() {
    let cases: Vec<Case> = vec![
        (
            "no rule: HBONE",
            String::new(),
            "default",
            9080,
            None,
            OutboundTls::Hbone,
        ),
        (
            "exact host, DISABLE",
            dr("prod", "r", REVIEWS, DISABLE),
            "default",
            9080,
            Some("prod/r"),
            OutboundTls::Plain,
        ),
        (
            "ISTIO_MUTUAL is HBONE",
            dr("prod", "r", REVIEWS, MESH),
            "prod",
            9080,
            Some("prod/r"),
            OutboundTls::Hbone,
        ),
        (
            "other hosts untouched",
            dr("prod", "r", "ratings.prod.svc.cluster.local", DISABLE),
            "prod",
            9080,
            None,
            OutboundTls::Hbone,
        ),
        (
            "a wildcard matches",
            dr("prod", "w", "*.prod.svc.cluster.local", DISABLE),
            "prod",
            9080,
            Some("prod/w"),
            OutboundTls::Plain,
        ),
        (
            "* matches every host",
            dr("prod", "w", "*", DISABLE),
            "prod",
            9080,
            Some("prod/w"),
            OutboundTls::Plain,
        ),
        (
            "exact beats wildcard",
            dr("prod", "w", "*.prod.svc.cluster.local", DISABLE) + &dr("prod", "e", REVIEWS, MESH),
            "prod",
            9080,
            Some("prod/e"),
            OutboundTls::Hbone,
        ),
        (
            "the longest wildcard wins",
            dr("prod", "short", "*.cluster.local", DISABLE)
                + &dr("prod", "long", "*.svc.cluster.local", MESH),
            "prod",
            9080,
            Some("prod/long"),
            OutboundTls::Hbone,
        ),
        (
            "the client's namespace comes first",
            dr("prod", "svc", REVIEWS, MESH)
                + &dr("default", "client", REVIEWS, DISABLE)
                + &dr("istio-system", "root", REVIEWS, MESH),
            "default",
            9080,
            Some("default/client"),
            OutboundTls::Plain,
        ),
        (
            "a wildcard in the client's namespace beats an exact host in the service's",
            dr("prod", "svc", REVIEWS, MESH) + &dr("default", "client", "*.cluster.local", DISABLE),
            "default",
            9080,
            Some("default/client"),
            OutboundTls::Plain,
        ),
        (
            "then the service's namespace",
            dr("prod", "svc", REVIEWS, DISABLE) + &dr("istio-system", "root", REVIEWS, MESH),
            "default",
            9080,
            Some("prod/svc"),
            OutboundTls::Plain,
        ),
        (
            "then the root namespace",
            dr("istio-system", "root", "*.svc.cluster.local", DISABLE)
                + &dr("elsewhere", "x", REVIEWS, MESH),
            "default",
            9080,
            Some("istio-system/root"),
            OutboundTls::Plain,
        ),
        (
            "a short host name means the rule's namespace",
            dr("prod", "short", "reviews", DISABLE) + &dr("default", "short", "reviews", MESH),
            "default",
            9080,
            Some("prod/short"),
            OutboundTls::Plain,
        ),
        (
            "portLevelSettings override trafficPolicy for their port",
            dr(
                "prod",
                "p",
                REVIEWS,
                "{tls: {mode: ISTIO_MUTUAL}, portLevelSettings: [{port: {number: 9080}, tls: {mode: DISABLE}}]}",
            ),
            "prod",
            9080,
            Some("prod/p"),
            OutboundTls::Plain,
        ),
        (
            "other ports keep trafficPolicy",
            dr(
                "prod",
                "p",
                REVIEWS,
                "{tls: {mode: DISABLE}, portLevelSettings: [{port: {number: 9080}, tls: {mode: ISTIO_MUTUAL}}]}",
            ),
            "prod",
            9443,
            Some("prod/p"),
            OutboundTls::Plain,
        ),
        (
            "a port-level entry without tls keeps trafficPolicy",
            dr(
                "prod",
                "p",
                REVIEWS,
                "{tls: {mode: DISABLE}, portLevelSettings: [{port: {number: 9080}, connectionPool: {}}]}",
            ),
            "prod",
            9080,
            Some("prod/p"),
            OutboundTls::Plain,
        ),
        (
            "a rule without tls leaves HBONE",
            dr(
                "prod",
                "p",
                REVIEWS,
                "{connectionPool: {tcp: {maxConnections: 10}}}",
            ),
            "prod",
            9080,
            Some("prod/p"),
            OutboundTls::Hbone,
        ),
        (
            "SIMPLE originates TLS",
            dr(
                "prod",
                "s",
                REVIEWS,
                "{tls: {mode: SIMPLE, caCertificates: /etc/ca.pem, sni: reviews.example, subjectAltNames: [reviews.example]}}",
            ),
            "prod",
            9080,
            Some("prod/s"),
            OutboundTls::Originate(TlsOrigination {
                ca_certificates: Some("/etc/ca.pem".into()),
                sni: Some("reviews.example".into()),
                subject_alt_names: vec!["reviews.example".into()],
                ..TlsOrigination::default()
            }),
        ),
        (
            "MUTUAL originates TLS with a client certificate",
            dr(
                "prod",
                "m",
                REVIEWS,
                "{tls: {mode: MUTUAL, clientCertificate: /etc/c.pem, privateKey: /etc/k.pem, insecureSkipVerify: true}}",
            ),
            "prod",
            9080,
            Some("prod/m"),
            OutboundTls::Originate(TlsOrigination {
                client_certificate: Some("/etc/c.pem".into()),
                private_key: Some("/etc/k.pem".into()),
                insecure_skip_verify: true,
                mutual: true,
                ..TlsOrigination::default()
            }),
        ),
    ];
    for (name, yaml, client, port, rule, tls) in cases {
        let set = policies(&yaml);
        let found = destination_rule_for(&set, client, REVIEWS, "prod").map(|r| r.key());
        assert_eq!(found.as_deref(), rule, "{name}");
        assert_eq!(
            outbound_tls(&set, client, REVIEWS, "prod", port),
            tls,
            "{name}"
        );
    }
}

#[test]
fn the_guide_destination_rule_applies_to_its_host() {
    let set = policies(&dr(
        "default",
        "example-destination",
        "example-service.default.svc.cluster.local",
        MESH,
    ));
    let host = "example-service.default.svc.cluster.local";
    assert_eq!(
        outbound_tls(&set, "other", host, "default", 80),
        OutboundTls::Hbone
    );
    let rule = destination_rule_for(&set, "other", host, "default").expect("rule found");
    assert_eq!(rule.key(), "default/example-destination");
}

#[test]
fn of_two_rules_for_one_host_the_oldest_wins() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a-new, namespace: prod, creationTimestamp: '2024-02-01T00:00:00Z'}
spec: {host: reviews.prod.svc.cluster.local, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: b-old, namespace: prod, creationTimestamp: '2024-01-01T00:00:00Z'}
spec: {host: reviews.prod.svc.cluster.local, trafficPolicy: {tls: {mode: DISABLE}}}
";
    let set = policies(yaml);
    assert_eq!(
        outbound_tls(&set, "prod", REVIEWS, "prod", 1),
        OutboundTls::Plain
    );
    assert_eq!(set.destination_rules().len(), 1);
}
