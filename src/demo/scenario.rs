//! What the demo mesh is: four pods on two nodes, a Service, and two Istio policies, written as
//! the Kubernetes and Istio YAML a user would write; the policy the second act adds; and each
//! node's ztund config. Pure text; knows nothing about namespaces being built or daemons running.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::topology::{Place, Topology};

/// The trust domain of the demo's built-in CA.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The `echo` Service's virtual IP and port (targetPort 8080).
pub const ECHO_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
/// Its IPv6 twin, for `ztund demo --ipv6`.
pub const ECHO_VIP6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10)),
    80,
);

/// The `echo` VIP of the demo's address family.
pub fn echo_vip(ipv6: bool) -> SocketAddr {
    if ipv6 { ECHO_VIP6 } else { ECHO_VIP }
}

/// Pod `index` of `node`'s address in the demo's family (`--ipv6`: the pod's IPv6 address;
/// the mesh then knows each pod by that address alone, an IPv6-only cluster).
pub fn pod_ip(topology: &Topology, node: usize, index: usize, ipv6: bool) -> IpAddr {
    if ipv6 {
        topology.pod_ip6(node, index)
    } else {
        topology.pod_ip(node, index)
    }
}

/// Node `n`'s address in the demo's family (`--ipv6`: the control plane listens, and the node
/// is shown, on its IPv6 address).
pub fn node_ip(topology: &Topology, n: usize, ipv6: bool) -> IpAddr {
    if ipv6 {
        topology.node_ip6(n)
    } else {
        topology.node_ip(n)
    }
}

/// One pod of the demo: where it runs, who it is, and the port its app serves (if any).
#[derive(Debug, Clone, Copy)]
pub struct Pod {
    pub name: &'static str,
    pub node: usize,
    /// 1-based index on its node.
    pub index: usize,
    pub port: Option<u16>,
}

impl Pod {
    pub fn place(&self) -> Place {
        Place::Pod(self.node, self.index)
    }

    /// The app's address, for pods that serve.
    pub fn addr(&self, topology: &Topology, ipv6: bool) -> Option<SocketAddr> {
        let ip = pod_ip(topology, self.node, self.index, ipv6);
        self.port.map(|port| SocketAddr::new(ip, port))
    }
}

pub const SLEEP: Pod = Pod {
    name: "sleep",
    node: 1,
    index: 1,
    port: None,
};
pub const HTTPBIN: Pod = Pod {
    name: "httpbin",
    node: 1,
    index: 2,
    port: Some(8000),
};
pub const ECHO: Pod = Pod {
    name: "echo",
    node: 2,
    index: 1,
    port: Some(8080),
};
pub const DB: Pod = Pod {
    name: "db",
    node: 2,
    index: 2,
    port: Some(5432),
};

/// Every pod, in the order the mesh file lists them.
pub const PODS: [Pod; 4] = [SLEEP, HTTPBIN, ECHO, DB];

/// The PeerAuthentication that makes `db` STRICT.
pub const DB_STRICT: &str = "db-strict";
/// The AuthorizationPolicy that denies `httpbin` → `db`.
pub const DB_DENY: &str = "db-deny-httpbin";
/// The AuthorizationPolicy the second act adds while `sleep` → `echo` flows.
pub const ECHO_DENY: &str = "echo-deny-sleep";

/// Nodes and pods per node the topology needs.
pub const NODES: usize = 2;
pub const PODS_PER_NODE: usize = 2;

/// The node name ztund knows node `n` by.
pub fn node_name(n: usize) -> String {
    format!("node{n}")
}

/// The Kubernetes pod UID of demo pod `pod`: ZDS names pods by it (the mesh by namespace/name).
pub fn pod_uid(pod: &Pod) -> String {
    format!(
        "00000000-0000-4000-8000-0000000{}{:04}",
        pod.node, pod.index
    )
}

/// Where a pod landed: its address.
#[derive(Debug, Clone)]
pub struct Placement {
    pub pod: Pod,
    pub ip: IpAddr,
}

/// Every pod placed in `topology`.
pub fn placements(topology: &Topology, ipv6: bool) -> Vec<Placement> {
    PODS.iter()
        .map(|pod| Placement {
            pod: *pod,
            ip: pod_ip(topology, pod.node, pod.index, ipv6),
        })
        .collect()
}

