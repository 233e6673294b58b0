//! In-pod test worlds: a mesh file listing the testbed's pods as Kubernetes `Pod`s (node name,
//! pod IP, and the `ztund.io/netns` annotation naming the pod's testbed namespace), real ztund
//! daemons on the nodes in a capture mode, and small probes of a pod namespace (listening ports,
//! nftables tables, ztund's connections). Knows nothing about what a test asserts.
#![allow(dead_code)]

use std::time::Duration;

use super::{Cluster, Daemon, eventually};
use crate::testbed::bpf::{self, Bpffs};
use crate::testbed::{Place, Testbed};

/// The capture backend a world's daemons run (`captureBackend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Ebpf,
}

/// Two `#[tokio::test]`s per case, `<case>::nftables` and `<case>::ebpf`: each case is an
/// `async fn case(backend: Backend)` in the test file, run against both capture backends.
#[allow(unused_macros)] // Not every user of this module (benches) has cases.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nftables() {
                super::$case(crate::support::pods::Backend::Nftables).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ebpf() {
                super::$case(crate::support::pods::Backend::Ebpf).await
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// The mesh file's name inside the cluster directory (all nodes read the same file).
pub const MESH_FILE: &str = "mesh.yaml";
/// ztund's in-pod listener ports.
pub const INPOD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// One testbed pod as the mesh file describes it.
#[derive(Debug, Clone)]
pub struct MeshPod {
    pub node: usize,
    pub pod: usize,
    pub service_account: String,
    /// Whether it carries the `ztund.io/netns` annotation (standalone capture).
    pub netns_annotation: bool,
    pub labels: Vec<(String, String)>,
    /// Whether the mesh file lists its IPv6 address too (`status.podIPs`, dual-stack).
    pub dual_stack: bool,
}

impl MeshPod {
    /// A pod ztund captures in standalone mode.
    pub fn captured(node: usize, pod: usize, service_account: &str) -> MeshPod {
        MeshPod {
            node,
            pod,
            service_account: service_account.into(),
            netns_annotation: true,
            labels: Vec::new(),
            dual_stack: false,
        }
    }

    /// A pod in the mesh without a netns annotation (no in-pod listeners from the mesh file).
    pub fn uncaptured(node: usize, pod: usize, service_account: &str) -> MeshPod {
        MeshPod {
            netns_annotation: false,
            ..MeshPod::captured(node, pod, service_account)
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> MeshPod {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Lists the pod's IPv6 address besides its IPv4 one (a dual-stack pod).
    pub fn dual_stack(mut self) -> MeshPod {
        self.dual_stack = true;
        self
    }

    /// The Kubernetes name: `pod-n<N>p<P>`.
    pub fn name(&self) -> String {
        pod_name(self.node, self.pod)
    }

    /// The SPIFFE id it proves.
    pub fn spiffe_id(&self) -> String {
        spiffe_id(&self.service_account)
    }
}

/// The Kubernetes name of testbed pod (n, p).
pub fn pod_name(node: usize, pod: usize) -> String {
    format!("pod-n{node}p{pod}")
}

/// The SPIFFE id of a service account in namespace `default`.
pub fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{service_account}")
}

/// The mesh file for `pods`, with the testbed's addresses and namespace names.
pub fn mesh_yaml(bed: &Testbed, pods: &[MeshPod]) -> String {
    let mut docs = Vec::new();
    for pod in pods {
        let mut labels = vec![format!("app: {}", pod.name())];
        labels.extend(pod.labels.iter().map(|(k, v)| format!("{k}: {v}")));
        let annotations = if pod.netns_annotation {
            format!(
                "\n  annotations: {{ztund.io/netns: {}}}",
                bed.netns_name(Place::Pod(pod.node, pod.pod))
            )
        } else {
            String::new()
        };
        let ip = bed.pod_ip(pod.node, pod.pod);
        let status = if pod.dual_stack {
            let ip6 = bed.pod_ip6(pod.node, pod.pod);
            format!("{{podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}, {{ip: \"{ip6}\"}}]}}")
        } else {
            format!("{{podIP: \"{ip}\"}}")
        };
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{{labels}}}{annotations}\nspec: {{serviceAccountName: {sa}, nodeName: node{node}}}\nstatus: {status}\n",
            name = pod.name(),
            labels = labels.join(", "),
            sa = pod.service_account,
            node = pod.node,
        ));
    }
    docs.join("---\n")
}

