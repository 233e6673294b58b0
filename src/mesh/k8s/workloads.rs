//! Pod, WorkloadEntry, Service and ServiceEntry documents, each read into the model with every
//! value type-checked. Checks that need the whole file (duplicates, named target ports) live in
//! `super`; the security kinds live in `crate::policy`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::claims::{entry_address, usable_address};
use super::fields::{Field, NameError, check_dns_label, check_dns_subdomain, is_port_name};
use super::schema;
use super::{MeshError, MeshSettings, root};
use crate::identity::SpiffeId;
use crate::mesh::model::{
    DocRef, Endpoints, HealthStatus, Labels, RawDocument, Service, ServicePort, TunnelProtocol,
    Workload,
};

/// Label that takes a workload out of HBONE (Istio's own).
const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The workload's network namespace in standalone capture mode.
const NETNS_ANNOTATION: &str = "ztund.io/netns";
/// `healthy` or `unhealthy`: lets tests and operators take an endpoint out of rotation.
const HEALTH_ANNOTATION: &str = "ztund.io/health";
/// The node a WorkloadEntry runs on (pods say it in `spec.nodeName`).
const NODE_ANNOTATION: &str = "ztund.io/node";
/// Where named network namespaces live (`ip netns add`).
const NETNS_DIR: &str = "/var/run/netns";

/// A workload with what only the file-level checks need.
pub(crate) struct ParsedWorkload {
    pub workload: Workload,
    pub doc: DocRef,
    /// Port names to numbers: a pod's container ports, a WorkloadEntry's `spec.ports`.
    pub named_ports: BTreeMap<String, u16>,
    /// Each address with the field it came from.
    pub address_fields: Vec<(IpAddr, String)>,
    /// The node's addresses a pod reports (`status.hostIP(s)`): no workload may claim them.
    pub host_ip_fields: Vec<(IpAddr, String)>,
}

/// A service with what only the file-level checks need.
pub(crate) struct ParsedService {
    pub service: Service,
    pub doc: DocRef,
    /// Service ports whose `targetPort` is a name, resolved once all workloads are known.
    pub named_targets: Vec<NamedTarget>,
    /// Each VIP with the field it came from.
    pub vip_fields: Vec<(IpAddr, String)>,
    /// The field the hostname came from.
    pub host_field: String,
    /// ServiceEntry endpoint addresses with their fields: not a workload's or a node's address.
    pub endpoint_fields: Vec<(IpAddr, String)>,
}

/// A `targetPort: <name>` waiting for resolution.
pub(crate) struct NamedTarget {
    pub port_index: usize,
    pub name: String,
    pub field: String,
}

