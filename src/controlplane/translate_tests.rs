//! The translation read as istiod's behaviour (PROTOCOL.md §3.4, §4.1): what a workload
//! references, how each policy is scoped, PeerAuthentication's two converted shapes, the
//! DestinationRule type, and versions that only move when a resource changes.

use std::path::PathBuf;

use prost::Message;

use super::*;
use crate::controlplane::source::load;
use crate::mesh::MeshSettings;
use crate::proto::istio::security::string_match::MatchType;

const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default, labels: {app: echo, version: v2}}
spec: {nodeName: node2, serviceAccountName: echo}
status: {podIP: 10.1.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {nodeName: node1, serviceAccountName: sleep}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

fn resources(extra: &str) -> Resources {
    let text = format!("{PODS}---\n{extra}");
    let content = vec![(PathBuf::from("mesh.yaml"), text.into_bytes())];
    load(&content, &MeshSettings::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .resources
}

fn workload(resources: &Resources, uid: &str) -> wl::Workload {
    let resource = &resources.of(type_url::ADDRESS).unwrap()[uid];
    let address =
        wl::Address::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap();
    match address.r#type {
        Some(wl::address::Type::Workload(w)) => w,
        other => panic!("{uid} is not a workload: {other:?}"),
    }
}

fn policy(resources: &Resources, name: &str) -> sec::Authorization {
    let named = resources.of(type_url::AUTHORIZATION).unwrap();
    let resource = named.get(name).unwrap_or_else(|| {
        panic!(
            "{name} missing; have {:?}",
            named.keys().collect::<Vec<_>>()
        )
    });
    sec::Authorization::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap()
}

const ECHO: &str = "Kubernetes//Pod/default/echo";
const SLEEP: &str = "Kubernetes//Pod/default/sleep";
const STATIC: &str = "istio-system/istio_converted_static_strict";

fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}

#[test]
fn workloads_and_services_carry_what_istiod_sends() {
    let r = resources("");
    let echo = workload(&r, ECHO);
    assert_eq!(echo.name, "echo");
    assert_eq!(echo.addresses, vec![vec![10, 1, 2, 2]]);
    assert_eq!(echo.node, "node2");
    assert_eq!(echo.service_account, "echo");
    assert_eq!(echo.trust_domain, "cluster.local");
    assert_eq!(echo.tunnel_protocol, wl::TunnelProtocol::Hbone as i32);
    assert_eq!(echo.canonical_revision, "v2");
    let ports = &echo.services["default/echo.default.svc.cluster.local"].ports;
    assert_eq!((ports[0].service_port, ports[0].target_port), (80, 8080));
    assert!(workload(&r, SLEEP).services.is_empty());
    assert!(echo.authorization_policies.is_empty(), "no policies at all");

    let named = r.of(type_url::ADDRESS).unwrap();
    let service = &named["default/echo.default.svc.cluster.local"];
    let decoded = wl::Address::decode(service.resource.as_ref().unwrap().value.as_slice()).unwrap();
    let Some(wl::address::Type::Service(service)) = decoded.r#type else {
        panic!("not a service")
    };
    assert_eq!(service.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(service.addresses[0].network, "");
    assert_eq!(service.ports[0].target_port, 8080);
}

#[test]
fn a_strict_workload_references_the_static_strict_policy() {
    let r = resources(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n",
    );
    assert_eq!(workload(&r, ECHO).authorization_policies, [STATIC]);
    let strict = policy(&r, STATIC);
    assert_eq!(strict.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(strict.action, sec::Action::Deny as i32);
    assert_eq!(strict.rules.len(), 1);
    assert_eq!(strict.rules[0].clauses.len(), 1);
    let only = &strict.rules[0].clauses[0].matches;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].not_principals, [presence()]);
}

#[test]
fn port_level_exceptions_to_strict_are_one_rule_of_anded_clauses() {
    let r = resources(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: echo-ports, namespace: default}\nspec:\n  selector: {matchLabels: {app: echo}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {9001: {mode: PERMISSIVE}}\n",
    );
    let key = "default/converted_peer_authentication_echo-ports";
    assert_eq!(
        workload(&r, ECHO).authorization_policies,
        [key],
        "instead of the static one"
    );
    assert!(workload(&r, SLEEP).authorization_policies.is_empty());
    let converted = policy(&r, key);
    assert_eq!(converted.scope, sec::Scope::WorkloadSelector as i32);
    assert_eq!(converted.action, sec::Action::Deny as i32);
    assert_eq!(converted.rules.len(), 1);
    let clauses = &converted.rules[0].clauses;
    assert_eq!(clauses.len(), 2);
    assert_eq!(clauses[0].matches[0].not_principals, [presence()]);
    assert_eq!(clauses[1].matches[0].not_destination_ports, [9001]);
    // Published even though no workload references it: istiod publishes the static one too.
    policy(&r, STATIC);
}