/// A testbed with a ztund on every node and one mesh file they all watch. Daemons drop (are
/// killed) first, then the working directory, then the namespaces.
pub struct PodWorld {
    daemons: Vec<Option<Daemon>>,
    /// After the daemons (killed first), so their pins go once they are gone.
    bpffs: Option<Bpffs>,
    pub backend: Backend,
    configs: Vec<std::path::PathBuf>,
    pub cluster: Cluster,
    pub bed: Testbed,
}

impl PodWorld {
    /// Builds the testbed and writes the mesh file and one config per node; `node_extra(n)` is
    /// YAML appended to node n's config (its capture mode). Starts no daemon.
    pub fn new(
        nodes: usize,
        pods_per_node: usize,
        pods: &[MeshPod],
        node_extra: impl Fn(usize) -> String,
    ) -> PodWorld {
        PodWorld::on(Backend::Nftables, nodes, pods_per_node, pods, node_extra)
    }

    /// [`PodWorld::new`] with the daemons capturing through `backend`. For eBPF every pod
    /// gets a sandbox (a process in its netns and own cgroup, through which its apps make
    /// their sockets) and each node a pin directory on a private bpffs.
    pub fn on(
        backend: Backend,
        nodes: usize,
        pods_per_node: usize,
        pods: &[MeshPod],
        node_extra: impl Fn(usize) -> String,
    ) -> PodWorld {
        let bed = Testbed::new(nodes, pods_per_node);
        let bpffs = (backend == Backend::Ebpf).then(|| {
            bed.sandbox_pods();
            Bpffs::new()
        });
        let cluster = Cluster::new();
        cluster.write(MESH_FILE, &mesh_yaml(&bed, pods));
        let configs = (1..=nodes)
            .map(|n| {
                let mut extra = node_extra(n);
                if let Some(bpffs) = &bpffs {
                    extra.push_str(&format!(
                        "captureBackend: ebpf\nbpfDir: {}/node{n}\n",
                        bpffs.path().display()
                    ));
                }
                cluster.node_config(&format!("node{n}"), MESH_FILE, &extra)
            })
            .collect();
        PodWorld {
            daemons: (0..nodes).map(|_| None).collect(),
            bpffs,
            backend,
            configs,
            cluster,
            bed,
        }
    }

    /// Every node in standalone capture mode, all daemons started and ready.
    pub async fn standalone(nodes: usize, pods_per_node: usize, pods: &[MeshPod]) -> PodWorld {
        PodWorld::standalone_on(Backend::Nftables, nodes, pods_per_node, pods).await
    }

    /// [`PodWorld::standalone`] capturing through `backend`.
    pub async fn standalone_on(
        backend: Backend,
        nodes: usize,
        pods_per_node: usize,
        pods: &[MeshPod],
    ) -> PodWorld {
        let mut world = PodWorld::on(backend, nodes, pods_per_node, pods, |_| {
            "capture: standalone\n".to_string()
        });
        for n in 1..=nodes {
            world.start(n).await;
        }
        world
    }

    /// Starts node n's daemon and waits until it is ready.
    pub async fn start(&mut self, n: usize) -> &Daemon {
        let daemon = self.cluster.start(&self.bed, n, &self.configs[n - 1]).await;
        self.daemons[n - 1].insert(daemon)
    }

    /// Starts node n's daemon without waiting for readiness.
    pub fn spawn(&mut self, n: usize) -> &Daemon {
        let daemon = self.cluster.spawn(&self.bed, n, &self.configs[n - 1]);
        self.daemons[n - 1].insert(daemon)
    }

    /// Kills node n's daemon (SIGKILL, as a crash or an OOM kill would).
    pub fn kill(&mut self, n: usize) -> Option<Daemon> {
        let mut daemon = self.daemons[n - 1].take()?;
        let _ = daemon.child.child().kill();
        let _ = daemon.child.child().wait();
        Some(daemon)
    }

    /// Takes node n's daemon out of the world without stopping it (to stop it by hand while a
    /// successor runs); it is killed when the returned value drops.
    pub fn take(&mut self, n: usize) -> Option<Daemon> {
        self.daemons[n - 1].take()
    }

