//! Which names the mesh owns and their addresses, from the current [`Snapshot`]: Service
//! hostnames (with the short forms a pod's resolv.conf search list produces), ServiceEntry
//! hosts, wildcard hosts. Pure: (snapshot, name, asking pod's namespace) → addresses or "not
//! ours". A name that is not ours is forwarded by the server, never answered NXDOMAIN here.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::vip::AutoVip;
use crate::mesh::{Service, Snapshot};

/// What the mesh says about one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The mesh owns the name: these addresses (possibly none of the asked family).
    Mesh(Vec<IpAddr>),
    /// Not a mesh name: ask upstream.
    NotMesh,
}

/// What is derived once per snapshot: the wildcard hosts (most specific first). The
/// auto-allocated VIPs come with the snapshot itself ([`Snapshot::auto_vip`]), so the outbound
/// path routes exactly what is answered here.
#[derive(Debug, Default)]
struct Derived {
    /// `(suffix after "*", service)`, longest suffix first: `.pay.example.com`.
    wildcards: Vec<(String, Arc<Service>)>,
}

impl Derived {
    fn build(snapshot: &Snapshot) -> Derived {
        let mut wildcards: Vec<(String, Arc<Service>)> = snapshot
            .services()
            .iter()
            .filter_map(|s| {
                let suffix = s.hostname.strip_prefix('*')?;
                Some((suffix.to_ascii_lowercase(), s.clone()))
            })
            .collect();
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Derived { wildcards }
    }
}

fn is_cluster_service(hostname: &str, domain: &str) -> bool {
    hostname
        .strip_suffix(domain)
        .and_then(|rest| rest.strip_suffix('.'))
        .is_some_and(|rest| rest.ends_with(".svc"))
}

/// Answers names from the mesh; one per node, shared by every pod's DNS server.
#[derive(Debug)]
pub struct MeshResolver {
    domain: String,
    /// The snapshot [`Derived`] was built from (held, so its address is not reused).
    cache: Mutex<Option<(Arc<Snapshot>, Arc<Derived>)>>,
}

impl MeshResolver {
    /// A resolver for the cluster domain `domain` (`cluster.local`).
    pub fn new(domain: &str) -> MeshResolver {
        MeshResolver {
            domain: domain.trim_matches('.').to_ascii_lowercase(),
            cache: Mutex::new(None),
        }
    }

    fn derived(&self, snapshot: &Arc<Snapshot>) -> Arc<Derived> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((held, derived)) = cache.as_ref()
            && Arc::ptr_eq(held, snapshot)
        {
            return derived.clone();
        }
        let derived = Arc::new(Derived::build(snapshot));
        *cache = Some((snapshot.clone(), derived.clone()));
        derived
    }

    /// The auto-allocated VIPs of `snapshot`'s ServiceEntry hosts without addresses.
    pub fn auto_vip(&self, snapshot: &Arc<Snapshot>, host: &str) -> Option<AutoVip> {
        snapshot.auto_vip(host)
    }

    /// Looks `name` up (any case, with or without the final dot) for a pod in `namespace`.
    pub fn lookup(&self, snapshot: &Arc<Snapshot>, name: &str, namespace: Option<&str>) -> Lookup {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Lookup::NotMesh;
        }
        let derived = self.derived(snapshot);
        let ns = namespace.unwrap_or("default");
        for candidate in self.candidates(&name, namespace) {
            if let Some(service) = snapshot.service_by_hostname(&candidate, ns) {
                return Lookup::Mesh(self.addresses(snapshot, service));
            }
            let wildcard = derived
                .wildcards
                .iter()
                .find(|(suffix, _)| candidate.len() > suffix.len() && candidate.ends_with(suffix));
            if let Some((_, service)) = wildcard {
                return Lookup::Mesh(self.addresses(snapshot, service));
            }
        }
        Lookup::NotMesh
    }

    /// The full names `name` may stand for, most literal first: itself; its short forms
    /// (`svc` → `svc.<ns>.svc.<domain>`, `svc.ns` and `svc.ns.svc` → `… .svc.<domain>`); and the
    /// same after stripping a search domain the pod's resolver appended
    /// (`pay.example.com.<ns>.svc.cluster.local` → `pay.example.com`).
    fn candidates(&self, name: &str, namespace: Option<&str>) -> Vec<String> {
        let mut out = Vec::with_capacity(8);
        self.short_forms(name, namespace, &mut out);
        let mut search = vec![format!("svc.{}", self.domain), self.domain.clone()];
        if let Some(ns) = namespace {
            search.insert(0, format!("{ns}.svc.{}", self.domain));
        }
        for suffix in &search {
            if let Some(rest) = name
                .strip_suffix(suffix.as_str())
                .and_then(|r| r.strip_suffix('.'))
                && !rest.is_empty()
            {
                self.short_forms(rest, namespace, &mut out);
            }
        }
        out.dedup();
        out
    }

    fn short_forms(&self, name: &str, namespace: Option<&str>, out: &mut Vec<String>) {
        out.push(name.to_string());
        let labels = name.split('.').count();
        let domain = &self.domain;
        match (labels, namespace) {
            (1, Some(ns)) => out.push(format!("{name}.{ns}.svc.{domain}")),
            (2, _) => out.push(format!("{name}.svc.{domain}")),
            (3, _) if name.ends_with(".svc") => out.push(format!("{name}.{domain}")),
            _ => {}
        }
    }

    /// Declared VIPs; else the auto-allocated VIPs; else a headless Service's endpoints.
    fn addresses(&self, snapshot: &Snapshot, service: &Service) -> Vec<IpAddr> {
        if !service.vips.is_empty() {
            return service.vips.clone();
        }
        if let Some(vip) = snapshot.auto_vip(&service.hostname) {
            return vip.addresses().to_vec();
        }
        if is_cluster_service(&service.hostname, &self.domain) {
            let mut ips: Vec<IpAddr> = snapshot
                .healthy_endpoints(service)
                .flat_map(|w| w.addresses.iter().copied())
                .collect();
            ips.sort_unstable();
            ips.dedup();
            return ips;
        }
        Vec::new()
    }
}