/// A Kubernetes pod. `None` for host-network pods: they share the node's address and are never
/// captured, as in Istio ambient.
pub(crate) fn parse_pod(
    raw: &RawDocument,
    settings: &MeshSettings,
) -> Result<Option<ParsedWorkload>, MeshError> {
    let doc = &raw.doc;
    let root = root(raw);
    // A Pod's spec and status are Kubernetes' own, validated by its API server and growing
    // with every release: only the envelope is held to a schema here.
    let metadata = envelope(&root)?;
    let labels = metadata.get("labels")?.labels()?;
    metadata.get("uid")?.opt_str()?;
    let creation_timestamp = metadata
        .get("creationTimestamp")?
        .opt_str()?
        .map(str::to_string);
    let annotations = MeshAnnotations::read(&metadata.get("annotations")?)?;
    let spec = root.get("spec")?;
    if spec.get("hostNetwork")?.opt_bool()? == Some(true) {
        tracing::warn!(document = %doc, "host-network pod is not captured; ignored");
        return Ok(None);
    }
    let service_account = service_account(&spec.get("serviceAccountName")?)?;
    let node_field = spec.get("nodeName")?;
    let node = node_field.str()?.to_string();
    check_dns_subdomain(&node).map_err(|reason| node_field.error(reason))?;
    let named_ports = container_ports(&spec)?;

    let status = root.get("status")?;
    let mut address_fields = Vec::new();
    let primary = status.get("podIP")?;
    if !primary.is_absent() {
        address_fields.push((
            usable_address(&primary, primary.ip()?)?,
            primary.path().to_string(),
        ));
    }
    for entry in status.get("podIPs")?.list()? {
        let ip_field = entry.get("ip")?;
        let ip = usable_address(&ip_field, ip_field.ip()?)?;
        if !address_fields.iter().any(|(known, _)| *known == ip) {
            address_fields.push((ip, ip_field.path().to_string()));
        }
    }
    if address_fields.is_empty() {
        return Err(primary
            .error("required: a pod in the mesh needs an IP (status.podIP or status.podIPs)"));
    }
    let mut host_ip_fields = Vec::new();
    let host_ip = status.get("hostIP")?;
    if !host_ip.is_absent() {
        host_ip_fields.push((host_ip.ip()?, host_ip.path().to_string()));
    }
    for entry in status.get("hostIPs")?.list()? {
        let ip_field = entry.get("ip")?;
        host_ip_fields.push((ip_field.ip()?, ip_field.path().to_string()));
    }
    let tunnel = tunnel_of([&labels]);
    Ok(Some(ParsedWorkload {
        workload: Workload {
            uid: format!("Kubernetes//Pod/{}/{}", doc.namespace, doc.name),
            name: doc.name.clone(),
            namespace: doc.namespace.clone(),
            service_account,
            trust_domain: settings.trust_domain.clone(),
            labels,
            addresses: address_fields.iter().map(|(ip, _)| *ip).collect(),
            node,
            tunnel,
            status: annotations.health,
            netns: annotations.netns,
            creation_timestamp,
            authorization_policies: Vec::new(),
            service_ports: Default::default(),
            identity_cache: Default::default(),
        },
        doc: doc.clone(),
        named_ports,
        address_fields,
        host_ip_fields,
    }))
}

/// An Istio WorkloadEntry: a VM or host process with an IP address.
pub(crate) fn parse_workload_entry(
    raw: &RawDocument,
    settings: &MeshSettings,
) -> Result<ParsedWorkload, MeshError> {
    let doc = &raw.doc;
    let root = root(raw);
    let metadata = envelope(&root)?;
    let metadata_labels = metadata.get("labels")?.labels()?;
    let creation_timestamp = metadata
        .get("creationTimestamp")?
        .opt_str()?
        .map(str::to_string);
    let annotations_field = metadata.get("annotations")?;
    let annotations = MeshAnnotations::read(&annotations_field)?;
    let node_field = annotations_field.get(NODE_ANNOTATION)?;
    let node = annotations
        .node
        .ok_or_else(|| node_field.error("required: the node this workload runs on"))?;
    let spec = root.get("spec")?;
    spec.only(schema::WORKLOAD_ENTRY_SPEC)?;
    let address_field = spec.get("address")?;
    let address_text = address_field.str()?;
    let address: IpAddr = address_text.parse().map_err(|_| {
        address_field.error(format!(
            "expected an IP address, got {address_text:?} (hostnames and unix sockets are not supported here)"
        ))
    })?;
    let address = usable_address(&address_field, address)?;
    let labels = spec.get("labels")?.labels()?;
    let service_account = service_account(&spec.get("serviceAccount")?)?;
    let mut named_ports = BTreeMap::new();
    for (name, field) in spec.get("ports")?.entries()? {
        named_ports.insert(name.to_string(), field.port()?);
    }
    let tunnel = tunnel_of([&labels, &metadata_labels]);
    Ok(ParsedWorkload {
        workload: Workload {
            uid: format!(
                "Kubernetes/networking.istio.io/WorkloadEntry/{}/{}",
                doc.namespace, doc.name
            ),
            name: doc.name.clone(),
            namespace: doc.namespace.clone(),
            service_account,
            trust_domain: settings.trust_domain.clone(),
            labels,
            addresses: vec![address],
            node,
            tunnel,
            status: annotations.health,
            netns: annotations.netns,
            creation_timestamp,
            authorization_policies: Vec::new(),
            service_ports: Default::default(),
            identity_cache: Default::default(),
        },
        doc: doc.clone(),
        named_ports,
        address_fields: vec![(address, address_field.path().to_string())],
        host_ip_fields: Vec::new(),
    })
}

