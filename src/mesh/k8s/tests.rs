//! The mesh-file readers as a specification: what each kind becomes in the model, and how every
//! kind of bad input is refused with the file, the document and the field named.

use std::net::IpAddr;

use super::*;
use crate::mesh::model::{HealthStatus, ServicePort, TunnelProtocol};

fn settings() -> MeshSettings {
    MeshSettings {
        trust_domain: "example.org".into(),
        cluster_domain: "cluster.test".into(),
        root_namespace: "istio-system".into(),
    }
}

fn parse(text: &str) -> Result<MeshDocuments, MeshError> {
    let docs = split_documents("mesh.yaml", text)?;
    parse_mesh(&docs, &settings())
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

const POD_FULL: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 6b0d6f4e-0000-4000-8000-000000000001
  creationTimestamp: "2024-05-01T10:00:00Z"
  labels: {app: web, version: v2}
  annotations:
    ztund.io/netns: pod-web-1
    ztund.io/health: unhealthy
spec:
  serviceAccountName: web-sa
  nodeName: node-a
  containers:
    - name: web
      ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
status:
  podIP: 10.1.0.5
  podIPs: [{ip: 10.1.0.5}, {ip: "fd00::5"}]
"#;

#[test]
fn pod_becomes_a_workload_with_every_field() {
    let mesh = parse(POD_FULL).unwrap();
    let [w] = mesh.workloads.as_slice() else {
        panic!("{:?}", mesh.workloads)
    };
    assert_eq!(w.uid, "Kubernetes//Pod/shop/web-1");
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("web-1", "shop"));
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(w.trust_domain, "example.org");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://example.org/ns/shop/sa/web-sa"
    );
    assert_eq!(w.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(w.addresses, vec![ip("10.1.0.5"), ip("fd00::5")]);
    assert_eq!(w.node, "node-a");
    assert_eq!(w.tunnel, TunnelProtocol::Hbone);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.netns.as_deref(), Some("/var/run/netns/pod-web-1"));
    assert_eq!(
        w.creation_timestamp.as_deref(),
        Some("2024-05-01T10:00:00Z")
    );
}

#[test]
fn pod_defaults_and_opt_outs() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata:
  name: legacy
  labels: {istio.io/dataplane-mode: none}
  annotations: {ztund.io/netns: /proc/1234/ns/net}
spec: {nodeName: node-b}
status:
  podIPs: [{ip: 10.1.0.9}]
---
apiVersion: v1
kind: Pod
metadata: {name: agent}
spec: {nodeName: node-b, hostNetwork: true}
status: {podIP: 192.168.0.2}
"#;
    let mesh = parse(text).unwrap();
    let [w] = mesh.workloads.as_slice() else {
        panic!("host-network pod must be skipped: {:?}", mesh.workloads)
    };
    assert_eq!(w.namespace, "default");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.tunnel, TunnelProtocol::None);
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(w.netns.as_deref(), Some("/proc/1234/ns/net"));
    assert_eq!(w.addresses, vec![ip("10.1.0.9")]);
}