/// The mesh both nodes are given. The Pods carry what the kubelet would fill in (`nodeName`,
/// `podIP`) and no network namespace: the demo hands each pod's namespace to its node's ztund
/// over ZDS, as istio-cni does; the Service and the Istio policies are exactly what a user writes.
pub fn mesh_yaml(placements: &[Placement], vip: SocketAddr) -> String {
    let mut yaml = String::from("# ztund demo: two nodes, four pods, one Service, two policies.\n");
    for Placement { pod, ip } in placements {
        yaml += &format!(
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: {name}}}
spec:
  serviceAccountName: {name}
  nodeName: {node}
status:
  podIP: \"{ip}\"
---
",
            name = pod.name,
            node = node_name(pod.node),
        );
    }
    yaml += &format!(
        "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: \"{vip}\"
  selector: {{app: echo}}
  ports:
  - name: tcp-echo
    port: {port}
    targetPort: {target}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: {strict}
  namespace: default
spec:
  selector:
    matchLabels: {{app: db}}
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {deny}
  namespace: default
spec:
  selector:
    matchLabels: {{app: db}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"{td}/ns/default/sa/httpbin\"]
",
        vip = vip.ip(),
        port = vip.port(),
        target = ECHO.port.unwrap_or(8080),
        td = TRUST_DOMAIN,
        strict = DB_STRICT,
        deny = DB_DENY,
    );
    yaml
}

/// The AuthorizationPolicy of the second act: DENY `sleep` → `echo`.
pub fn echo_deny_yaml() -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {ECHO_DENY}
  namespace: default
spec:
  selector:
    matchLabels: {{app: echo}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [\"{TRUST_DOMAIN}/ns/default/sa/sleep\"]
"
    )
}

/// Where a node takes its mesh and certificates from: `ztund controlplane`, Delta xDS and the
/// Istio CA API at `address`.
#[derive(Debug, Clone, Copy)]
pub struct NodeSource<'a> {
    pub address: SocketAddr,
    pub root_cert: &'a Path,
    pub token_file: &'a Path,
}

/// The ZDS socket the demo, as node `n`'s istio-cni agent, listens on.
pub fn zds_socket(n: usize, dir: &Path) -> PathBuf {
    dir.join(format!("zds-{}.sock", node_name(n)))
}

