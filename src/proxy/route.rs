//! The outbound decision as a pure function: given the client's namespace and the destination
//! the app dialled, where do the bytes go and how. A service's DestinationRule (ztund's
//! extension; Istio ambient's ztunnel ignores them) picks HBONE, plain TCP or TLS origination
//! once the endpoint is chosen. No I/O; `outbound` carries the plan out, `originate` the TLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::config::Ports;
use crate::identity::SpiffeId;
use crate::mesh::{Endpoints, Service, Snapshot, TunnelProtocol, Workload};
use crate::policy::{self, OutboundTls, TlsOrigination};

/// Istio's ports for the node proxy's own listeners (admin, outbound, inbound plaintext, HBONE,
/// metrics, readiness, DNS, SOCKS5): a connection aimed at one of them on a workload address or
/// loopback is a self-call, which would loop or reach ztund's own servers through the tunnel.
pub const SELF_PORTS: [u16; 8] = [15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080];

/// Whether `port` is one of ztund's own: Istio's numbers, and the ones this node configured.
pub fn is_own_port(port: u16, ports: &Ports) -> bool {
    let configured = [
        ports.hbone,
        ports.socks5,
        ports.outbound,
        ports.inbound_plaintext,
        ports.admin,
        ports.metrics,
        ports.readiness,
    ];
    SELF_PORTS.contains(&port) || configured.contains(&port)
}

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
    /// DestinationRule SIMPLE/MUTUAL: ztund opens TLS to `target` itself and the app keeps
    /// speaking plaintext to ztund.
    Originate {
        target: SocketAddr,
        tls: TlsOrigination,
        /// SNI and the name checked when no `subjectAltNames` are given: `sni`, else the host.
        server_name: String,
        /// The mesh workload behind `target`, if any.
        workload: Option<Arc<Workload>>,
        service: Arc<Service>,
    },
    /// Not in the mesh: plain TCP to where the app was going.
    Passthrough { target: SocketAddr },
    /// Nothing may be sent; the reason goes to the access log.
    Refuse(String),
}

/// Decides how a client of `client_namespace` (`None`: not a known workload) reaches
/// `destination`; `hbone_port` is the peers' HBONE port. A bare workload address has no host, so
/// no DestinationRule applies to it.
pub fn plan(
    snapshot: &Snapshot,
    client_namespace: Option<&str>,
    destination: SocketAddr,
    hbone_port: u16,
) -> Plan {
    // `[::ffff:127.0.0.1]` is loopback too, and 0.0.0.0 reaches the host's own listeners.
    let destination = crate::net::canonical(destination);
    let host_itself = destination.ip().is_loopback() || destination.ip().is_unspecified();
    if host_itself && SELF_PORTS.contains(&destination.port()) {
        return Plan::Refuse(format!("{destination} is one of ztund's own ports"));
    }
    if let Some(service) = snapshot.service_by_vip(destination.ip()) {
        return plan_service(snapshot, client_namespace, service, destination, hbone_port);
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

/// Where a service connection lands once an endpoint is picked.
enum Endpoint<'a> {
    /// A mesh workload, at its address and the target port.
    Workload(&'a Arc<Workload>, SocketAddr),
    /// An address no mesh workload owns (a ServiceEntry endpoint, or passthrough).
    Address(SocketAddr),
}

fn plan_service(
    snapshot: &Snapshot,
    client_namespace: Option<&str>,
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
    let endpoint = match pick_endpoint(snapshot, service, destination, port.target_port) {
        Ok(endpoint) => endpoint,
        Err(reason) => return Plan::Refuse(reason.to_string()),
    };
    let tls = policy::outbound_tls(
        &snapshot.policies,
        client_namespace.unwrap_or(&service.namespace),
        &service.hostname,
        &service.namespace,
        port.port,
    );
    let target = match &endpoint {
        Endpoint::Workload(_, target) | Endpoint::Address(target) => *target,
    };
    if SELF_PORTS.contains(&target.port()) && !matches!(endpoint, Endpoint::Address(_)) {
        return Plan::Refuse(format!("{target} is one of ztund's own ports"));
    }
    match (tls, endpoint) {
        (OutboundTls::Hbone, Endpoint::Workload(workload, target)) => {
            plan_workload(workload, Some(service.clone()), target, hbone_port)
        }
        (OutboundTls::Plain, Endpoint::Workload(workload, target)) => Plan::Direct {
            target,
            workload: workload.clone(),
            service: Some(service.clone()),
        },
        (OutboundTls::Hbone | OutboundTls::Plain, Endpoint::Address(target)) => {
            Plan::Passthrough { target }
        }
        (OutboundTls::Originate(tls), endpoint) => {
            let server_name = tls.sni.clone().unwrap_or_else(|| service.hostname.clone());
            let workload = match endpoint {
                Endpoint::Workload(workload, _) => Some(workload.clone()),
                Endpoint::Address(_) => None,
            };
            Plan::Originate {
                target,
                tls,
                server_name,
                workload,
                service: service.clone(),
            }
        }
    }
}

/// Why a service has no endpoint to send a connection to; the plan refuses with its text.
#[derive(Debug, thiserror::Error)]
enum NoEndpoint {
    #[error("no healthy upstream for {service}")]
    NoHealthyUpstream { service: String },
    #[error("workload {workload} has no address")]
    NoAddress { workload: String },
}

/// A healthy endpoint of the service (workloads first, then fixed addresses), the dialled
/// address for a service without endpoints, or why there is none.
fn pick_endpoint<'a>(
    snapshot: &'a Snapshot,
    service: &'a Service,
    destination: SocketAddr,
    target_port: u16,
) -> Result<Endpoint<'a>, NoEndpoint> {
    if matches!(service.endpoints, Endpoints::None) {
        return Ok(Endpoint::Address(destination));
    }
    let no_upstream = || NoEndpoint::NoHealthyUpstream {
        service: service.hostname.clone(),
    };
    let healthy: Vec<&Arc<Workload>> = snapshot.healthy_endpoints(service).collect();
    if healthy.is_empty() {
        if let Endpoints::Addresses(ips) = &service.endpoints
            && let Some(ip) = pick(ips)
        {
            return Ok(Endpoint::Address(SocketAddr::new(*ip, target_port)));
        }
        return Err(no_upstream());
    }
    let workload = pick(&healthy).ok_or_else(no_upstream)?;
    let Some(ip) = preferred_address(workload, destination.ip()) else {
        return Err(NoEndpoint::NoAddress {
            workload: workload.uid.clone(),
        });
    };
    let target_port = match &service.endpoints {
        Endpoints::Listed => service
            .port(destination.port())
            .map_or(target_port, |port| workload.target_port(service, port)),
        _ => target_port,
    };
    Ok(Endpoint::Workload(
        workload,
        SocketAddr::new(ip, target_port),
    ))
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
#[path = "route_tests.rs"]
mod tests;