#[test]
fn workload_entry_becomes_a_workload() {
    let text = r#"
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata:
  name: vm-db
  namespace: data
  annotations: {ztund.io/node: vm-host-1, ztund.io/netns: vmns}
spec:
  address: 10.50.0.7
  labels: {app: db}
  serviceAccount: db
  ports: {pg: 5432}
"#;
    let mesh = parse(text).unwrap();
    let [w] = mesh.workloads.as_slice() else {
        panic!()
    };
    assert_eq!(
        w.uid,
        "Kubernetes/networking.istio.io/WorkloadEntry/data/vm-db"
    );
    assert_eq!(w.addresses, vec![ip("10.50.0.7")]);
    assert_eq!(w.node, "vm-host-1");
    assert_eq!(w.service_account, "db");
    assert_eq!(w.labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(w.netns.as_deref(), Some("/var/run/netns/vmns"));
    assert_eq!(w.tunnel, TunnelProtocol::Hbone);
}

#[test]
fn service_ports_vips_selector_and_named_target_ports() {
    let text = format!(
        "{POD_FULL}---\n{}",
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.1.1
  clusterIPs: [10.96.1.1, "fd00:96::1"]
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: metrics, port: 9090}
    - {port: 8443, targetPort: 443}
---
apiVersion: v1
kind: Service
metadata: {name: web-headless, namespace: shop}
spec:
  clusterIP: None
  ports: [{port: 80}]
"#
    );
    let mesh = parse(&text).unwrap();
    let [web, headless] = mesh.services.as_slice() else {
        panic!()
    };
    assert_eq!(web.hostname, "web.shop.svc.cluster.test");
    assert_eq!(web.vips, vec![ip("10.96.1.1"), ip("fd00:96::1")]);
    assert_eq!(
        web.ports,
        vec![
            ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: 8080
            },
            ServicePort {
                name: Some("metrics".into()),
                port: 9090,
                target_port: 9090
            },
            ServicePort {
                name: None,
                port: 8443,
                target_port: 443
            },
        ]
    );
    assert_eq!(
        web.endpoints,
        Endpoints::Selector([("app".to_string(), "web".to_string())].into())
    );
    assert!(!web.external);
    assert!(headless.vips.is_empty());
    assert_eq!(headless.endpoints, Endpoints::None);
}

#[test]
fn service_entry_makes_one_service_per_host() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [pay.example.com, "*.pay.example.com"]
  addresses: [240.0.0.1, 240.0.0.2/32]
  ports: [{number: 443, name: https, targetPort: 8443}, {number: 80}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 203.0.113.5}, {address: 203.0.113.6}]
  subjectAltNames: ["spiffe://example.org/ns/pay/sa/api"]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.shop.internal]
  workloadSelector: {labels: {app: db}}
"#;
    let mesh = parse(text).unwrap();
    let [pay, pay_wild, vms] = mesh.services.as_slice() else {
        panic!("{:?}", mesh.services)
    };
    assert_eq!(pay.hostname, "pay.example.com");
    assert_eq!(pay_wild.hostname, "*.pay.example.com");
    assert_eq!(pay.name, "payments");
    assert_eq!(pay.vips, vec![ip("240.0.0.1"), ip("240.0.0.2")]);
    assert_eq!(pay_wild.vips, pay.vips);
    assert_eq!(pay.port(443).map(|p| p.target_port), Some(8443));
    assert_eq!(pay.port(80).map(|p| p.target_port), Some(80));
    assert!(pay.external);
    assert_eq!(
        pay.endpoints,
        Endpoints::Addresses(vec![ip("203.0.113.5"), ip("203.0.113.6")])
    );
    assert_eq!(
        pay.subject_alt_names[0].to_string(),
        "spiffe://example.org/ns/pay/sa/api"
    );
    assert!(!vms.external);
    assert_eq!(
        vms.endpoints,
        Endpoints::Selector([("app".to_string(), "db".to_string())].into())
    );
}

#[test]
fn other_kinds_are_left_alone() {
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;
    let docs = split_documents("mesh.yaml", text).unwrap();
    // Empty documents are skipped but counted, so indexes match what the user sees.
    assert_eq!(
        docs.iter().map(|d| d.doc.index).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(docs[1].doc.namespace, "istio-system");
    assert_eq!(docs[1].api_version, "security.istio.io/v1");
    let mesh = parse_mesh(&docs, &settings()).unwrap();
    assert_eq!(mesh.ignored, vec![docs[0].doc.clone()]);
    assert!(mesh.workloads.is_empty() && mesh.services.is_empty());
}

#[test]
fn a_yaml_syntax_error_names_the_file_and_line() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: [Pod\nmetadata: {name: x}\n";
    let err = parse(text).unwrap_err();
    let MeshError::Syntax { line, index, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*index, 2);
    assert!(*line >= 5, "line {line}");
    assert!(
        err.to_string()
            .starts_with(&format!("mesh.yaml line {line}:")),
        "{err}"
    );
}

#[test]
fn header_errors_name_the_document() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
            "mesh.yaml document 1 (Pod): field `metadata.name`: required",
        ),
        (
            "kind: Pod\nmetadata: {name: a}\n",
            "mesh.yaml document 1 (Pod): field `apiVersion`: required",
        ),
        (
            "apiVersion: v1\nmetadata: {name: a}\n",
            "mesh.yaml document 1: field `kind`: required",
        ),
        (
            "- just\n- a list\n",
            "mesh.yaml document 1: field `.`: expected a mapping",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: Web}\n",
            "field `metadata.name`: \"Web\" is not a DNS-1123",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: 7}\n",
            "field `metadata.namespace`: expected a non-empty string, got 7",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}\nshould contain\n{expected}");
    }
}

