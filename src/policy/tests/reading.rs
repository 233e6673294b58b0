//! Reading documents: the guide's documents verbatim, the shapes istiod would send, and errors
//! that name the document and the field.

use super::{ROOT, documents, load_error, policies};
use crate::policy::{
    Action, Authorization, Cidr, Clause, Match, PolicyError, PolicySet, Rule, Scope,
    ServiceAccountMatch, StringMatch,
};

const GUIDE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: example-destination, namespace: default}
spec:
  host: example-service.default.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: global-mtls, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

fn keys(set: &PolicySet) -> Vec<String> {
    set.authorizations().map(|a| a.key()).collect()
}

#[test]
fn the_guide_documents_parse_verbatim() {
    let set = policies(GUIDE);
    assert_eq!(keys(&set), ["istio-system/istio_converted_static_strict"]);
    assert_eq!(set.peer_authentications().count(), 2);
    assert_eq!(set.destination_rules().len(), 1);
    let permissive = GUIDE.replacen("STRICT", "PERMISSIVE", 1);
    assert_eq!(policies(&permissive).peer_authentications().count(), 2);
}

#[test]
fn other_kinds_are_ignored() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nonsense: [1]}\n---\n"
        .to_string()
        + GUIDE;
    assert_eq!(policies(&yaml).peer_authentications().count(), 2);
}

#[test]
fn the_static_strict_policy_has_istiods_shape() {
    let set = policies(GUIDE);
    let strict = set.authorizations().next().expect("one policy");
    let expected = Authorization {
        name: "istio_converted_static_strict".into(),
        namespace: ROOT.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch::Presence],
                    ..Match::default()
                }],
            }],
        }],
        dry_run: false,
        not_enforced: Vec::new(),
    };
    assert_eq!(**strict, expected);
}

// HARDENING C10 (several STRICT port rules under PERMISSIVE stay STRICT, each on its port)
#[test]
fn port_level_mtls_converts_as_istiod_does() {
    let strict_with_exemptions = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: PERMISSIVE}, 8081: {mode: DISABLE}, 9000: {mode: STRICT}}
";
    let set = policies(strict_with_exemptions);
    let converted = set
        .authorizations()
        .find(|a| a.key() == "default/converted_peer_authentication_web")
        .expect("converted policy");
    let not_port = |p| Clause {
        matches: vec![Match {
            not_destination_ports: vec![p],
            ..Match::default()
        }],
    };
    let no_principal = Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    };
    assert_eq!(converted.action, Action::Deny);
    assert_eq!(converted.scope, Scope::WorkloadSelector);
    assert_eq!(
        converted.rules,
        vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![no_principal.clone()]
                },
                not_port(8080),
                not_port(8081)
            ]
        }]
    );

    let permissive_with_strict_ports = strict_with_exemptions
        .replace("mtls: {mode: STRICT}", "mtls: {mode: PERMISSIVE}")
        .replace("8081: {mode: DISABLE}", "8443: {mode: STRICT}");
    let set = policies(&permissive_with_strict_ports);
    let converted = set
        .authorizations()
        .find(|a| a.key() == "default/converted_peer_authentication_web")
        .expect("converted policy");
    let strict_port = |p| Rule {
        clauses: vec![Clause {
            matches: vec![Match {
                destination_ports: vec![p],
                ..no_principal.clone()
            }],
        }],
    };
    assert_eq!(converted.rules, vec![strict_port(8443), strict_port(9000)]);

    let all_strict = strict_with_exemptions
        .replace("PERMISSIVE", "STRICT")
        .replace("DISABLE", "STRICT");
    assert_eq!(
        keys(&policies(&all_strict)),
        ["istio-system/istio_converted_static_strict"]
    );
}

#[test]
fn authorization_policies_convert_per_rule_and_clause() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: full, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {principals: ['*'], notNamespaces: ['kube-*'], ipBlocks: [10.0.0.0/8], serviceAccounts: [sleep, ops/admin]}
    to:
    - operation: {ports: ['80', 443], notPorts: ['8080']}
    when:
    - {key: source.ip, notValues: ['192.168.0.1']}
