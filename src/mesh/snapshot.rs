//! One immutable view of the mesh with the lookups the data path needs, and the store that swaps
//! it atomically. Readers never lock: they load an `Arc<Snapshot>` and keep it for a connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::model::{Endpoints, HealthStatus, Service, Workload};
use super::vip::{self, AutoVip};
use crate::policy::PolicySet;

/// Everything ztund knows about the mesh at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    workload_by_uid: HashMap<String, Arc<Workload>>,
    /// Workloads per node name: "who runs here" is asked per connection on loopback clients.
    workloads_by_node: HashMap<String, Vec<Arc<Workload>>>,
    /// Declared VIPs and the auto-allocated ones, so a connection to an address the DNS proxy
    /// answered is routed like one to the ServiceEntry's own addresses.
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// The auto-allocated VIPs by lowercase hostname ([`vip`]); empty for services with VIPs.
    auto_vips: HashMap<String, AutoVip>,
    services_by_hostname: HashMap<String, Vec<Arc<Service>>>,
    /// Endpoints of each service by namespace, then hostname: looked up per connection without
    /// building a `namespace/hostname` key.
    endpoints: HashMap<String, HashMap<String, Vec<Arc<Workload>>>>,
    /// The policy documents in force with this view.
    pub policies: PolicySet,
    /// Bumped on every swap; lets logs and tests tell snapshots apart.
    pub generation: u64,
}

impl Snapshot {
    /// Indexes workloads and services; endpoints are resolved here once, not per connection.
    pub fn build(workloads: Vec<Workload>, services: Vec<Service>, policies: PolicySet) -> Self {
        let workloads: Vec<Arc<Workload>> = workloads
            .into_iter()
            .map(|mut workload| {
                workload.cache_identity();
                Arc::new(workload)
            })
            .collect();
        let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
        let mut snapshot = Snapshot {
            policies,
            ..Default::default()
        };
        for workload in &workloads {
            for ip in &workload.addresses {
                snapshot
                    .workload_by_ip
                    .insert(ip.to_canonical(), workload.clone());
            }
            snapshot
                .workload_by_uid
                .insert(workload.uid.clone(), workload.clone());
            snapshot
                .workloads_by_node
                .entry(workload.node.clone())
                .or_default()
                .push(workload.clone());
        }
        for service in &services {
            for vip in &service.vips {
                snapshot
                    .service_by_vip
                    .insert(vip.to_canonical(), service.clone());
            }
            snapshot
                .services_by_hostname
                .entry(service.hostname.clone())
                .or_default()
                .push(service.clone());
            let members: Vec<Arc<Workload>> = match &service.endpoints {
                Endpoints::Selector(selector) => workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == service.namespace
                            && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .cloned()
                    .collect(),
                Endpoints::Addresses(ips) => ips
                    .iter()
                    .filter_map(|ip| snapshot.workload_by_ip.get(ip).cloned())
                    .collect(),
                Endpoints::None => Vec::new(),
                Endpoints::Listed => {
                    let key = service_key(service);
                    workloads
                        .iter()
                        .filter(|w| w.service_ports.contains_key(&key))
                        .cloned()
                        .collect()
                }
            };
            snapshot
                .endpoints
                .entry(service.namespace.clone())
                .or_default()
                .insert(service.hostname.clone(), members);
        }
        snapshot.allocate_vips(&services);
        snapshot.workloads = workloads;
        snapshot.services = services;
        snapshot
    }

