//! Table-like tests of the outbound plan: services, workloads, passthrough, own ports, and what
//! a DestinationRule turns each into.

use super::*;
use crate::mesh::{HealthStatus, Labels, ServicePort};
use crate::policy::PolicySet;

fn workload(name: &str, ip: &str, tunnel: TunnelProtocol, health: HealthStatus) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        trust_domain: "cluster.local".into(),
        labels: Labels::from([("app".to_string(), "echo".to_string())]),
        addresses: vec![ip.parse().unwrap()],
        node: "node2".into(),
        tunnel,
        status: health,
        netns: None,
        creation_timestamp: None,
        authorization_policies: Vec::new(),
        service_ports: Default::default(),
        identity_cache: Default::default(),
    }
}

fn service(endpoints: Endpoints) -> Service {
    Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: None,
            port: 80,
            target_port: 8080,
        }],
        endpoints,
        subject_alt_names: vec![],
        external: false,
    }
}

fn selector() -> Endpoints {
    Endpoints::Selector(Labels::from([("app".to_string(), "echo".to_string())]))
}

fn snapshot(workloads: Vec<Workload>, services: Vec<Service>) -> Snapshot {
    Snapshot::build(workloads, services, PolicySet::default())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn service_vip_maps_to_an_endpoint_and_its_target_port() {
    let snap = snapshot(
        vec![workload(
            "echo",
            "10.201.2.2",
            TunnelProtocol::Hbone,
            HealthStatus::Healthy,
        )],
        vec![service(selector())],
    );
    let Plan::Hbone {
        next_hop,
        authority,
        expected,
        service,
        ..
    } = plan(&snap, None, addr("10.96.0.10:80"), 15008)
    else {
        panic!("expected HBONE");
    };
    assert_eq!(next_hop, addr("10.201.2.2:15008"));
    assert_eq!(authority, addr("10.201.2.2:8080"));
    assert_eq!(
        expected[0].to_string(),
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    assert_eq!(service.unwrap().name, "echo");
}

#[test]
fn only_healthy_endpoints_are_picked() {
    let snap = snapshot(
        vec![
            workload(
                "sick",
                "10.201.2.3",
                TunnelProtocol::Hbone,
                HealthStatus::Unhealthy,
            ),
            workload(
                "well",
                "10.201.2.2",
                TunnelProtocol::Hbone,
                HealthStatus::Healthy,
            ),
        ],
        vec![service(selector())],
    );
    for _ in 0..50 {
        let Plan::Hbone { authority, .. } = plan(&snap, None, addr("10.96.0.10:80"), 15008) else {
            panic!("expected HBONE");
        };
        assert_eq!(authority.ip().to_string(), "10.201.2.2");
    }
}

#[test]
fn no_healthy_endpoint_refuses() {
    let snap = snapshot(
        vec![workload(
            "sick",
            "10.201.2.3",
            TunnelProtocol::Hbone,
            HealthStatus::Unhealthy,
        )],
        vec![service(selector())],
    );
    assert!(
        matches!(plan(&snap, None, addr("10.96.0.10:80"), 15008), Plan::Refuse(r) if r.contains("no healthy"))
    );
}

#[test]
fn unknown_service_port_refuses() {
    let snap = snapshot(vec![], vec![service(selector())]);
    assert!(
        matches!(plan(&snap, None, addr("10.96.0.10:81"), 15008), Plan::Refuse(r) if r.contains("no port 81"))
    );
}

#[test]
fn workload_address_goes_through_hbone_with_the_dialled_port() {
    let snap = snapshot(
        vec![workload(
            "echo",
            "10.201.2.2",
            TunnelProtocol::Hbone,
            HealthStatus::Healthy,
        )],
        vec![],
    );
    let Plan::Hbone {
        authority,
        next_hop,
        ..
    } = plan(&snap, None, addr("10.201.2.2:9000"), 15008)
    else {
        panic!("expected HBONE");
    };
    assert_eq!(authority, addr("10.201.2.2:9000"));
    assert_eq!(next_hop, addr("10.201.2.2:15008"));
}

#[test]
fn workload_without_tunnel_gets_plain_tcp() {
    let snap = snapshot(
        vec![workload(
            "legacy",
            "10.201.2.5",
            TunnelProtocol::None,
            HealthStatus::Healthy,
        )],
        vec![],
    );
    assert!(matches!(
        plan(&snap, None, addr("10.201.2.5:80"), 15008),
        Plan::Direct { target, .. } if target == addr("10.201.2.5:80")
    ));
}

#[test]
fn outside_the_mesh_passes_through() {
    let snap = snapshot(vec![], vec![]);
    assert_eq!(
        plan(&snap, None, addr("192.0.2.7:443"), 15008),
        Plan::Passthrough {
            target: addr("192.0.2.7:443")
        }
    );
}

#[test]
fn service_without_endpoints_passes_through_and_fixed_addresses_are_used() {
    let snap = snapshot(vec![], vec![service(Endpoints::None)]);
    assert!(matches!(
        plan(&snap, None, addr("10.96.0.10:80"), 15008),
        Plan::Passthrough { .. }
    ));
    let snap = snapshot(
        vec![],
        vec![service(Endpoints::Addresses(vec![
            "192.0.2.9".parse().unwrap(),
        ]))],
    );
    assert_eq!(
        plan(&snap, None, addr("10.96.0.10:80"), 15008),
        Plan::Passthrough {
            target: addr("192.0.2.9:8080")
        }
    );
}

#[test]
fn own_ports_on_loopback_are_refused() {
    let snap = snapshot(vec![], vec![]);
    for port in SELF_PORTS {
        let dst = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port);
        assert!(matches!(plan(&snap, None, dst, 15008), Plan::Refuse(_)));
    }
}

#[test]
fn hostnames_resolve_against_mesh_services() {
    let snap = snapshot(vec![], vec![service(selector())]);
    for name in [
        "echo.default.svc.cluster.local",
        "echo.default",
        "echo.default.svc",
        "echo",
    ] {
        assert_eq!(
            resolve_hostname(&snap, name, 80, "default"),
            Some(addr("10.96.0.10:80")),
            "{name}"
        );
    }
    assert_eq!(resolve_hostname(&snap, "echo", 80, "other"), None);
    assert_eq!(resolve_hostname(&snap, "example.com", 80, "default"), None);
}

/// A snapshot with the echo service (one healthy HBONE endpoint) and the given policy YAML.
fn with_rules(yaml: &str, services: Vec<Service>) -> Snapshot {
    let policies = crate::policy::tests::policies(yaml);
    Snapshot::build(
        vec![workload(
            "echo",
            "10.201.2.2",
            TunnelProtocol::Hbone,
            HealthStatus::Healthy,
        )],
        services,
        policies,
    )
}

fn rule(ns: &str, host: &str, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: {ns}}}\nspec: {{host: '{host}', trafficPolicy: {{tls: {tls}}}}}\n"
    )
}