const GOOD_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: a}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.0.0.1}\n";

/// Each case: the mesh file, the document the error must name, the field it must name, and a
/// word of the reason.
const ERROR_CASES: &[(&str, &str, &str, &str)] = &[
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}, {port: 81, targetPort: 'ab c'}]}\n",
        "document 1 (Service default/web)",
        "spec.ports[1].targetPort",
        "expected a port number 1-65535 or a port name, got \"ab c\"",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n",
        "document 1 (Service default/web)",
        "spec.ports[0].port",
        "expected a port number 1-65535, got 70000",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300}\n",
        "document 1 (Service default/web)",
        "spec.clusterIP",
        "expected an IP address",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: 9web}\nspec: {}\n",
        "document 1 (Service default/9web)",
        "metadata.name",
        "start with a letter",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns1}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.256}\n",
        "document 1 (Pod ns1/p)",
        "status.podIP",
        "expected an IP address, got \"10.0.0.256\"",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "spec.nodeName",
        "required",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n1}\nstatus: {}\n",
        "document 1 (Pod default/p)",
        "status.podIP",
        "needs an IP",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {version: 1.5}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "metadata.labels.version",
        "expected a string, got 1.5",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n1, serviceAccountName: Bad_SA}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "spec.serviceAccountName",
        "DNS-1123",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {ztund.io/netns: a/b}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "metadata.annotations[\"ztund.io/netns\"]",
        "absolute path",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {ztund.io/health: sick}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "metadata.annotations[\"ztund.io/health\"]",
        "expected healthy or unhealthy",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n1, containers: {name: c}}\nstatus: {podIP: 10.0.0.2}\n",
        "document 1 (Pod default/p)",
        "spec.containers",
        "expected a list",
    ),
    (
        "apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n",
        "document 1 (Pod default/p)",
        "apiVersion",
        "read as v1",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, annotations: {ztund.io/node: n1}}\nspec: {address: db.example.com}\n",
        "document 1 (WorkloadEntry default/vm)",
        "spec.address",
        "hostnames",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: 10.0.0.9}\n",
        "document 1 (WorkloadEntry default/vm)",
        "metadata.annotations[\"ztund.io/node\"]",
        "required",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {hosts: [a.example], addresses: [10.0.0.0/24]}\n",
        "document 1 (ServiceEntry default/ext)",
        "spec.addresses[0]",
        "CIDR",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {hosts: [a.example], subjectAltNames: ['spiffe://td/ns/a/sa/b', 'db.example.com']}\n",
        "document 1 (ServiceEntry default/ext)",
        "spec.subjectAltNames[1]",
        "SPIFFE",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {hosts: [a.example], location: OUTSIDE}\n",
        "document 1 (ServiceEntry default/ext)",
        "spec.location",
        "MESH_EXTERNAL",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {hosts: [a.example], endpoints: [{address: b.example}]}\n",
        "document 1 (ServiceEntry default/ext)",
        "spec.endpoints[0].address",
        "DNS",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext}\nspec: {ports: [{number: 80}]}\n",
        "document 1 (ServiceEntry default/ext)",
        "spec.hosts",
        "at least one host",
    ),
];

#[test]
fn every_bad_value_is_refused_naming_file_document_and_field() {
    assert!(ERROR_CASES.len() >= 12);
    for (text, doc, field, reason) in ERROR_CASES {
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("mesh.yaml {doc}: ")),
            "{err}\nshould name mesh.yaml {doc}"
        );
        assert!(
            err.contains(&format!("field `{field}`: ")),
            "{err}\nshould name field {field}"
        );
        assert!(err.contains(reason), "{err}\nshould say {reason}");
    }
}

