//! The held state and the snapshots built from it: istiod-shaped policies (PROTOCOL.md §4.1)
//! decided by the policy engine, partial applies of bad responses, removals, the last good
//! version kept, and the merge with a mesh file.

use std::net::IpAddr;

use super::*;
use crate::identity::SpiffeId;
use crate::policy::{ConnectionFacts, Decision, authorize};
use crate::proto::istio::security as pb_sec;
use crate::xds::convert::tests::*;

pub(super) fn state_with(type_url: &str, added: Vec<RawResource>) -> XdsState {
    let mut state = XdsState::new();
    let rejected = state.apply(type_url, added, vec![]);
    assert!(rejected.is_empty(), "{rejected:?}");
    state
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A connection to `port` of the workload at `to`; `from` is `Some((ns, sa))` for HBONE.
fn decide(snapshot: &Snapshot, to: &str, port: u16, from: Option<(&str, &str)>) -> Decision {
    let workload = snapshot.workload_by_ip(ip(to)).expect("destination known");
    let conn = ConnectionFacts {
        source_ip: ip("10.0.9.9"),
        source_identity: from.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa).unwrap()),
        destination_ip: ip(to),
        destination_port: port,
    };
    authorize(&snapshot.policies, workload, &conn)
}

fn denied(decision: Decision) -> bool {
    matches!(decision, Decision::Deny(_))
}

const HBONE: Option<(&str, &str)> = Some(("default", "sleep"));

fn referencing(ns: &str, name: &str, ip: [u8; 4], policies: &[&str]) -> RawResource {
    let mut w = pb_workload(ns, name, ip);
    w.authorization_policies = policies.iter().map(|p| p.to_string()).collect();
    workload_resource(w, "1")
}

#[test]
fn the_static_strict_policy_denies_plaintext_to_the_workloads_that_reference_it() {
    let mut state = state_with(
        type_url::ADDRESS,
        vec![
            referencing(
                "default",
                "strict",
                [10, 0, 0, 1],
                &["istio-system/istio_converted_static_strict"],
            ),
            referencing("default", "open", [10, 0, 0, 2], &[]),
        ],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(static_strict(), "1")],
        vec![],
    );
    let snapshot = state.snapshot(None, ROOT);
    assert_eq!(
        decide(&snapshot, "10.0.0.1", 8080, None),
        Decision::Deny("explicitly denied by: istio-system/istio_converted_static_strict".into())
    );
    assert_eq!(decide(&snapshot, "10.0.0.1", 8080, HBONE), Decision::Allow);
    assert_eq!(decide(&snapshot, "10.0.0.2", 8080, None), Decision::Allow);
}

#[test]
fn a_converted_strict_peer_authentication_exempts_its_permissive_ports() {
    // Effective STRICT, port 8081 PERMISSIVE: one rule, clauses ANDed.
    let policy = pb_authorization(
        "default",
        "converted_peer_authentication_pa",
        pb_sec::Scope::WorkloadSelector,
        pb_sec::Action::Deny,
        one_rule(vec![
            vec![pb_sec::Match {
                not_principals: vec![presence()],
                ..Default::default()
            }],
            vec![pb_sec::Match {
                not_destination_ports: vec![8081],
                ..Default::default()
            }],
        ]),
    );
    let mut state = state_with(
        type_url::ADDRESS,
        vec![referencing(
            "default",
            "w",
            [10, 0, 0, 1],
            &["default/converted_peer_authentication_pa"],
        )],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(policy, "1")],
        vec![],
    );
    let snapshot = state.snapshot(None, ROOT);
    assert!(denied(decide(&snapshot, "10.0.0.1", 8080, None)));
    assert_eq!(decide(&snapshot, "10.0.0.1", 8081, None), Decision::Allow);
    assert_eq!(decide(&snapshot, "10.0.0.1", 8080, HBONE), Decision::Allow);
}

#[test]
fn a_converted_permissive_peer_authentication_guards_its_strict_ports() {
    // Effective PERMISSIVE, ports 9090 and 9091 STRICT: one rule per strict port.
    let rule = |port| pb_sec::Rule {
        clauses: vec![pb_sec::Clause {
            matches: vec![pb_sec::Match {
                not_principals: vec![presence()],
                destination_ports: vec![port],
                ..Default::default()
            }],
        }],
    };
    let policy = pb_authorization(
        "default",
        "converted_peer_authentication_pa",
        pb_sec::Scope::WorkloadSelector,
        pb_sec::Action::Deny,
        vec![rule(9090), rule(9091)],
    );
    let mut state = state_with(
        type_url::ADDRESS,
        vec![referencing(
            "default",
            "w",
            [10, 0, 0, 1],
            &["default/converted_peer_authentication_pa"],
        )],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(policy, "1")],
        vec![],
    );
    let snapshot = state.snapshot(None, ROOT);
    assert!(denied(decide(&snapshot, "10.0.0.1", 9090, None)));
    assert!(denied(decide(&snapshot, "10.0.0.1", 9091, None)));
    assert_eq!(decide(&snapshot, "10.0.0.1", 8080, None), Decision::Allow);
    assert_eq!(decide(&snapshot, "10.0.0.1", 9090, HBONE), Decision::Allow);
}