#[test]
fn strict_ports_of_a_permissive_workload_are_one_rule_each() {
    let r = resources(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: echo-ports, namespace: default}\nspec:\n  selector: {matchLabels: {app: echo}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {9000: {mode: STRICT}, 9002: {mode: STRICT}}\n",
    );
    let key = "default/converted_peer_authentication_echo-ports";
    assert_eq!(workload(&r, ECHO).authorization_policies, [key]);
    let converted = policy(&r, key);
    assert_eq!(converted.rules.len(), 2);
    for (rule, port) in converted.rules.iter().zip([9000, 9002]) {
        assert_eq!(rule.clauses.len(), 1);
        let m = &rule.clauses[0].matches[0];
        assert_eq!(m.not_principals, [presence()]);
        assert_eq!(m.destination_ports, [port]);
    }
}

#[test]
fn authorization_policies_are_scoped_as_istiod_scopes_them() {
    let ap = |name: &str, ns: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        )
    };
    let docs = [
        ap("z-echo", "default", "{selector: {matchLabels: {app: echo}}, action: DENY, rules: [{from: [{source: {namespaces: [bad]}}]}]}"),
        ap("a-echo-mesh", "istio-system", "{selector: {matchLabels: {app: echo}}, rules: [{}]}"),
        ap("ns-wide", "default", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}"),
        ap("mesh-wide", "istio-system", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.9.0.0/16]}}]}]}"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n".to_string(),
    ];
    let r = resources(&docs.join("---\n"));
    assert_eq!(
        workload(&r, ECHO).authorization_policies,
        ["default/z-echo", "istio-system/a-echo-mesh", STATIC],
        "selector policies sorted, then the PeerAuthentication key"
    );
    assert_eq!(workload(&r, SLEEP).authorization_policies, [STATIC]);
    assert_eq!(
        policy(&r, "default/z-echo").scope,
        sec::Scope::WorkloadSelector as i32
    );
    assert_eq!(
        policy(&r, "default/ns-wide").scope,
        sec::Scope::Namespace as i32
    );
    let ns_wide = policy(&r, "default/ns-wide");
    assert_eq!(ns_wide.action, sec::Action::Allow as i32);
    assert_eq!(
        ns_wide.rules[0].clauses[0].matches[0].destination_ports,
        [8080]
    );
    let mesh = policy(&r, "istio-system/mesh-wide");
    assert_eq!(mesh.scope, sec::Scope::Global as i32);
    let block = &mesh.rules[0].clauses[0].matches[0].source_ips[0];
    assert_eq!(
        (block.address.as_slice(), block.length),
        (&[10, 9, 0, 0][..], 16)
    );
}

#[test]
fn destination_rules_travel_as_their_spec_in_json() {
    let r = resources(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo-tls, namespace: default, creationTimestamp: '2024-01-02T03:04:05Z'}\nspec: {host: echo.default.svc.cluster.local, trafficPolicy: {tls: {mode: SIMPLE}}}\n",
    );
    let named = r.of(type_url::DESTINATION_RULE).unwrap();
    let resource = &named["default/echo-tls"];
    let any = resource.resource.as_ref().unwrap();
    assert_eq!(any.type_url, type_url::DESTINATION_RULE);
    let rule = ztund_v1::DestinationRule::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        (rule.name.as_str(), rule.namespace.as_str()),
        ("echo-tls", "default")
    );
    assert_eq!(rule.creation_timestamp, "2024-01-02T03:04:05Z");
    let spec: serde_json::Value = serde_json::from_str(&rule.spec_json).unwrap();
    assert_eq!(
        spec,
        serde_json::json!({"host": "echo.default.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}})
    );
}

#[test]
fn versions_move_only_with_the_resource() {
    let ap = |action: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: default}}\nspec: {{action: {action}, rules: [{{}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: two, namespace: default}}\nspec: {{clusterIP: 10.96.0.11, selector: {{app: echo}}, ports: [{{port: 81, targetPort: 8081}}]}}\n"
        )
    };
    let versions = |r: &Resources| -> Vec<(String, String)> {
        r.by_type
            .values()
            .flat_map(|named| named.values().map(|x| (x.name.clone(), x.version.clone())))
            .collect()
    };
    let a = resources(&ap("DENY"));
    assert_eq!(workload(&a, ECHO).services.len(), 2);
    // The services map is encoded in key order: equal content, equal bytes, every time.
    for _ in 0..5 {
        assert_eq!(versions(&a), versions(&resources(&ap("DENY"))));
    }
    let b = resources(&ap("ALLOW"));
    let changed: Vec<String> = versions(&a)
        .into_iter()
        .zip(versions(&b))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0)
        .collect();
    assert_eq!(changed, ["default/p"]);
}