/// Errors only the whole file can reveal: (file, later document, field, earlier document).
#[test]
fn conflicts_name_both_documents() {
    let cases = [
        (
            format!("{GOOD_POD}---\n{GOOD_POD}"),
            "mesh.yaml document 2 (Pod default/a): field `metadata.name`",
            "mesh.yaml document 1 (Pod default/a)",
        ),
        (
            format!("{GOOD_POD}---\n{}", GOOD_POD.replace("name: a,", "name: b,")),
            "mesh.yaml document 2 (Pod default/b): field `status.podIP`: address 10.0.0.1",
            "mesh.yaml document 1 (Pod default/a)",
        ),
        (
            format!(
                "{GOOD_POD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 10.0.0.1}}\n"
            ),
            "mesh.yaml document 2 (Service default/a): field `spec.clusterIP`: address 10.0.0.1",
            "mesh.yaml document 1 (Pod default/a)",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1}\n"
                .to_string(),
            "mesh.yaml document 2 (Service default/b): field `spec.clusterIP`: VIP 10.96.0.1",
            "mesh.yaml document 1 (Service default/a)",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\n\
             spec: {hosts: [a.default.svc.cluster.test]}\n"
                .to_string(),
            "mesh.yaml document 2 (ServiceEntry default/a): field `spec.hosts[0]`: hostname",
            "mesh.yaml document 1 (Service default/a)",
        ),
    ];
    for (text, first, other) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with(first), "{err}\nshould start with\n{first}");
        assert!(
            err.ends_with(&format!("already claimed by {other}")),
            "{err}\nshould name {other}"
        );
    }
}

#[test]
fn named_target_ports_must_resolve_to_one_number() {
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: a}, ports: [{port: 80, targetPort: http}]}\n";
    let disagreeing = GOOD_POD
        .replace("name: a,", "name: b,")
        .replace("8080", "9090")
        .replace("10.0.0.1", "10.0.0.2");
    let cases = [
        (format!("{GOOD_POD}---\n{service}"), None),
        (
            format!("{GOOD_POD}---\n{disagreeing}---\n{service}"),
            Some(
                "is 8080 on mesh.yaml document 1 (Pod default/a) but 9090 on mesh.yaml document 2 (Pod default/b)",
            ),
        ),
        (
            service.to_string(),
            Some("the selector matches no workload"),
        ),
        (
            format!(
                "{GOOD_POD}---\n{}",
                service.replace("targetPort: http", "targetPort: grpc")
            ),
            Some("\"grpc\" is not a port name of mesh.yaml document 1 (Pod default/a)"),
        ),
        (
            format!(
                "{GOOD_POD}---\n{}",
                service.replace("selector: {app: a}, ", "")
            ),
            Some("needs spec.selector"),
        ),
    ];
    for (text, expected) in cases {
        match (parse(&text), expected) {
            (Ok(mesh), None) => assert_eq!(mesh.services[0].ports[0].target_port, 8080),
            (Err(e), Some(reason)) => {
                let e = e.to_string();
                assert!(
                    e.contains("(Service default/web): field `spec.ports[0].targetPort`: "),
                    "{e}"
                );
                assert!(e.contains(reason), "{e}\nshould say {reason}");
            }
            (result, _) => panic!("unexpected {result:?} for {expected:?}"),
        }
    }
}

#[test]
fn settings_come_from_the_daemon_config() {
    let config = crate::config::Config::parse(
        "node: n1\nmeshFile: m.yaml\nca: {mode: builtin, dir: ca}\ntrustDomain: corp.example\nrootNamespace: mesh-root\n",
        "cfg.yaml",
    )
    .unwrap();
    let settings = MeshSettings::from_config(&config);
    assert_eq!(settings.trust_domain, "corp.example");
    assert_eq!(settings.root_namespace, "mesh-root");
    assert_eq!(settings.cluster_domain, "cluster.local");
}