const ECHO: &str = "echo.default.svc.cluster.local";

#[test]
fn istio_mutual_keeps_hbone() {
    let snap = with_rules(
        &rule("default", ECHO, "{mode: ISTIO_MUTUAL}"),
        vec![service(selector())],
    );
    assert!(matches!(
        plan(&snap, Some("default"), addr("10.96.0.10:80"), 15008),
        Plan::Hbone { .. }
    ));
}

#[test]
fn disable_sends_plain_tcp_straight_to_the_endpoint() {
    let snap = with_rules(
        &rule("default", ECHO, "{mode: DISABLE}"),
        vec![service(selector())],
    );
    let Plan::Direct {
        target, workload, ..
    } = plan(&snap, Some("default"), addr("10.96.0.10:80"), 15008)
    else {
        panic!("expected plain TCP");
    };
    assert_eq!(target, addr("10.201.2.2:8080"));
    assert_eq!(workload.name, "echo");
}

#[test]
fn simple_originates_tls_named_after_the_host_or_the_sni() {
    let snap = with_rules(
        &rule("default", ECHO, "{mode: SIMPLE, caCertificates: /ca.pem}"),
        vec![service(selector())],
    );
    let Plan::Originate {
        target,
        tls,
        server_name,
        workload,
        ..
    } = plan(&snap, Some("default"), addr("10.96.0.10:80"), 15008)
    else {
        panic!("expected TLS origination");
    };
    assert_eq!(target, addr("10.201.2.2:8080"));
    assert_eq!(server_name, ECHO);
    assert_eq!(tls.ca_certificates.as_deref(), Some("/ca.pem"));
    assert!(!tls.mutual);
    assert!(workload.is_some());

    let snap = with_rules(
        &rule(
            "default",
            ECHO,
            "{mode: MUTUAL, sni: echo.example, clientCertificate: /c.pem, privateKey: /k.pem}",
        ),
        vec![service(selector())],
    );
    let Plan::Originate {
        tls, server_name, ..
    } = plan(&snap, Some("default"), addr("10.96.0.10:80"), 15008)
    else {
        panic!("expected TLS origination");
    };
    assert_eq!(server_name, "echo.example");
    assert!(tls.mutual);
}