    /// Gives ServiceEntry hosts without addresses their VIPs and indexes them like declared
    /// ones. The allocation depends on the services alone, so every node computes the same.
    fn allocate_vips(&mut self, services: &[Arc<Service>]) {
        let wanting: Vec<(String, &Arc<Service>)> = services
            .iter()
            .filter(|s| wants_auto_vip(s))
            .map(|s| (s.hostname.to_ascii_lowercase(), s))
            .collect();
        if wanting.is_empty() {
            return;
        }
        let declared = services.iter().flat_map(|s| s.vips.iter().copied());
        self.auto_vips = vip::allocate(wanting.iter().map(|(host, _)| host.as_str()), declared);
        // The same host in two namespaces shares its VIP; the first listed owns the route, as
        // a declared VIP listed twice does.
        for (host, service) in &wanting {
            if let Some(vip) = self.auto_vips.get(host) {
                for ip in vip.addresses() {
                    self.service_by_vip
                        .entry(ip)
                        .or_insert_with(|| (*service).clone());
                }
            }
        }
    }

    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        // Keys are canonical: a v4 peer seen on a dual-stack socket is found by its v4 address.
        self.workload_by_ip.get(&ip.to_canonical())
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workload_by_uid.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip.to_canonical())
    }

    /// Every service VIP, declared and auto-allocated (canonical: v4-mapped ones as IPv4).
    pub fn service_vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.service_by_vip.keys().copied()
    }

    /// The auto-allocated VIPs of a ServiceEntry host without addresses (any case; a wildcard
    /// host as written, `*.example.com`).
    pub fn auto_vip(&self, hostname: &str) -> Option<AutoVip> {
        if self.auto_vips.is_empty() {
            return None;
        }
        self.auto_vips
            .get(hostname.to_ascii_lowercase().as_str())
            .copied()
    }

    /// A service by hostname; with several of the same name, the one in the client's namespace.
    pub fn service_by_hostname(
        &self,
        hostname: &str,
        client_namespace: &str,
    ) -> Option<&Arc<Service>> {
        let candidates = self.services_by_hostname.get(hostname)?;
        candidates
            .iter()
            .find(|s| s.namespace == client_namespace)
            .or_else(|| candidates.first())
    }

    /// Every workload that backs the service, healthy or not.
    pub fn endpoints(&self, service: &Service) -> &[Arc<Workload>] {
        self.endpoints
            .get(&service.namespace)
            .and_then(|by_host| by_host.get(&service.hostname))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Healthy endpoints only: the ones a new connection may be sent to.
    pub fn healthy_endpoints<'a>(
        &'a self,
        service: &Service,
    ) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.endpoints(service)
            .iter()
            .filter(|w| w.status == HealthStatus::Healthy)
    }

    /// Services a workload belongs to.
    pub fn services_of<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Arc<Service>> {
        self.services
            .iter()
            .filter(move |s| self.endpoints(s).iter().any(|w| w.uid == workload.uid))
    }

    /// Workloads that run on the named node.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads_by_node
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
    }
}

/// A service without VIPs that is not a Kubernetes Service: a ServiceEntry host, which gets
/// an auto-allocated VIP. A Kubernetes Service without a VIP is headless (its endpoints'
/// addresses are its DNS answer) and its hostname is always `<name>.<namespace>.svc.<domain>`,
/// whatever the cluster domain, from the mesh file and from istiod alike.
fn wants_auto_vip(service: &Service) -> bool {
    if !service.vips.is_empty() {
        return false;
    }
    let host = service.hostname.to_ascii_lowercase();
    let mut labels = host.split('.');
    let kubernetes = labels.next() == Some(service.name.to_ascii_lowercase().as_str())
        && labels.next() == Some(service.namespace.to_ascii_lowercase().as_str())
        && labels.next() == Some("svc")
        && labels.next().is_some();
    !kubernetes
}

/// `namespace/hostname`, the key Istio uses for services.
pub fn service_key(service: &Service) -> String {
    format!("{}/{}", service.namespace, service.hostname)
}

/// Holds the current snapshot; swaps are atomic and announced to watchers.
#[derive(Debug)]
pub struct MeshStore {
    current: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
}

