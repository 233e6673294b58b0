//! Golden output of `ztund check` for a small mesh: two namespaces, a STRICT mesh with one
//! PERMISSIVE port, an ALLOW and a DENY policy, and DestinationRules.

use super::report;
use crate::mesh::{Endpoints, Service, ServicePort, Snapshot};
use crate::policy::tests::{ROOT, documents, workload};

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: global-mtls, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: metrics, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  portLevelMtls: {9100: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-legacy, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy-plain, namespace: legacy}
spec:
  host: old.legacy.svc.cluster.local
  trafficPolicy:
    tls: {mode: DISABLE}
    portLevelSettings: [{port: {number: 443}, tls: {mode: SIMPLE, sni: old.example}}]
";

fn service(ns: &str, name: &str, ports: &[(u16, u16)], app: &str) -> Service {
    Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        vips: vec![],
        ports: ports
            .iter()
            .map(|(port, target_port)| ServicePort {
                name: None,
                port: *port,
                target_port: *target_port,
            })
            .collect(),
        endpoints: Endpoints::Selector([("app".to_string(), app.to_string())].into()),
        subject_alt_names: vec![],
        external: false,
    }
}

const GOLDEN: &str = "\
root namespace: istio-system

workload legacy/old-1 (spiffe://cluster.local/ns/legacy/sa/old) on node \"node-1\"
  inbound mTLS:
    port 80 (via old.legacy.svc.cluster.local:80): STRICT (PeerAuthentication istio-system/global-mtls)
    port 443 (via old.legacy.svc.cluster.local:443): STRICT (PeerAuthentication istio-system/global-mtls)
    other ports: STRICT (PeerAuthentication istio-system/global-mtls)
  authorization:
    DENY  istio-system/istio_converted_static_strict (from PeerAuthentication istio-system/global-mtls)
    DENY  istio-system/no-legacy

workload shop/cart-1 (spiffe://cluster.local/ns/shop/sa/cart) on node \"node-1\"
  inbound mTLS:
    port 8080 (via cart.shop.svc.cluster.local:80): STRICT (PeerAuthentication istio-system/global-mtls)
    port 9100 (via cart.shop.svc.cluster.local:9100): PERMISSIVE (PeerAuthentication shop/metrics)
    other ports: STRICT (PeerAuthentication istio-system/global-mtls)
  authorization:
    DENY  istio-system/no-legacy
    ALLOW shop/cart-from-web
    DENY  shop/converted_peer_authentication_metrics (from PeerAuthentication shop/metrics)

workload shop/web-1 (spiffe://cluster.local/ns/shop/sa/web) on node \"node-1\"
  inbound mTLS:
    all ports: STRICT (PeerAuthentication istio-system/global-mtls)
  authorization:
    DENY  istio-system/istio_converted_static_strict (from PeerAuthentication istio-system/global-mtls)
    DENY  istio-system/no-legacy

service legacy/old (old.legacy.svc.cluster.local)
  outbound TLS from a client in legacy:
    port 80: plaintext (DISABLE) (DestinationRule legacy/legacy-plain)
    port 443: TLS origination (SIMPLE) [sni old.example] (DestinationRule legacy/legacy-plain)

service shop/cart (cart.shop.svc.cluster.local)
  outbound TLS from a client in shop:
    port 80: HBONE (ISTIO_MUTUAL) (no DestinationRule)
    port 9100: HBONE (ISTIO_MUTUAL) (no DestinationRule)
";

#[test]
fn report_matches_the_golden_output() {
    let policies =
        crate::mesh::k8s::security::policy_set(&documents(POLICIES), ROOT).expect("policies load");
    // Out of order on purpose: the report sorts.
    let workloads = vec![
        workload("shop", "web-1", "web", "10.1.0.2", "app=web"),
        workload("shop", "cart-1", "cart", "10.1.0.3", "app=cart"),
        workload("legacy", "old-1", "old", "10.2.0.2", "app=old"),
    ];
    let services = vec![
        service("shop", "cart", &[(9100, 9100), (80, 8080)], "cart"),
        service("legacy", "old", &[(443, 443), (80, 80)], "old"),
    ];
    let snapshot = Snapshot::build(workloads, services, policies);
    let report = report(&snapshot);
    assert_eq!(report, GOLDEN, "got:\n{report}");
}