#[test]
fn a_rule_in_the_clients_namespace_wins() {
    let yaml = rule("default", ECHO, "{mode: DISABLE}")
        + "---\n"
        + &rule("client", ECHO, "{mode: ISTIO_MUTUAL}");
    let snap = with_rules(&yaml, vec![service(selector())]);
    assert!(matches!(
        plan(&snap, Some("client"), addr("10.96.0.10:80"), 15008),
        Plan::Hbone { .. }
    ));
    assert!(matches!(
        plan(&snap, Some("default"), addr("10.96.0.10:80"), 15008),
        Plan::Direct { .. }
    ));
    // An unknown client is judged by the service's namespace.
    assert!(matches!(
        plan(&snap, None, addr("10.96.0.10:80"), 15008),
        Plan::Direct { .. }
    ));
}

#[test]
fn a_bare_workload_address_has_no_host_and_stays_hbone() {
    let snap = with_rules(&rule("default", "*", "{mode: DISABLE}"), vec![]);
    assert!(matches!(
        plan(&snap, Some("default"), addr("10.201.2.2:8080"), 15008),
        Plan::Hbone { .. }
    ));
}

#[test]
fn external_service_entries_get_tls_origination_to_their_endpoints_or_the_dialled_address() {
    let external = |endpoints| Service {
        name: "api".into(),
        namespace: "default".into(),
        hostname: "api.example.com".into(),
        vips: vec!["240.240.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: None,
            port: 80,
            target_port: 443,
        }],
        endpoints,
        subject_alt_names: vec![],
        external: true,
    };
    let yaml = rule("default", "api.example.com", "{mode: SIMPLE}");
    let snap = with_rules(
        &yaml,
        vec![external(Endpoints::Addresses(vec![
            "192.0.2.9".parse().unwrap(),
        ]))],
    );
    let Plan::Originate {
        target,
        server_name,
        workload,
        ..
    } = plan(&snap, Some("default"), addr("240.240.0.10:80"), 15008)
    else {
        panic!("expected TLS origination");
    };
    assert_eq!(target, addr("192.0.2.9:443"));
    assert_eq!(server_name, "api.example.com");
    assert!(workload.is_none());

    let snap = with_rules(&yaml, vec![external(Endpoints::None)]);
    assert!(matches!(
        plan(&snap, Some("default"), addr("240.240.0.10:80"), 15008),
        Plan::Originate { target, .. } if target == addr("240.240.0.10:80")
    ));
}
