//! Conversion of single resources, built the way istiod shapes them (PROTOCOL.md §3.4, §3.5):
//! what each field becomes, and the error each bad field gives. The builders here are shared
//! with `state`'s tests.

use std::collections::HashMap;

use prost::Message;
use prost_types::Any;

use super::*;
use crate::policy::{HostMatch, TlsMode};

pub(crate) const ROOT: &str = "istio-system";

/// An `Any` holding `message` under `type_url`.
pub(crate) fn any(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: message.encode_to_vec(),
    }
}

pub(crate) fn raw(name: &str, version: &str, body: Any) -> RawResource {
    RawResource {
        name: name.to_string(),
        version: version.to_string(),
        resource: Some(body),
    }
}

pub(crate) fn uid(ns: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{ns}/{name}")
}

/// A pod as istiod sends it: HBONE, uid as the key, trust domain and SA left empty.
pub(crate) fn pb_workload(ns: &str, name: &str, ip: [u8; 4]) -> pb::Workload {
    pb::Workload {
        uid: uid(ns, name),
        name: name.to_string(),
        namespace: ns.to_string(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        node: "node-1".to_string(),
        ..Default::default()
    }
}

/// An Address resource holding `w`, named by its uid.
pub(crate) fn workload_resource(w: pb::Workload, version: &str) -> RawResource {
    let name = w.uid.clone();
    let address = pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    };
    raw(&name, version, any(type_url::ADDRESS, &address))
}

pub(crate) fn pb_service(
    ns: &str,
    name: &str,
    vip: [u8; 4],
    port: u32,
    target: u32,
) -> pb::Service {
    pb::Service {
        name: name.to_string(),
        namespace: ns.to_string(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vip.to_vec(),
            length: None,
        }],
        ports: vec![pb::Port {
            service_port: port,
            target_port: target,
            app_protocol: 0,
        }],
        ..Default::default()
    }
}

/// An Address resource holding `s`, named `namespace/hostname`.
pub(crate) fn service_resource(s: pb::Service, version: &str) -> RawResource {
    let name = format!("{}/{}", s.namespace, s.hostname);
    let address = pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    };
    raw(&name, version, any(type_url::ADDRESS, &address))
}

pub(crate) fn presence() -> pb_sec::StringMatch {
    pb_sec::StringMatch {
        match_type: Some(pb_sec::string_match::MatchType::Presence(())),
    }
}

pub(crate) fn one_rule(clauses: Vec<Vec<pb_sec::Match>>) -> Vec<pb_sec::Rule> {
    vec![pb_sec::Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| pb_sec::Clause { matches })
            .collect(),
    }]
}

pub(crate) fn pb_authorization(
    ns: &str,
    name: &str,
    scope: pb_sec::Scope,
    action: pb_sec::Action,
    rules: Vec<pb_sec::Rule>,
) -> pb_sec::Authorization {
    pb_sec::Authorization {
        name: name.to_string(),
        namespace: ns.to_string(),
        scope: scope as i32,
        action: action as i32,
        rules,
        ..Default::default()
    }
}

/// istiod's static STRICT policy (§4.1): WORKLOAD_SELECTOR, DENY, one rule → one clause → one
/// match with only `not_principals: [presence]`.
pub(crate) fn static_strict() -> pb_sec::Authorization {
    pb_authorization(
        ROOT,
        "istio_converted_static_strict",
        pb_sec::Scope::WorkloadSelector,
        pb_sec::Action::Deny,
        one_rule(vec![vec![pb_sec::Match {
            not_principals: vec![presence()],
            ..Default::default()
        }]]),
    )
}

pub(crate) fn authorization_resource(a: pb_sec::Authorization, version: &str) -> RawResource {
    let name = format!("{}/{}", a.namespace, a.name);
    raw(&name, version, any(type_url::AUTHORIZATION, &a))
}

pub(crate) fn destination_rule_resource(ns: &str, name: &str, spec_json: &str) -> RawResource {
    let rule = pb_ztund::DestinationRule {
        name: name.to_string(),
        namespace: ns.to_string(),
        creation_timestamp: "2024-01-31T12:00:00Z".to_string(),
        spec_json: spec_json.to_string(),
    };
    raw(
        &format!("{ns}/{name}"),
        "1",
        any(type_url::DESTINATION_RULE, &rule),
    )
}

