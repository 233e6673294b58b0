//! Which names the mesh owns and their addresses, from the current [`Snapshot`]: Service
//! hostnames (with the short forms a pod's resolv.conf search list produces), ServiceEntry
//! hosts, wildcard hosts. Pure: (snapshot, name, asking pod's namespace) → addresses or "not
//! ours". A name that is not ours is forwarded by the server, never answered NXDOMAIN here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::vip::{self, AutoVip};
use crate::mesh::{Service, Snapshot};

/// What the mesh says about one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The mesh owns the name: these addresses (possibly none of the asked family).
    Mesh(Vec<IpAddr>),
    /// Not a mesh name: ask upstream.
    NotMesh,
}

/// What is derived once per snapshot: the wildcard hosts (most specific first) and the
/// auto-allocated VIPs.
#[derive(Debug, Default)]
struct Derived {
    /// `(suffix after "*", service)`, longest suffix first: `.pay.example.com`.
    wildcards: Vec<(String, Arc<Service>)>,
    auto_vips: HashMap<String, AutoVip>,
}

impl Derived {
    fn build(snapshot: &Snapshot, domain: &str) -> Derived {
        let mut wildcards: Vec<(String, Arc<Service>)> = snapshot
            .services()
            .iter()
            .filter_map(|s| {
                let suffix = s.hostname.strip_prefix('*')?;
                Some((suffix.to_ascii_lowercase(), s.clone()))
            })
            .collect();
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let declared = snapshot
            .services()
            .iter()
            .flat_map(|s| s.vips.iter().copied());
        let wanting: Vec<String> = snapshot
            .services()
            .iter()
            .filter(|s| needs_auto_vip(s, domain))
            .map(|s| s.hostname.to_ascii_lowercase())
            .collect();
        let auto_vips = vip::allocate(wanting.iter().map(String::as_str), declared);
        Derived {
            wildcards,
            auto_vips,
        }
    }
}

/// A ServiceEntry host without addresses gets an auto-allocated VIP; a Kubernetes Service
/// without a VIP is headless (its endpoints' addresses are the answer).
fn needs_auto_vip(service: &Service, domain: &str) -> bool {
    service.vips.is_empty() && !is_cluster_service(&service.hostname, domain)
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
        let derived = Arc::new(Derived::build(snapshot, &self.domain));
        *cache = Some((snapshot.clone(), derived.clone()));
        derived
    }

    /// The auto-allocated VIPs of `snapshot`'s ServiceEntry hosts without addresses.
    pub fn auto_vip(&self, snapshot: &Arc<Snapshot>, host: &str) -> Option<AutoVip> {
        self.derived(snapshot).auto_vips.get(host).copied()
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
                return Lookup::Mesh(self.addresses(snapshot, &derived, service));
            }
            let wildcard = derived
                .wildcards
                .iter()
                .find(|(suffix, _)| candidate.len() > suffix.len() && candidate.ends_with(suffix));
            if let Some((_, service)) = wildcard {
                return Lookup::Mesh(self.addresses(snapshot, &derived, service));
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

    /// Declared VIPs; else a headless Service's endpoints; else the auto-allocated VIPs.
    fn addresses(&self, snapshot: &Snapshot, derived: &Derived, service: &Service) -> Vec<IpAddr> {
        if !service.vips.is_empty() {
            return service.vips.clone();
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
        derived
            .auto_vips
            .get(&service.hostname.to_ascii_lowercase())
            .map(|v| v.addresses().to_vec())
            .unwrap_or_default()
    }
}