";
    let set = policies(yaml);
    let policy = set.authorizations().next().expect("policy");
    assert_eq!(policy.scope, Scope::WorkloadSelector);
    let expected = vec![
        Clause {
            matches: vec![Match {
                destination_ports: vec![80, 443],
                not_destination_ports: vec![8080],
                ..Match::default()
            }],
        },
        Clause {
            matches: vec![Match {
                principals: vec![StringMatch::Presence],
                not_namespaces: vec![StringMatch::Prefix("kube-".into())],
                source_ips: vec!["10.0.0.0/8".parse::<Cidr>().unwrap()],
                service_accounts: vec![
                    ServiceAccountMatch {
                        namespace: "default".into(),
                        service_account: "sleep".into(),
                    },
                    ServiceAccountMatch {
                        namespace: "ops".into(),
                        service_account: "admin".into(),
                    },
                ],
                ..Match::default()
            }],
        },
        Clause {
            matches: vec![Match {
                not_source_ips: vec!["192.168.0.1/32".parse::<Cidr>().unwrap()],
                ..Match::default()
            }],
        },
    ];
    assert_eq!(policy.rules, vec![Rule { clauses: expected }]);
    let scopes = |yaml: &str| policies(yaml).authorizations().next().map(|a| a.scope);
    let namespace_wide = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: default}\nspec: {}\n";
    assert_eq!(scopes(namespace_wide), Some(Scope::Namespace));
    assert_eq!(
        scopes(&namespace_wide.replace("default", ROOT)),
        Some(Scope::Global)
    );
}

#[test]
fn unknown_fields_are_errors_naming_the_field() {
    // HARDENING Y3: a field read as absent could weaken the policy; each is refused by path.
    let base = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: default, labels: {team: x}}
spec:
  rules: [{from: [{source: {namespaces: [x]}}]}]
";
    assert_eq!(policies(base).authorizations().count(), 1);
    for (from, to, field) in [
        ("spec:\n", "spec:\n  surprise: true\n", "spec.surprise"),
        (
            "namespaces: [x]",
            "namespaces: [x], invented: [y]",
            "spec.rules[0].from[0].source.invented",
        ),
        ("[x]}}]}", "[x]}}], later: 1}", "spec.rules[0].later"),
    ] {
        let error = load_error(&base.replace(from, to)).to_string();
        assert!(
            error.contains("mesh.yaml document 1 (AuthorizationPolicy default/a)")
                && error.contains(&format!("field `{field}`: unknown field")),
            "{error}"
        );
    }
}

#[test]
fn http_attributes_are_warned_about() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: default}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
";
    let logs = captured_warnings(|| {
        assert!(policies(yaml).authorizations().all(|a| a.rules.is_empty()));
    });
    assert!(
        logs.contains("spec.rules[0].to[0].operation.methods"),
        "{logs}"
    );
    assert!(logs.contains("dropped from this ALLOW policy"), "{logs}");
}

/// Runs `f` and returns what it logged at WARN and above.
fn captured_warnings(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};

    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().expect("log sink").clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// (what, document, field the error must name, text the reason must hold)