fn reason<T: fmt::Debug>(result: Result<T, ConvertError>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_workload_becomes_the_model_with_istio_defaults() {
    let mut w = pb_workload("default", "echo", [10, 0, 0, 2]);
    w.addresses.push(
        "fd00::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec(),
    );
    w.status = pb::WorkloadStatus::Unhealthy as i32;
    w.authorization_policies = vec![format!("{ROOT}/istio_converted_static_strict")];
    w.services = HashMap::from([(
        "default/echo.default.svc.cluster.local".to_string(),
        pb::PortList {
            ports: vec![
                pb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                },
                pb::Port {
                    service_port: 443,
                    target_port: 0,
                    app_protocol: 0,
                },
            ],
        },
    )]);
    let Ok(Address::Workload(workload)) = address(&workload_resource(w, "1")) else {
        panic!("a workload")
    };
    assert_eq!(workload.uid, "Kubernetes//Pod/default/echo");
    assert_eq!(workload.addresses.len(), 2);
    assert_eq!(workload.addresses[0].to_string(), "10.0.0.2");
    assert_eq!(workload.addresses[1].to_string(), "fd00::2");
    assert_eq!(
        workload.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(workload.tunnel, TunnelProtocol::Hbone);
    assert_eq!(workload.status, HealthStatus::Unhealthy);
    assert_eq!(workload.node, "node-1");
    assert!(workload.labels.is_empty() && workload.netns.is_none());
    assert_eq!(
        workload.authorization_policies,
        ["istio-system/istio_converted_static_strict"]
    );
    let ports = &workload.service_ports["default/echo.default.svc.cluster.local"];
    // Target port 0: the endpoint has none of its own, the service's applies.
    assert_eq!(ports, &BTreeMap::from([(80, 8080)]));
}

#[test]
fn bad_workload_fields_are_named() {
    let name = uid("default", "x");
    let bad = |edit: &dyn Fn(&mut pb::Workload)| {
        let mut w = pb_workload("default", "x", [10, 0, 0, 9]);
        edit(&mut w);
        reason(address(&workload_resource(w, "1")))
    };
    assert_eq!(
        bad(&|w| w.addresses = vec![vec![10, 0, 0, 0, 1]]),
        format!("workload {name}: addresses[0]: 5 bytes, expected 4 or 16")
    );
    assert_eq!(
        bad(&|w| w.tunnel_protocol = 7),
        format!("workload {name}: tunnel_protocol: unknown enum value 7")
    );
    assert!(
        bad(&|w| w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32)
            .contains("tunnel_protocol: LEGACY_ISTIO_MTLS is not supported")
    );
    assert_eq!(
        bad(&|w| w.status = 3),
        format!("workload {name}: status: unknown enum value 3")
    );
    assert_eq!(
        bad(&|w| {
            w.services
                .insert("echo.default.svc.cluster.local".into(), Default::default());
        }),
        format!(
            "workload {name}: services[\"echo.default.svc.cluster.local\"]: key is not namespace/hostname"
        )
    );
    assert!(
        bad(&|w| {
            w.services.insert(
                "default/echo".into(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 70000,
                        target_port: 1,
                        app_protocol: 0,
                    }],
                },
            );
        })
        .contains("services[\"default/echo\"].ports[0].service_port: 70000 is not a port")
    );
    assert!(
        bad(&|w| w.service_account = "a/b".into())
            .contains("trust_domain/namespace/service_account")
    );
    let mut renamed = workload_resource(pb_workload("default", "y", [10, 0, 0, 9]), "1");
    renamed.name = name.clone();
    let mismatch = reason(address(&renamed));
    assert!(
        mismatch.starts_with(&format!(
            "workload {name}: uid: gives \"Kubernetes//Pod/default/y\""
        )),
        "{mismatch}"
    );
}

