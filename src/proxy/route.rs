//! The outbound decision as a pure function: given the source workload and the destination the
//! app dialled, where do the bytes go and how. No I/O; `outbound` carries the plan out.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::identity::SpiffeId;
use crate::mesh::{Endpoints, Service, Snapshot, TunnelProtocol, Workload};

/// Ports of ztund's own listeners: a connection aimed at one of them would loop.
pub const SELF_PORTS: [u16; 3] = [15001, 15006, 15008];

/// How one outbound connection is carried.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// HBONE to the destination workload's node-side listener.
    Hbone {
        workload: Arc<Workload>,
        /// Where the TCP+TLS connection goes (workload IP : 15008).
        next_hop: SocketAddr,
        /// `:authority` of the CONNECT: workload IP : target port.
        authority: SocketAddr,
        /// Identities the server may prove; any one will do.
        expected: Vec<SpiffeId>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to a mesh workload that has no tunnel in front of it.
    Direct {
        target: SocketAddr,
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Not in the mesh: plain TCP to where the app was going.
    Passthrough { target: SocketAddr },
    /// Nothing may be sent; the reason goes to the access log.
    Refuse(String),
}

/// Decides how `source` reaches `destination`; `hbone_port` is the peers' HBONE port.
pub fn plan(snapshot: &Snapshot, destination: SocketAddr, hbone_port: u16) -> Plan {
    if destination.ip().is_loopback() && SELF_PORTS.contains(&destination.port()) {
        return Plan::Refuse(format!("{destination} is one of ztund's own ports"));
    }
    if let Some(service) = snapshot.service_by_vip(destination.ip()) {
        return plan_service(snapshot, service, destination, hbone_port);
    }
    match snapshot.workload_by_ip(destination.ip()) {
        Some(workload) => plan_workload(workload, None, destination, hbone_port),
        None => Plan::Passthrough {
            target: destination,
        },
    }
}

/// The plan for a domain name the client asked for (SOCKS5): a mesh service's hostname.
pub fn resolve_hostname(
    snapshot: &Snapshot,
    name: &str,
    port: u16,
    client_namespace: &str,
) -> Option<SocketAddr> {
    let name = name.trim_end_matches('.');
    let candidates = [
        name.to_string(),
        format!("{name}.svc.cluster.local"),
        format!("{name}.cluster.local"),
        format!("{name}.{client_namespace}.svc.cluster.local"),
    ];
    candidates.iter().find_map(|host| {
        let service = snapshot.service_by_hostname(host, client_namespace)?;
        let vip = service.vips.first()?;
        Some(SocketAddr::new(*vip, port))
    })
}

fn plan_service(
    snapshot: &Snapshot,
    service: &Arc<Service>,
    destination: SocketAddr,
    hbone_port: u16,
) -> Plan {
    let Some(port) = service.port(destination.port()) else {
        return Plan::Refuse(format!(
            "service {} has no port {}",
            service.hostname,
            destination.port()
        ));
    };
    if matches!(service.endpoints, Endpoints::None) {
        return Plan::Passthrough {
            target: destination,
        };
    }
    let healthy: Vec<&Arc<Workload>> = snapshot.healthy_endpoints(service).collect();
    if healthy.is_empty() {
        if let Endpoints::Addresses(ips) = &service.endpoints
            && let Some(ip) = pick(ips)
        {
            return Plan::Passthrough {
                target: SocketAddr::new(*ip, port.target_port),
            };
        }
        return Plan::Refuse(format!("no healthy upstream for {}", service.hostname));
    }
    let Some(workload) = pick(&healthy) else {
        return Plan::Refuse(format!("no healthy upstream for {}", service.hostname));
    };
    let Some(ip) = preferred_address(workload, destination.ip()) else {
        return Plan::Refuse(format!("workload {} has no address", workload.uid));
    };
    plan_workload(
        workload,
        Some(service.clone()),
        SocketAddr::new(ip, port.target_port),
        hbone_port,
    )
}

fn plan_workload(
    workload: &Arc<Workload>,
    service: Option<Arc<Service>>,
    target: SocketAddr,
    hbone_port: u16,
) -> Plan {
    if SELF_PORTS.contains(&target.port()) {
        return Plan::Refuse(format!("{target} is one of ztund's own ports"));
    }
    match workload.tunnel {
        TunnelProtocol::None => Plan::Direct {
            target,
            workload: workload.clone(),
            service,
        },
        TunnelProtocol::Hbone => {
            let mut expected = vec![workload.identity()];
            if let Some(service) = &service {
                expected.extend(service.subject_alt_names.iter().cloned());
            }
            expected.sort();
            expected.dedup();
            Plan::Hbone {
                workload: workload.clone(),
                next_hop: SocketAddr::new(target.ip(), hbone_port),
                authority: target,
                expected,
                service,
            }
        }
    }
}

/// Same IP family as the address the app dialled, when the workload has one.
fn preferred_address(workload: &Workload, dialled: IpAddr) -> Option<IpAddr> {
    workload
        .addresses
        .iter()
        .find(|ip| ip.is_ipv4() == dialled.is_ipv4())
        .or_else(|| workload.addresses.first())
        .copied()
}

fn pick<T>(items: &[T]) -> Option<&T> {
    match items.len() {
        0 => None,
        1 => items.first(),
        n => items.get(rand::thread_rng().gen_range(0..n)),
    }
}

#[cfg(test)]
mod tests {
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
        } = plan(&snap, addr("10.96.0.10:80"), 15008)
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
            let Plan::Hbone { authority, .. } = plan(&snap, addr("10.96.0.10:80"), 15008) else {
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
            matches!(plan(&snap, addr("10.96.0.10:80"), 15008), Plan::Refuse(r) if r.contains("no healthy"))
        );
    }

    #[test]
    fn unknown_service_port_refuses() {
        let snap = snapshot(vec![], vec![service(selector())]);
        assert!(
            matches!(plan(&snap, addr("10.96.0.10:81"), 15008), Plan::Refuse(r) if r.contains("no port 81"))
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
        } = plan(&snap, addr("10.201.2.2:9000"), 15008)
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
            plan(&snap, addr("10.201.2.5:80"), 15008),
            Plan::Direct { target, .. } if target == addr("10.201.2.5:80")
        ));
    }

    #[test]
    fn outside_the_mesh_passes_through() {
        let snap = snapshot(vec![], vec![]);
        assert_eq!(
            plan(&snap, addr("192.0.2.7:443"), 15008),
            Plan::Passthrough {
                target: addr("192.0.2.7:443")
            }
        );
    }

    #[test]
    fn service_without_endpoints_passes_through_and_fixed_addresses_are_used() {
        let snap = snapshot(vec![], vec![service(Endpoints::None)]);
        assert!(matches!(
            plan(&snap, addr("10.96.0.10:80"), 15008),
            Plan::Passthrough { .. }
        ));
        let snap = snapshot(
            vec![],
            vec![service(Endpoints::Addresses(vec![
                "192.0.2.9".parse().unwrap(),
            ]))],
        );
        assert_eq!(
            plan(&snap, addr("10.96.0.10:80"), 15008),
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
            assert!(matches!(plan(&snap, dst, 15008), Plan::Refuse(_)));
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
}