#[test]
fn namespace_allow_and_global_deny_apply_without_being_referenced() {
    let allow = pb_authorization(
        "prod",
        "only-client",
        pb_sec::Scope::Namespace,
        pb_sec::Action::Allow,
        one_rule(vec![vec![pb_sec::Match {
            principals: vec![pb_sec::StringMatch {
                match_type: Some(pb_sec::string_match::MatchType::Exact(
                    "cluster.local/ns/prod/sa/client".into(),
                )),
            }],
            ..Default::default()
        }]]),
    );
    // GLOBAL: its namespace field does not limit it.
    let deny = pb_authorization(
        ROOT,
        "no-quarantine",
        pb_sec::Scope::Global,
        pb_sec::Action::Deny,
        one_rule(vec![vec![pb_sec::Match {
            namespaces: vec![pb_sec::StringMatch {
                match_type: Some(pb_sec::string_match::MatchType::Exact("quarantine".into())),
            }],
            ..Default::default()
        }]]),
    );
    let mut state = state_with(
        type_url::ADDRESS,
        vec![
            referencing("prod", "db", [10, 0, 0, 1], &[]),
            referencing("dev", "db", [10, 0, 0, 2], &[]),
        ],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![
            authorization_resource(allow, "1"),
            authorization_resource(deny, "1"),
        ],
        vec![],
    );
    let snapshot = state.snapshot(None, ROOT);
    assert_eq!(
        decide(&snapshot, "10.0.0.1", 5432, Some(("prod", "client"))),
        Decision::Allow
    );
    assert!(denied(decide(
        &snapshot,
        "10.0.0.1",
        5432,
        Some(("prod", "other"))
    )));
    assert_eq!(
        decide(&snapshot, "10.0.0.2", 5432, Some(("prod", "other"))),
        Decision::Allow
    );
    for to in ["10.0.0.1", "10.0.0.2"] {
        assert_eq!(
            decide(&snapshot, to, 5432, Some(("quarantine", "client"))),
            Decision::Deny("explicitly denied by: istio-system/no-quarantine".into())
        );
    }
}

const FILE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {nodeName: node1, serviceAccountName: sleep}
status: {podIP: 10.201.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default, labels: {app: echo}}
spec: {nodeName: node1}
status: {podIP: 10.201.1.3}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: file-only, namespace: other}
spec: {action: DENY, rules: [{}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext, namespace: default}
spec: {host: example.com, trafficPolicy: {tls: {mode: DISABLE}}}
"#;

#[test]
fn the_mesh_file_merges_in_and_the_control_plane_wins_clashes() {
    let settings = crate::mesh::MeshSettings::default();
    let file = FileMesh::from_text("mesh.yaml", FILE, &settings).expect("file reads");
    assert_eq!((file.workloads.len(), file.policies.len()), (2, 3));

    // The control plane sends `echo` too (another IP) and a `default/deny-all` that allows.
    let mut state = state_with(
        type_url::ADDRESS,
        vec![
            workload_resource(pb_workload("default", "echo", [10, 0, 0, 3]), "7"),
            workload_resource(pb_workload("default", "xds-only", [10, 0, 0, 4]), "7"),
        ],
    );
    let lenient = pb_authorization(
        "default",
        "deny-all",
        pb_sec::Scope::Namespace,
        pb_sec::Action::Deny,
        vec![],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(lenient, "7")],
        vec![],
    );
    state.apply(
        type_url::DESTINATION_RULE,
        vec![destination_rule_resource(
            "default",
            "ext",
            r#"{"host":"example.com"}"#,
        )],
        vec![],
    );

    let snapshot = state.snapshot(Some(&file), ROOT);
    let names: Vec<&str> = snapshot
        .workloads()
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["sleep", "echo", "xds-only"]);
    let echo = snapshot
        .workload_by_uid(&uid("default", "echo"))
        .expect("echo");
    assert_eq!(echo.addresses, [ip("10.0.0.3")], "the control plane's echo");
    assert!(snapshot.workload_by_ip(ip("10.201.1.3")).is_none());
    // The xDS deny-all has no rules (never matches) and replaces the file's.
    assert_eq!(decide(&snapshot, "10.201.1.2", 80, HBONE), Decision::Allow);
    let keys: Vec<String> = snapshot
        .policies
        .authorizations()
        .map(|a| a.key())
        .collect();
    assert_eq!(keys, ["default/deny-all", "other/file-only"]);
    let rules = snapshot.policies.destination_rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].tls, None, "the control plane's rule, without tls");

    let provenance = state.provenance();
    assert_eq!(provenance.workloads[&uid("default", "echo")], "7");
    assert_eq!(provenance.authorizations["default/deny-all"], "7");
    assert_eq!(provenance.destination_rules["default/ext"], "1");

    // Without the file, only the control plane's view.
    assert_eq!(state.snapshot(None, ROOT).workloads().len(), 2);
}