#[test]
fn the_envelope_is_checked_before_the_content() {
    let name = "Kubernetes//Pod/default/x";
    let undecodable = raw(
        name,
        "1",
        Any {
            type_url: type_url::ADDRESS.into(),
            value: vec![0xff, 0xff, 0xff],
        },
    );
    assert!(reason(address(&undecodable)).starts_with(&format!(
        "address {name}: undecodable istio.workload.Address: "
    )),);
    let wrong = workload_resource(pb_workload("default", "x", [10, 0, 0, 1]), "1");
    let mut wrong_type = wrong.clone();
    if let Some(body) = wrong_type.resource.as_mut() {
        body.type_url = type_url::AUTHORIZATION.into();
    }
    assert_eq!(
        reason(address(&wrong_type)),
        format!(
            "address {name}: type_url \"{}\", expected \"{}\"",
            type_url::AUTHORIZATION,
            type_url::ADDRESS
        )
    );
    let empty = RawResource {
        resource: None,
        ..wrong.clone()
    };
    assert_eq!(
        reason(address(&empty)),
        format!("address {name}: no resource body")
    );
    let mut huge = pb_workload("default", "x", [10, 0, 0, 1]);
    huge.name = "n".repeat(MAX_RESOURCE_BYTES);
    let huge = workload_resource(huge, "1");
    let size = huge.resource.as_ref().map_or(0, |a| a.value.len());
    assert_eq!(
        reason(address(&huge)),
        format!("address {name}: {size} bytes encoded, over the {MAX_RESOURCE_BYTES}-byte cap")
    );
    let neither = raw(
        name,
        "1",
        any(type_url::ADDRESS, &pb::Address { r#type: None }),
    );
    assert!(reason(address(&neither)).ends_with("type: neither a workload nor a service"));
}

#[test]
fn a_service_becomes_the_model() {
    let mut s = pb_service("default", "echo", [10, 96, 0, 10], 80, 8080);
    s.ports.push(pb::Port {
        service_port: 9090,
        target_port: 0,
        app_protocol: 0,
    });
    s.addresses.push(pb::NetworkAddress {
        network: String::new(),
        address: vec![10, 97, 0, 0],
        length: Some(16),
    });
    s.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/echo".into()];
    let Ok(Address::Service(service)) = address(&service_resource(s, "1")) else {
        panic!("a service")
    };
    assert_eq!(service.hostname, "echo.default.svc.cluster.local");
    // The CIDR VIP is left out (unsupported); the plain one stays.
    assert_eq!(service.vips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(service.port(80).map(|p| p.target_port), Some(8080));
    assert_eq!(service.port(9090).map(|p| p.target_port), Some(9090));
    assert_eq!(service.endpoints, Endpoints::Listed);
    assert_eq!(service.subject_alt_names[0].service_account(), "echo");
    assert!(!service.external);
}

#[test]
fn a_dual_stack_service_keeps_both_vips_and_mapped_addresses_become_v4() {
    let v6 = |text: &str| {
        text.parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec()
    };
    let mut s = pb_service("default", "echo", [10, 96, 0, 10], 80, 8080);
    s.addresses.push(pb::NetworkAddress {
        network: String::new(),
        address: v6("fd00:96::10"),
        length: Some(128),
    });
    let Ok(Address::Service(service)) = address(&service_resource(s, "1")) else {
        panic!("a service")
    };
    let want: Vec<IpAddr> = vec![
        "10.96.0.10".parse().unwrap(),
        "fd00:96::10".parse().unwrap(),
    ];
    assert_eq!(service.vips, want);

    let mut w = pb_workload("default", "echo", [10, 0, 0, 2]);
    w.addresses = vec![v6("::ffff:10.0.0.3"), v6("fd00::3")];
    let Ok(Address::Workload(workload)) = address(&workload_resource(w, "1")) else {
        panic!("a workload")
    };
    let want: Vec<IpAddr> = vec!["10.0.0.3".parse().unwrap(), "fd00::3".parse().unwrap()];
    assert_eq!(workload.addresses, want);
}

#[test]
fn bad_service_fields_are_named() {
    let name = "default/echo.default.svc.cluster.local";
    let bad = |edit: &dyn Fn(&mut pb::Service)| {
        let mut s = pb_service("default", "echo", [10, 96, 0, 10], 80, 8080);
        edit(&mut s);
        reason(address(&service_resource(s, "1")))
    };
    assert_eq!(
        bad(&|s| s.addresses[0].address = vec![1, 2, 3]),
        format!("service {name}: addresses[0].address: 3 bytes, expected 4 or 16")
    );
    assert!(bad(&|s| s.addresses[0].length = Some(33)).contains("addresses[0].length: 33"));
    assert!(bad(&|s| s.ports[0].target_port = 65536).contains("ports[0].target_port: 65536"));
    assert!(bad(&|s| s.ports[0].service_port = 0).contains("ports[0].service_port: 0"));
    assert!(
        bad(&|s| s.subject_alt_names = vec!["cluster.local/ns/a/sa/b".into()])
            .starts_with(&format!("service {name}: subject_alt_names[0]: "))
    );
    // Named by a name other than namespace/hostname: rejected, never stored under either.
    let mut renamed = service_resource(pb_service("default", "echo", [10, 96, 0, 10], 80, 0), "1");
    renamed.name = "default/other".into();
    assert!(reason(address(&renamed)).starts_with("service default/other: namespace/hostname: "));
}

#[test]
fn an_authorization_keeps_every_field() {
    let exact = |v: &str| pb_sec::StringMatch {
        match_type: Some(pb_sec::string_match::MatchType::Exact(v.into())),
    };
    let prefix = pb_sec::StringMatch {
        match_type: Some(pb_sec::string_match::MatchType::Prefix("pre".into())),
    };
    let suffix = pb_sec::StringMatch {
        match_type: Some(pb_sec::string_match::MatchType::Suffix("suf".into())),
    };
    let m = pb_sec::Match {
        namespaces: vec![exact("a")],
        not_namespaces: vec![prefix],
        principals: vec![suffix],
        not_principals: vec![presence()],
        source_ips: vec![pb_sec::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        not_destination_ips: vec![pb_sec::Address {
            address: vec![0; 16],
            length: 0,
        }],
        destination_ports: vec![8080],
        not_destination_ports: vec![9090],
        service_accounts: vec![pb_sec::ServiceAccountMatch {
            namespace: "ns".into(),
            service_account: "sa".into(),
        }],
        ..Default::default()
    };
    let mut a = pb_authorization(
        "prod",
        "p",
        pb_sec::Scope::Namespace,
        pb_sec::Action::Allow,
        one_rule(vec![vec![m]]),
    );
    a.dry_run = true;
    let policy = authorization(&authorization_resource(a, "1")).expect("converts");
    assert_eq!(policy.key(), "prod/p");
    assert_eq!(
        (policy.scope, policy.action),
        (Scope::Namespace, Action::Allow)
    );
    assert!(policy.dry_run);
    let m = &policy.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces, [StringMatch::Exact("a".into())]);
    assert_eq!(m.not_namespaces, [StringMatch::Prefix("pre".into())]);
    assert_eq!(m.principals, [StringMatch::Suffix("suf".into())]);
    assert_eq!(m.not_principals, [StringMatch::Presence]);
    assert_eq!(m.source_ips[0].to_string(), "10.0.0.0/8");
    assert_eq!(m.not_destination_ips[0].to_string(), "::/0");
    assert_eq!(
        (m.destination_ports[0], m.not_destination_ports[0]),
        (8080, 9090)
    );
    assert_eq!(m.service_accounts[0].service_account, "sa");
}

// HARDENING X2 (unknown Scope and Action values are errors, never a default ALLOW)
#[test]
fn bad_authorization_fields_are_named() {
    let bad = |edit: &dyn Fn(&mut pb_sec::Authorization)| {
        let mut a = static_strict();
        edit(&mut a);
        reason(authorization(&authorization_resource(a, "1")))
    };
    let name = "authorization istio-system/istio_converted_static_strict";
    assert_eq!(
        bad(&|a| a.scope = 9),
        format!("{name}: scope: unknown enum value 9")
    );
    assert_eq!(
        bad(&|a| a.action = 2),
        format!("{name}: action: unknown enum value 2")
    );
    assert_eq!(
        bad(&|a| a.rules[0].clauses[0].matches[0].destination_ports = vec![65536]),
        format!(
            "{name}: rules[0].clauses[0].matches[0].destination_ports[0]: 65536 is not a port (0-65535)"
        )
    );
    assert!(
        bad(&|a| {
            a.rules[0].clauses[0].matches[0].source_ips = vec![pb_sec::Address {
                address: vec![10, 0, 0, 0],
                length: 40,
            }]
        })
        .contains("matches[0].source_ips[0].length: 40")
    );
    assert!(
        bad(&|a| a.rules[0].clauses[0].matches[0].not_principals = vec![Default::default()])
            .contains("not_principals[0]: no match type set")
    );
}

#[test]
fn a_destination_rule_is_read_by_the_mesh_file_reader() {
    let resource = destination_rule_resource(
        "default",
        "httpbin",
        r#"{"host":"httpbin.org","trafficPolicy":{"tls":{"mode":"SIMPLE","sni":"httpbin.org"}}}"#,
    );
    let rule = destination_rule(&resource).expect("reads");
    assert_eq!(rule.key(), "default/httpbin");
    assert_eq!(rule.host, HostMatch::Exact("httpbin.org".into()));
    let tls = rule.tls.as_ref().expect("tls");
    assert_eq!(tls.mode, Some(TlsMode::Simple));
    assert!(rule.created.is_some());

    let missing_host = destination_rule_resource("default", "r", r#"{"trafficPolicy":{}}"#);
    assert_eq!(
        reason(destination_rule(&missing_host)),
        "destination rule default/r: spec.host: missing: the rule needs a host"
    );
    let bad_mode = destination_rule_resource(
        "default",
        "r",
        r#"{"host":"a.b","trafficPolicy":{"tls":{"mode":"LOUD"}}}"#,
    );
    assert!(reason(destination_rule(&bad_mode)).contains("unknown mode \"LOUD\""));
    let not_json = destination_rule_resource("default", "r", "{");
    assert!(
        reason(destination_rule(&not_json))
            .starts_with("destination rule default/r: spec_json: not JSON")
    );
}

// HARDENING X3
#[test]
fn address_bytes_of_any_length_but_4_or_16_are_rejected() {
    for len in [0usize, 3, 5, 15, 17] {
        let mut w = pb_workload("default", "x", [10, 0, 0, 9]);
        w.addresses = vec![vec![10; len]];
        let why = reason(address(&workload_resource(w, "1")));
        assert!(
            why.ends_with(&format!("addresses[0]: {len} bytes, expected 4 or 16")),
            "{why}"
        );
    }
}