/// A Kubernetes Service.
pub(crate) fn parse_service(
    raw: &RawDocument,
    settings: &MeshSettings,
) -> Result<ParsedService, MeshError> {
    let doc = &raw.doc;
    let root = root(raw);
    // Like a Pod's, a Service's spec is Kubernetes' own: only the envelope has a schema here.
    let name_field = envelope(&root)?.get("name")?;
    check_dns_1035(&doc.name).map_err(|reason| name_field.error(reason))?;
    let spec = root.get("spec")?;

    let mut vip_fields: Vec<(IpAddr, String)> = Vec::new();
    let cluster_ip = spec.get("clusterIP")?;
    let cluster_ips = spec.get("clusterIPs")?;
    for field in std::iter::once(cluster_ip).chain(cluster_ips.list()?) {
        match field.opt_str()? {
            None | Some("") | Some("None") => {}
            Some(_) => {
                let ip = usable_address(&field, field.ip()?)?;
                if !vip_fields.iter().any(|(known, _)| *known == ip) {
                    vip_fields.push((ip, field.path().to_string()));
                }
            }
        }
    }

    let mut ports = Vec::new();
    let mut named_targets = Vec::new();
    for (index, entry) in spec.get("ports")?.list()?.into_iter().enumerate() {
        let port_field = entry.get("port")?;
        let port = port_field.port()?;
        let name = port_name(&entry.get("name")?)?;
        let target_field = entry.get("targetPort")?;
        let target_port = match target_port(&target_field)? {
            TargetPort::Default => port,
            TargetPort::Number(n) => n,
            TargetPort::Name(target) => {
                named_targets.push(NamedTarget {
                    port_index: index,
                    name: target,
                    field: target_field.path().to_string(),
                });
                0
            }
        };
        push_port(
            &mut ports,
            &port_field,
            ServicePort {
                name,
                port,
                target_port,
            },
        )?;
    }

    let selector = spec.get("selector")?.labels()?;
    let endpoints = if selector.is_empty() {
        Endpoints::None
    } else {
        Endpoints::Selector(selector)
    };
    Ok(ParsedService {
        service: Service {
            name: doc.name.clone(),
            namespace: doc.namespace.clone(),
            hostname: format!(
                "{}.{}.svc.{}",
                doc.name, doc.namespace, settings.cluster_domain
            ),
            vips: vip_fields.iter().map(|(ip, _)| *ip).collect(),
            ports,
            endpoints,
            subject_alt_names: Vec::new(),
            external: false,
        },
        doc: doc.clone(),
        named_targets,
        vip_fields,
        host_field: "metadata.name".into(),
        endpoint_fields: Vec::new(),
    })
}