/// Node `n`'s ztund config: pods from istio-cni (the demo) over ZDS, mesh and certificates from
/// `source`; with `bpf_dir`, captured by the eBPF backend pinning there.
pub fn node_config(n: usize, dir: &Path, source: NodeSource, bpf_dir: Option<&Path>) -> String {
    let node = node_name(n);
    let common = format!(
        "node: {node}
trustDomain: {TRUST_DOMAIN}
stateDir: {state}
capture: istio-cni
zdsSocket: {zds}
",
        state = dir.join(format!("state-{node}")).display(),
        zds = zds_socket(n, dir).display(),
    );
    let source = format!(
        "controlPlane: {{address: \"https://{address}\", rootCert: {root}, tokenFile: {token}}}\nca: {{mode: istio}}\n",
        address = source.address,
        root = source.root_cert.display(),
        token = source.token_file.display(),
    );
    let backend = match bpf_dir {
        Some(bpf_dir) => format!("captureBackend: ebpf\nbpfDir: {}\n", bpf_dir.display()),
        None => String::new(),
    };
    common + &source + &backend
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{MeshSettings, snapshot_from_text};
    use crate::policy::{self, ConnectionFacts, Decision};

    fn placed() -> Vec<Placement> {
        PODS.iter()
            .map(|pod| Placement {
                pod: *pod,
                ip: IpAddr::V4(Ipv4Addr::new(10, 201, pod.node as u8, pod.index as u8 + 1)),
            })
            .collect()
    }

    fn identity(name: &str) -> crate::identity::SpiffeId {
        crate::identity::SpiffeId::new(TRUST_DOMAIN, "default", name).expect("valid id")
    }

    #[test]
    fn the_mesh_places_pods_and_the_policies_guard_db() {
        let yaml = mesh_yaml(&placed(), ECHO_VIP);
        let snapshot = snapshot_from_text("mesh.yaml", &yaml, &MeshSettings::default())
            .unwrap_or_else(|e| panic!("demo mesh must parse: {e}\n{yaml}"));
        assert_eq!(snapshot.local_workloads("node1").count(), 2);
        assert_eq!(snapshot.local_workloads("node2").count(), 2);
        let echo_vip = snapshot.service_by_vip(ECHO_VIP.ip()).expect("echo VIP");
        assert_eq!(snapshot.endpoints(echo_vip).len(), 1);
        let db = snapshot
            .workload_by_ip("10.201.2.3".parse().unwrap())
            .expect("db");
        assert_eq!(
            db.netns, None,
            "pods are handed over by ZDS, not named by netns"
        );
        let facts = |id: Option<&str>| ConnectionFacts {
            source_ip: "10.201.1.2".parse().unwrap(),
            source_identity: id.map(identity),
            destination_ip: "10.201.2.3".parse().unwrap(),
            destination_port: 5432,
        };
        let verdict = |id| policy::authorize(&snapshot.policies, db, &facts(id));
        assert_eq!(verdict(Some("sleep")), Decision::Allow);
        assert!(
            matches!(verdict(Some("httpbin")), Decision::Deny(r) if r.contains("db-deny-httpbin"))
        );
        assert!(matches!(verdict(None), Decision::Deny(r) if r.contains("db-strict")));
    }

    /// `--ipv6`: the same mesh on the pods' IPv6 addresses and the v6 VIP.
    #[test]
    fn the_ipv6_mesh_places_pods_and_the_vip_on_v6_addresses() {
        let placed: Vec<Placement> = PODS
            .iter()
            .map(|pod| Placement {
                pod: *pod,
                ip: IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0x201,
                    pod.node as u16,
                    0,
                    0,
                    0,
                    0,
                    pod.index as u16 + 1,
                )),
            })
            .collect();
        let yaml = mesh_yaml(&placed, ECHO_VIP6);
        let snapshot = snapshot_from_text("mesh.yaml", &yaml, &MeshSettings::default())
            .unwrap_or_else(|e| panic!("demo v6 mesh must parse: {e}\n{yaml}"));
        let vip = snapshot
            .service_by_vip(ECHO_VIP6.ip())
            .expect("echo v6 VIP");
        assert_eq!(snapshot.endpoints(vip).len(), 1);
        let db = snapshot
            .workload_by_ip("fd00:201:2::3".parse().unwrap())
            .expect("db by its v6 address");
        assert_eq!(db.name, "db");
    }

    #[test]
    fn the_second_act_policy_denies_sleep_to_echo_only() {
        let yaml = format!(
            "{}---\n{}",
            mesh_yaml(&placed(), ECHO_VIP),
            echo_deny_yaml()
        );
        let snapshot = snapshot_from_text("mesh.yaml", &yaml, &MeshSettings::default())
            .unwrap_or_else(|e| panic!("demo mesh with the act 2 policy must parse: {e}"));
        let echo = snapshot
            .workload_by_ip("10.201.2.2".parse().unwrap())
            .expect("echo");
        let facts = |id: &str| ConnectionFacts {
            source_ip: "10.201.1.2".parse().unwrap(),
            source_identity: Some(identity(id)),
            destination_ip: "10.201.2.2".parse().unwrap(),
            destination_port: 8080,
        };
        let verdict = |id| policy::authorize(&snapshot.policies, echo, &facts(id));
        assert!(matches!(verdict("sleep"), Decision::Deny(r) if r.contains(ECHO_DENY)));
        assert_eq!(verdict("httpbin"), Decision::Allow);
    }

    /// Node 1's config with the control plane's files in `dir`.
    fn config_text(dir: &Path, bpf_dir: Option<&Path>) -> String {
        let (root, token) = (
            dir.join("cp-state/ca/root-cert.pem"),
            dir.join("token-node1"),
        );
        let source = NodeSource {
            address: "10.200.0.1:15012".parse().unwrap(),
            root_cert: &root,
            token_file: &token,
        };
        node_config(1, dir, source, bpf_dir)
    }

    #[test]
    fn the_ebpf_configs_pick_the_backend_and_its_pin_directory() {
        let dir = Path::new("/tmp/ztdemo-x");
        let pins = dir.join("bpf/node1");
        let text = config_text(dir, Some(&pins));
        let config = crate::config::Config::parse(&text, "node1.yaml").expect("valid config");
        assert_eq!(config.capture_backend, crate::config::CaptureBackend::Ebpf);
        assert_eq!(config.bpf_dir, pins);
        assert_eq!(config.capture, crate::config::CaptureMode::IstioCni);
    }

    #[test]
    fn the_configs_take_pods_from_istio_cni_and_the_mesh_from_their_source() {
        let dir = Path::new("/tmp/ztdemo-x");
        let text = config_text(dir, None);
        let config = crate::config::Config::parse(&text, "node1.yaml").expect("valid config");
        assert_eq!(
            config.capture_backend,
            crate::config::CaptureBackend::Nftables
        );
        assert_eq!(config.node, "node1");
        assert_eq!(config.capture, crate::config::CaptureMode::IstioCni);
        assert_eq!(config.zds_socket, dir.join("zds-node1.sock"));
        assert_eq!(config.mesh_file, None);
        let cp = config.control_plane.expect("controlPlane");
        assert_eq!(cp.address, "https://10.200.0.1:15012");
        assert_eq!(cp.token_file, Some(dir.join("token-node1")));
        assert!(matches!(config.ca, crate::config::CaConfig::Istio { .. }));
    }
}