    /// Node n's running daemon.
    pub fn daemon(&self, n: usize) -> &Daemon {
        self.daemons[n - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node{n} has no running ztund"))
    }

    /// Rewrites the mesh file every daemon watches.
    pub fn write_mesh(&self, pods: &[MeshPod]) {
        // Write then rename, so a daemon never reads a half-written file.
        let tmp = self
            .cluster
            .write("mesh.yaml.new", &mesh_yaml(&self.bed, pods));
        std::fs::rename(tmp, self.cluster.path(MESH_FILE)).expect("replacing the mesh file");
    }

    /// Waits (bounded) until every running daemon applied mesh file generation `generation`
    /// (the first rewrite is generation 1); each polls the file on its own schedule.
    pub async fn wait_mesh_applied(&self, generation: u64) {
        let needle = format!("\"generation\":{generation},");
        for daemon in self.daemons.iter().flatten() {
            daemon.wait_log(&["mesh file applied", &needle]).await;
        }
    }

    /// TCP ports listening inside a place (`ss -Htln`).
    pub fn listening_ports(&self, place: Place) -> Vec<u16> {
        let out = self.bed.run_in(place, &["ss", "-Htln"]);
        let mut ports: Vec<u16> = out
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .filter_map(|local| local.rsplit(':').next()?.parse().ok())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Which of ztund's in-pod ports listen inside pod (n, p).
    pub fn inpod_listeners(&self, n: usize, p: usize) -> Vec<u16> {
        self.listening_ports(Place::Pod(n, p))
            .into_iter()
            .filter(|port| INPOD_PORTS.contains(port))
            .collect()
    }

    /// `nft list tables` inside a place.
    pub fn nft_tables(&self, place: Place) -> String {
        self.bed.run_in(place, &["nft", "list", "tables"])
    }

    /// Where node n's ztund pins its eBPF state (eBPF worlds).
    pub fn bpf_dir(&self, n: usize) -> Option<std::path::PathBuf> {
        Some(self.bpffs.as_ref()?.path().join(format!("node{n}")))
    }

    /// Whether pod (n, p) is captured: nftables, ztund's table in it; eBPF, ztund's programs
    /// attached to its cgroup and netns (and no table: eBPF adds no netfilter rules).
    pub fn capture_installed(&self, n: usize, p: usize, tables: &str) -> bool {
        let has_table = tables.contains("table inet ztund");
        match self.backend {
            Backend::Nftables => has_table,
            Backend::Ebpf => {
                let sandbox = self
                    .bed
                    .sandbox(n, p)
                    .expect("eBPF worlds sandbox every pod");
                let cgroup = std::fs::File::open(&sandbox.cgroup.0).expect("the pod's cgroup");
                let netns = self.bed.netns(Place::Pod(n, p));
                assert!(
                    !has_table,
                    "eBPF capture installed nftables rules:\n{tables}"
                );
                bpf::attached(&cgroup, bpf::INET4_CONNECT) == 1
                    && bpf::attached(&*netns, bpf::SK_LOOKUP) == 1
            }
        }
    }

    /// The address the app in pod `server` sees a client at `client` connect from: the client's
    /// own with nftables (ztund delivers with it as source); the server pod's with eBPF, which
    /// delivers from the pod's address (`capture::bpf::delivers_from_pod`).
    pub fn app_sees(&self, client: std::net::IpAddr, server: std::net::IpAddr) -> std::net::IpAddr {
        match self.backend {
            Backend::Nftables => client,
            Backend::Ebpf => server,
        }
    }

    /// Waits (bounded) until pod (n, p) has all or none of ztund's listeners and capture.
    pub async fn wait_captured(&self, n: usize, p: usize, captured: bool) {
        let what = format!(
            "pod ({n},{p}) {} ztund's listeners and capture ({:?})",
            if captured { "has" } else { "lost" },
            self.backend
        );
        eventually(&what, Duration::from_secs(10), || {
            let ports = self.inpod_listeners(n, p);
            let tables = self.nft_tables(Place::Pod(n, p));
            let installed = self.capture_installed(n, p, &tables);
            let done = if captured {
                ports == INPOD_PORTS && installed
            } else {
                ports.is_empty() && !installed
            };
            if done {
                Ok(())
            } else {
                Err(format!("listening: {ports:?}\ntables:\n{tables}"))
            }
        })
        .await
    }

    /// Established TCP connections inside a place whose remote port is `port`.
    pub fn established_to(&self, place: Place, port: u16) -> Vec<String> {
        let filter = format!("( dport = :{port} )");
        self.bed
            .run_in(place, &["ss", "-Htn", "state", "established", &filter])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for PodWorld {
    /// A failing test shows what the daemons said.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for daemon in self.daemons.iter().flatten() {
            let text = daemon.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- node{} ztund log (last {} lines) ----\n{}",
                daemon.node,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}