/// An Istio ServiceEntry: one service per host, sharing addresses, ports and endpoints.
pub(crate) fn parse_service_entry(raw: &RawDocument) -> Result<Vec<ParsedService>, MeshError> {
    let doc = &raw.doc;
    let root = root(raw);
    envelope(&root)?;
    let spec = root.get("spec")?;
    spec.only(schema::SERVICE_ENTRY_SPEC)?;

    let hosts_field = spec.get("hosts")?;
    let hosts = hosts_field.list()?;
    if hosts.is_empty() {
        return Err(hosts_field.error("required: at least one host"));
    }

    let mut vip_fields: Vec<(IpAddr, String)> = Vec::new();
    for field in spec.get("addresses")?.list()? {
        let ip = entry_address(&field)?;
        if !vip_fields.iter().any(|(known, _)| *known == ip) {
            vip_fields.push((ip, field.path().to_string()));
        }
    }

    let mut ports = Vec::new();
    for entry in spec.get("ports")?.list()? {
        entry.only(schema::SERVICE_ENTRY_PORT)?;
        let number_field = entry.get("number")?;
        let port = number_field.port()?;
        let name = port_name(&entry.get("name")?)?;
        let target_port = entry.get("targetPort")?.opt_port()?.unwrap_or(port);
        push_port(
            &mut ports,
            &number_field,
            ServicePort {
                name,
                port,
                target_port,
            },
        )?;
    }

    let location = spec.get("location")?;
    let external = match location.opt_str()? {
        None | Some("MESH_INTERNAL") => false,
        Some("MESH_EXTERNAL") => true,
        Some(other) => {
            return Err(location.error(format!(
                "expected MESH_INTERNAL or MESH_EXTERNAL, got {other:?}"
            )));
        }
    };
    let resolution = spec.get("resolution")?;
    if let Some(mode) = resolution.opt_str()?
        && !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(&mode)
    {
        return Err(resolution.error(format!(
            "expected NONE, STATIC, DNS or DNS_ROUND_ROBIN, got {mode:?}"
        )));
    }

    let selector_field = spec.get("workloadSelector")?;
    let endpoints_field = spec.get("endpoints")?;
    selector_field.only(&["labels"])?;
    let mut endpoint_fields: Vec<(IpAddr, String)> = Vec::new();
    for entry in endpoints_field.list()? {
        entry.only(schema::WORKLOAD_ENTRY_SPEC)?;
        let address_field = entry.get("address")?;
        let text = address_field.str()?;
        let ip: IpAddr = text.parse().map_err(|_| {
            address_field.error(format!(
                "expected an IP address, got {text:?} (DNS and unix-socket endpoints are not supported here)"
            ))
        })?;
        let ip = usable_address(&address_field, ip)?;
        if !endpoint_fields.iter().any(|(known, _)| *known == ip) {
            endpoint_fields.push((ip, address_field.path().to_string()));
        }
    }
    let addresses: Vec<IpAddr> = endpoint_fields.iter().map(|(ip, _)| *ip).collect();
    let endpoints = if !selector_field.is_absent() {
        if !addresses.is_empty() {
            return Err(endpoints_field.error("cannot be combined with spec.workloadSelector"));
        }
        Endpoints::Selector(selector_field.get("labels")?.labels()?)
    } else if !addresses.is_empty() {
        Endpoints::Addresses(addresses)
    } else {
        Endpoints::None
    };

    let mut subject_alt_names = Vec::new();
    for field in spec.get("subjectAltNames")?.list()? {
        let text = field.str()?;
        let id: SpiffeId = text
            .parse()
            .map_err(|e| field.error(format!("not a SPIFFE id ztund accepts: {e}")))?;
        subject_alt_names.push(id);
    }

    let mut services: Vec<ParsedService> = Vec::new();
    for field in hosts {
        let host = field.str()?;
        check_host(host).map_err(|reason| field.error(reason))?;
        if services.iter().any(|s| s.service.hostname == host) {
            return Err(field.error(format!("host {host:?} is listed twice")));
        }
        services.push(ParsedService {
            service: Service {
                name: doc.name.clone(),
                namespace: doc.namespace.clone(),
                hostname: host.to_string(),
                vips: vip_fields.iter().map(|(ip, _)| *ip).collect(),
                ports: ports.clone(),
                endpoints: endpoints.clone(),
                subject_alt_names: subject_alt_names.clone(),
                external,
            },
            doc: doc.clone(),
            named_targets: Vec::new(),
            vip_fields: vip_fields.clone(),
            host_field: field.path().to_string(),
            endpoint_fields: endpoint_fields.clone(),
        });
    }
    Ok(services)
}

/// Checks the top level and `metadata` of a document against their schemas; returns metadata.
fn envelope<'a>(root: &Field<'a>) -> Result<Field<'a>, MeshError> {
    root.only(schema::ENVELOPE)?;
    let metadata = root.get("metadata")?;
    metadata.only(schema::OBJECT_META)?;
    Ok(metadata)
}

/// The annotations ztund reads on workloads.
struct MeshAnnotations {
    netns: Option<String>,
    health: HealthStatus,
    node: Option<String>,
}

impl MeshAnnotations {
    fn read(annotations: &Field<'_>) -> Result<MeshAnnotations, MeshError> {
        annotations.annotations()?;
        let netns_field = annotations.get(NETNS_ANNOTATION)?;
        let netns = match netns_field.opt_str()? {
            None => None,
            Some(text) => Some(netns_path(text).map_err(|reason| netns_field.error(reason))?),
        };
        let health_field = annotations.get(HEALTH_ANNOTATION)?;
        let health = match health_field.opt_str()? {
            None | Some("healthy") => HealthStatus::Healthy,
            Some("unhealthy") => HealthStatus::Unhealthy,
            Some(other) => {
                return Err(
                    health_field.error(format!("expected healthy or unhealthy, got {other:?}"))
                );
            }
        };
        let node_field = annotations.get(NODE_ANNOTATION)?;
        let node = match node_field.opt_str()? {
            None => None,
            Some(node) => {
                check_dns_subdomain(node).map_err(|reason| node_field.error(reason))?;
                Some(node.to_string())
            }
        };
        Ok(MeshAnnotations {
            netns,
            health,
            node,
        })
    }
}

