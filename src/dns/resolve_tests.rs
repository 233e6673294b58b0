//! The resolver's answers, name by name, from a mesh written as a mesh file.

use std::net::IpAddr;
use std::sync::Arc;

use super::resolve::{Lookup, MeshResolver};
use crate::mesh::{MeshSettings, Snapshot, snapshot_from_text};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.20, clusterIPs: [10.96.0.20, "fd00:96::20"], ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec: {clusterIP: 10.96.0.21, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-1}
status: {podIP: 10.0.0.7}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: shop}
spec:
  hosts: [pay.example.com, "*.pay.example.com"]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 203.0.113.5}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.partner.example, "*.wild.example"]
  ports: [{number: 443, name: https}]
  resolution: DNS
"#;

fn snapshot() -> Arc<Snapshot> {
    let settings = MeshSettings {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    };
    Arc::new(snapshot_from_text("mesh.yaml", MESH, &settings).expect("test mesh parses"))
}

fn ips(list: &[&str]) -> Lookup {
    Lookup::Mesh(
        list.iter()
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .collect(),
    )
}

#[test]
fn service_names_and_their_search_forms_resolve_for_the_asking_namespace() {
    let (snapshot, resolver) = (snapshot(), MeshResolver::new("cluster.local"));
    let shop = Some("shop");
    let reviews = ips(&["10.96.0.20", "fd00:96::20"]);
    for name in [
        "reviews.shop.svc.cluster.local",
        "reviews.shop.svc.cluster.local.",
        "Reviews.Shop.Svc.Cluster.Local",
        "reviews.shop",
        "reviews.shop.svc",
        "reviews",
        // What `reviews.shop` becomes after the pod's first search domain.
        "reviews.shop.shop.svc.cluster.local",
        "reviews.shop.svc.cluster.local.cluster.local",
    ] {
        assert_eq!(resolver.lookup(&snapshot, name, shop), reviews, "{name}");
    }
    assert_eq!(
        resolver.lookup(&snapshot, "reviews", Some("other")),
        ips(&["10.96.0.21"])
    );
    assert_eq!(
        resolver.lookup(&snapshot, "reviews.other", shop),
        ips(&["10.96.0.21"])
    );
    // A bare name needs the pod's namespace.
    assert_eq!(resolver.lookup(&snapshot, "reviews", None), Lookup::NotMesh);
}

#[test]
fn a_headless_service_answers_with_its_endpoints() {
    let (snapshot, resolver) = (snapshot(), MeshResolver::new("cluster.local"));
    assert_eq!(
        resolver.lookup(&snapshot, "db.shop", Some("shop")),
        ips(&["10.0.0.7"])
    );
}

#[test]
fn service_entry_hosts_and_wildcards_resolve_and_other_names_are_not_ours() {
    let (snapshot, resolver) = (snapshot(), MeshResolver::new("cluster.local"));
    let pay = ips(&["240.0.0.1"]);
    for name in [
        "pay.example.com",
        "eu.pay.example.com",
        "a.b.pay.example.com",
        "pay.example.com.shop.svc.cluster.local",
    ] {
        assert_eq!(
            resolver.lookup(&snapshot, name, Some("shop")),
            pay,
            "{name}"
        );
    }
    for name in [
        "example.com",
        "xpay.example.com",
        "kubernetes.default.svc.cluster.local",
        "nope.shop",
        "wild.example",
    ] {
        assert_eq!(
            resolver.lookup(&snapshot, name, Some("shop")),
            Lookup::NotMesh,
            "{name}"
        );
    }
}

#[test]
fn hosts_without_addresses_get_stable_auto_allocated_vips() {
    let (snapshot, resolver) = (snapshot(), MeshResolver::new("cluster.local"));
    let Lookup::Mesh(api) = resolver.lookup(&snapshot, "api.partner.example", None) else {
        panic!("api.partner.example is a mesh host");
    };
    let vip = resolver.auto_vip(&snapshot, "api.partner.example").unwrap();
    assert_eq!(api, vip.addresses().to_vec());
    // Another resolver on another node, with a fresh copy of the mesh, agrees.
    let elsewhere =
        MeshResolver::new("cluster.local").auto_vip(&self::snapshot(), "api.partner.example");
    assert_eq!(elsewhere, Some(vip));
    // A wildcard host without addresses: every subdomain shares the host's VIP.
    let wild = resolver.auto_vip(&snapshot, "*.wild.example").unwrap();
    assert_eq!(
        resolver.lookup(&snapshot, "x.y.wild.example", None),
        Lookup::Mesh(wild.addresses().to_vec())
    );
    assert_ne!(wild, vip);
}

/// The address answered for a host without addresses is the one the outbound path routes: a
/// connection to either VIP goes to the ServiceEntry's workload through HBONE, with the
/// workload's identity expected; a headless Kubernetes Service gets no VIP.
#[test]
fn an_answered_auto_vip_is_routed_like_the_service_entrys_own_address() {
    use std::net::SocketAddr;

    use crate::proxy::route::{Plan, plan};

    let mesh = r#"
apiVersion: v1
kind: Pod
metadata: {name: partner-0, namespace: shop, labels: {app: partner}}
spec: {nodeName: node-2, serviceAccountName: partner-sa}
status: {podIP: 10.0.0.9}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: [api.partner.example]
  ports: [{number: 443, name: https, targetPort: 8443}]
  resolution: STATIC
  workloadSelector: {labels: {app: partner}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
"#;
    let settings = MeshSettings {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
    };
    let snapshot = Arc::new(snapshot_from_text("mesh.yaml", mesh, &settings).unwrap());
    let resolver = MeshResolver::new("cluster.local");
    let Lookup::Mesh(answer) = resolver.lookup(&snapshot, "api.partner.example", Some("shop"))
    else {
        panic!("api.partner.example is a mesh host");
    };
    assert_eq!(answer.len(), 2, "{answer:?}");
    for ip in answer {
        match plan(&snapshot, Some("shop"), SocketAddr::new(ip, 443), 15008) {
            Plan::Hbone {
                authority,
                expected,
                service,
                ..
            } => {
                assert_eq!(authority, "10.0.0.9:8443".parse().unwrap(), "{ip}");
                let expected: Vec<String> = expected.iter().map(|id| id.to_string()).collect();
                assert_eq!(expected, ["spiffe://cluster.local/ns/shop/sa/partner-sa"]);
                assert_eq!(service.unwrap().hostname, "api.partner.example");
            }
            other => panic!("{ip}: {other:?}"),
        }
    }
    assert_eq!(snapshot.auto_vip("db.shop.svc.cluster.local"), None);
}