fn error_cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: default}}\nspec: {spec}\n"
        )
    };
    let pa = |spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: bad, namespace: default}}\nspec: {spec}\n"
        )
    };
    let dr = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bad, namespace: default}}\nspec: {spec}\n"
        )
    };
    vec![
        (
            "unknown mTLS mode",
            pa("{mtls: {mode: STRICTER}}"),
            "spec.mtls.mode",
            "STRICTER",
        ),
        (
            "a mode that is not a string",
            pa("{mtls: {mode: [STRICT]}}"),
            "spec.mtls.mode",
            "must be a string",
        ),
        (
            "portLevelMtls without selector",
            pa("{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"),
            "spec.portLevelMtls",
            "selector",
        ),
        (
            "a port that is not one",
            pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: DISABLE}}}"),
            "spec.portLevelMtls.http",
            "not a port",
        ),
        (
            "port 0",
            pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}"),
            "spec.portLevelMtls.0",
            "not a port",
        ),
        (
            "a label value that is a number",
            pa("{selector: {matchLabels: {version: 1}}}"),
            "spec.selector.matchLabels.version",
            "quote",
        ),
        (
            "AUDIT",
            ap("{action: AUDIT}"),
            "spec.action",
            "not supported at L4",
        ),
        (
            "CUSTOM",
            ap("{action: CUSTOM, provider: {name: ext}}"),
            "spec.action",
            "not supported at L4",
        ),
        (
            "an unknown action",
            ap("{action: MAYBE}"),
            "spec.action",
            "MAYBE",
        ),
        (
            "a bad ipBlock names its index",
            ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.300]}}]}]}"),
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "10.0.0.300",
        ),
        (
            "a prefix too long",
            ap("{rules: [{from: [{source: {notIpBlocks: [10.0.0.0/33]}}]}]}"),
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "CIDR",
        ),
        (
            "a bad port",
            ap("{rules: [{to: [{operation: {ports: ['70000']}}]}]}"),
            "spec.rules[0].to[0].operation.ports[0]",
            "70000",
        ),
        (
            "an empty source",
            ap("{rules: [{from: [{source: {}}]}]}"),
            "spec.rules[0].from[0].source",
            "empty source",
        ),
        (
            "a from entry without source",
            ap("{rules: [{from: [{}]}]}"),
            "spec.rules[0].from[0].source",
            "missing",
        ),
        (
            "a condition without values",
            ap("{rules: [{when: [{key: source.ip}]}]}"),
            "spec.rules[0].when[0]",
            "values",
        ),
        (
            "a condition with a bad address",
            ap("{rules: [{when: [{key: destination.ip, values: [nope]}]}]}"),
            "spec.rules[0].when[0].values[0]",
            "nope",
        ),
        (
            "a bad service account",
            ap("{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}"),
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "a/b/c",
        ),
        (
            "rules that are not a list",
            ap("{rules: {from: []}}"),
            "spec.rules",
            "must be a list",
        ),
        (
            "MUTUAL without a client certificate",
            dr("{host: a.b.c, trafficPolicy: {tls: {mode: MUTUAL, privateKey: /k}}}"),
            "spec.trafficPolicy.tls.clientCertificate",
            "MUTUAL",
        ),
        (
            "MUTUAL without a key",
            dr(
                "{host: a.b.c, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: MUTUAL, clientCertificate: /c}}]}}",
            ),
            "spec.trafficPolicy.portLevelSettings[0].tls.privateKey",
            "MUTUAL",
        ),
        (
            "an unknown TLS mode",
            dr("{host: a.b.c, trafficPolicy: {tls: {mode: OPTIONAL}}}"),
            "spec.trafficPolicy.tls.mode",
            "OPTIONAL",
        ),
        (
            "a rule without host",
            dr("{trafficPolicy: {tls: {mode: DISABLE}}}"),
            "spec.host",
            "host",
        ),
        (
            "a port-level entry without port",
            dr("{host: a.b.c, trafficPolicy: {portLevelSettings: [{tls: {mode: DISABLE}}]}}"),
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "port",
        ),
        (
            "a version Istio never had",
            pa("{}").replace("security.istio.io/v1", "security.istio.io/v2"),
            "apiVersion",
            "v2",
        ),
        (
            "a bad creation time",
            pa("{}").replace(
                "namespace: default}",
                "namespace: default, creationTimestamp: yesterday}",
            ),
            "metadata.creationTimestamp",
            "RFC 3339",
        ),
        (
            "the same policy twice",
            pa("{}") + "---\n" + &pa("{}"),
            "metadata.name",
            "second",
        ),
    ]
}

#[test]
fn errors_name_the_document_and_the_field() {
    for (what, yaml, field, text) in error_cases() {
        let error = load_error(&yaml);
        let PolicyError::Invalid {
            doc,
            field: got,
            reason,
        } = &error;
        assert_eq!(got, field, "{what}: {error}");
        assert!(
            reason.contains(text),
            "{what}: reason {reason:?} lacks {text:?}"
        );
        assert!(doc.name == "bad" || field == "metadata.name", "{what}");
        let shown = error.to_string();
        assert!(
            shown.contains("mesh.yaml document") && shown.contains(field),
            "{what}: {shown}"
        );
    }
}

#[test]
fn a_refused_set_is_all_or_nothing() {
    let yaml = GUIDE.to_string()
        + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: default}\nspec: {action: AUDIT}\n";
    let error = crate::mesh::k8s::security::policy_set(&documents(&yaml), ROOT).unwrap_err();
    let PolicyError::Invalid { doc, .. } = error;
    assert_eq!(doc.index, 4);
}