/// A netns annotation as a path: a bare name lives under /var/run/netns (`ip netns add NAME`).
fn netns_path(text: &str) -> Result<String, NameError> {
    if text.starts_with('/') {
        return Ok(text.to_string());
    }
    if text.is_empty() || text.contains('/') || text == "." || text == ".." || text.contains('\0') {
        return Err(NameError::NotNetns {
            dir: NETNS_DIR,
            text: text.to_string(),
        });
    }
    Ok(format!("{NETNS_DIR}/{text}"))
}

/// HBONE unless the workload opted out with Istio's label.
fn tunnel_of<const N: usize>(label_sets: [&Labels; N]) -> TunnelProtocol {
    let opted_out = label_sets
        .iter()
        .any(|labels| labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none"));
    if opted_out {
        TunnelProtocol::None
    } else {
        TunnelProtocol::Hbone
    }
}

fn service_account(field: &Field<'_>) -> Result<String, MeshError> {
    match field.opt_str()? {
        None | Some("") => Ok("default".into()),
        Some(name) => {
            check_dns_subdomain(name).map_err(|reason| field.error(reason))?;
            Ok(name.to_string())
        }
    }
}

/// Named container ports of every container; the first container to name a port wins.
fn container_ports(spec: &Field<'_>) -> Result<BTreeMap<String, u16>, MeshError> {
    let mut named = BTreeMap::new();
    for container in spec.get("containers")?.list()? {
        for port in container.get("ports")?.list()? {
            let number = port.get("containerPort")?.port()?;
            let name_field = port.get("name")?;
            if let Some(name) = name_field.opt_str()? {
                if !is_port_name(name) {
                    return Err(name_field.error(format!(
                        "{name:?} is not a port name (at most 15 lowercase letters, digits and '-', with a letter)"
                    )));
                }
                named.entry(name.to_string()).or_insert(number);
            }
        }
    }
    Ok(named)
}

fn port_name(field: &Field<'_>) -> Result<Option<String>, MeshError> {
    match field.opt_str()? {
        None => Ok(None),
        Some(name) => {
            check_dns_label(name).map_err(|reason| field.error(reason))?;
            Ok(Some(name.to_string()))
        }
    }
}

fn push_port(
    ports: &mut Vec<ServicePort>,
    field: &Field<'_>,
    port: ServicePort,
) -> Result<(), MeshError> {
    if ports.iter().any(|p| p.port == port.port) {
        return Err(field.error(format!("port {} is listed twice", port.port)));
    }
    ports.push(port);
    Ok(())
}

enum TargetPort {
    Default,
    Number(u16),
    Name(String),
}

/// Kubernetes' int-or-string: a number, or the name of a container port.
fn target_port(field: &Field<'_>) -> Result<TargetPort, MeshError> {
    if field.is_absent() {
        return Ok(TargetPort::Default);
    }
    if let Some(number) = field.opt_port().ok().flatten() {
        return Ok(TargetPort::Number(number));
    }
    match field.opt_str() {
        Ok(Some(name)) if is_port_name(name) => Ok(TargetPort::Name(name.to_string())),
        Ok(Some(text)) => Err(field.error(format!(
            "expected a port number 1-65535 or a port name, got {text:?}"
        ))),
        _ => field.port().map(TargetPort::Number),
    }
}

/// Kubernetes Service names are DNS-1035 labels: a DNS-1123 label that starts with a letter.
fn check_dns_1035(name: &str) -> Result<(), NameError> {
    check_dns_label(name)?;
    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(NameError::NotDns1035(name.to_string()))
    }
}

/// A ServiceEntry host: a DNS name, optionally with a leading `*.` wildcard.
fn check_host(host: &str) -> Result<(), NameError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    check_dns_subdomain(name).map_err(|_| NameError::NotHost(host.to_string()))
}