impl MeshStore {
    pub fn new(initial: Snapshot) -> Self {
        let (changes, _) = watch::channel(initial.generation);
        MeshStore {
            current: ArcSwap::from_pointee(initial),
            changes,
        }
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot, giving it the next generation number, and wakes watchers.
    pub fn replace(&self, mut next: Snapshot) {
        let generation = self.current.load().generation + 1;
        next.generation = generation;
        self.current.store(Arc::new(next));
        self.changes.send_replace(generation);
    }

    /// A receiver that changes whenever the snapshot is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::mesh::model::ServicePort;
    use crate::policy::tests::{policies, workload};

    fn service(namespace: &str, hostname: &str, app: &str) -> Service {
        Service {
            name: hostname.split('.').next().unwrap_or(hostname).to_string(),
            namespace: namespace.to_string(),
            hostname: hostname.to_string(),
            vips: vec![],
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: 8080,
            }],
            endpoints: Endpoints::Selector([("app".to_string(), app.to_string())].into()),
            subject_alt_names: vec![],
            external: false,
        }
    }

    #[test]
    fn a_snapshot_workload_lends_its_identity_and_a_changed_clone_reports_its_own() {
        let echo = workload("default", "echo", "echo-sa", "10.0.0.2", "app=echo");
        let snapshot = Snapshot::build(vec![echo], vec![], policies(""));
        let indexed = &snapshot.workloads()[0];
        assert!(matches!(indexed.identity_ref(), Cow::Borrowed(_)));
        assert_eq!(
            indexed.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/echo-sa"
        );

        let mut moved = Workload::clone(indexed);
        moved.service_account = "other-sa".into();
        assert!(matches!(moved.identity_ref(), Cow::Owned(_)));
        assert_eq!(
            moved.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/other-sa"
        );
    }

    /// A v4 peer on a dual-stack socket shows as `::ffff:a.b.c.d`: found as a.b.c.d, and a
    /// dual-stack workload or service by either of its addresses.
    #[test]
    fn lookups_by_address_are_dual_stack_and_canonical() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let mut echo = workload("default", "echo", "echo", "10.0.0.2", "app=echo");
        echo.addresses.push(ip("fd00::2"));
        let mut web = service("default", "web.default.svc.cluster.local", "echo");
        web.vips = vec![ip("10.96.0.1"), ip("fd00:96::1")];
        let snapshot = Snapshot::build(vec![echo], vec![web], policies(""));
        for address in ["10.0.0.2", "::ffff:10.0.0.2", "fd00::2"] {
            let found = snapshot
                .workload_by_ip(ip(address))
                .map(|w| w.name.as_str());
            assert_eq!(found, Some("echo"), "{address}");
        }
        for vip in ["10.96.0.1", "::ffff:10.96.0.1", "fd00:96::1"] {
            assert!(snapshot.service_by_vip(ip(vip)).is_some(), "{vip}");
        }
        assert!(snapshot.workload_by_ip(ip("fd00::3")).is_none());
    }

    #[test]
    fn a_listed_endpoint_dials_its_own_target_port_for_its_service_only() {
        let mut echo = workload("default", "echo", "echo", "10.0.0.2", "app=echo");
        echo.service_ports.insert(
            "default/echo.default.svc.cluster.local".into(),
            [(80, 9090)].into(),
        );
        let own = service("default", "echo.default.svc.cluster.local", "echo");
        let same_host_elsewhere = service("other", "echo.default.svc.cluster.local", "echo");
        let port = &own.ports[0];
        assert_eq!(echo.target_port(&own, port), 9090);
        assert_eq!(echo.target_port(&same_host_elsewhere, port), 8080);
        let prefix = service("default", "echo.default.svc", "echo");
        assert_eq!(echo.target_port(&prefix, port), 8080);
    }

    #[test]
    fn endpoints_are_found_by_namespace_and_hostname() {
        let echo = workload("default", "echo", "echo", "10.0.0.2", "app=echo");
        let other = workload("other", "echo", "echo", "10.0.0.3", "app=echo");
        let services = vec![
            service("default", "echo.default.svc.cluster.local", "echo"),
            // The same hostname in another namespace is another service.
            service("other", "echo.default.svc.cluster.local", "echo"),
            service("default", "web.default.svc.cluster.local", "web"),
        ];
        let snapshot = Snapshot::build(vec![echo, other], services, policies(""));
        let names = |i: usize| -> Vec<String> {
            let service = &snapshot.services()[i];
            snapshot
                .endpoints(service)
                .iter()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect()
        };
        assert_eq!(names(0), ["default/echo"]);
        assert_eq!(names(1), ["other/echo"]);
        assert!(names(2).is_empty());
        let unknown = service("default", "nope.default.svc.cluster.local", "echo");
        assert!(snapshot.endpoints(&unknown).is_empty());
    }
}
