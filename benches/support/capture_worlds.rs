//! The capture benchmark's worlds, each two testbed nodes with a ztund on each: `inpod` and
//! `inpod-ebpf` (the same pods captured in standalone mode through nftables, or through the
//! eBPF programs), and `host` (a VM host's own processes). Starts the daemons and the servers,
//! waits until capture is installed, and reads a netns's conntrack table size. The in-pod
//! worlds also have a route through the capture hop alone (no HBONE: a captured client to a
//! server no mesh workload owns). Knows nothing about what is measured.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::pods::{Backend, MESH_FILE, MeshPod, mesh_yaml};
use crate::support::{Cluster, Daemon, eventually};
use crate::testbed::bpf::{self, Bpffs};
use crate::testbed::{ChildGuard, Place, Testbed};
use crate::tools;

pub const ECHO_PORT: u16 = 9000;

/// Where a client runs and whom it calls.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub client: Place,
    pub server: IpAddr,
}

/// One world: both daemons, the servers behind both routes, the namespaces.
pub struct World {
    pub name: &'static str,
    // Fields drop in order: daemons and servers first, then the pins (their links go with the
    // bpffs), the namespaces last.
    pub daemons: [Daemon; 2],
    _servers: Vec<ChildGuard>,
    _bpffs: Option<Bpffs>,
    /// Route 0 is direct (no ztund), route 1 goes through both daemons.
    pub routes: [Route; 2],
    /// The capture hop alone: a captured client to route 0's server, which no mesh workload
    /// owns, so node 1's ztund passes the connection through as plain TCP (app → capture →
    /// 15001 → ztund dials the server). Compared with route 0, it is the hop's cost without
    /// HBONE. `None` in the host world: host capture redirects mesh destinations only.
    pub hop: Option<Route>,
    /// The echo server the burst calls, through ztund.
    pub echo: SocketAddr,
    _cluster: Cluster,
    pub bed: Testbed,
}

impl World {
    pub fn pids(&self) -> [u32; 2] {
        [self.daemons[0].pid(), self.daemons[1].pid()]
    }

    /// Both daemons' CPU seconds spent while `f` ran, and its result.
    pub fn with_cpu<T>(&self, f: impl FnOnce() -> T) -> (T, f64) {
        let total = |pids: [u32; 2]| pids.map(crate::burst::cpu_seconds).iter().sum::<f64>();
        let before = total(self.pids());
        let value = f();
        (value, total(self.pids()) - before)
    }

    /// Connects to `dst` as an app in `place` would: in an eBPF world, with a socket of the
    /// pod's cgroup (its sandbox's), as the programs capture by cgroup.
    pub fn connect(
        &self,
        place: Place,
        dst: SocketAddr,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(async move {
            match place {
                Place::Pod(n, p) => self.bed.connect_from(n, p, dst).await,
                other => self.bed.app_sockets(other).connect(dst, None).await,
            }
        })
    }

    /// Entries in the conntrack tables of the route's client and server namespaces together.
    pub fn conntrack_entries(&self, route: Route) -> f64 {
        [Some(route.client), self.place_of(route.server)]
            .into_iter()
            .flatten()
            .map(|place| conntrack_count(&self.bed, place))
            .sum()
    }

    /// The testbed place whose address `ip` is (a pod's or a node's).
    fn place_of(&self, ip: IpAddr) -> Option<Place> {
        for n in 1..=self.bed.nodes() {
            if self.bed.node_ip(n) == ip {
                return Some(Place::Node(n));
            }
            for p in 1..=self.bed.pods_per_node() {
                if self.bed.pod_ip(n, p) == ip {
                    return Some(Place::Pod(n, p));
                }
            }
        }
        None
    }
}

/// The size of a namespace's conntrack table (`nf_conntrack_count`, per netns): 0 when
/// conntrack is not loaded at all. Read from /proc rather than with `conntrack -C`, which needs
/// a package more.
pub fn conntrack_count(bed: &Testbed, place: Place) -> f64 {
    const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
    // /proc/sys/net shows the netns of the thread that opens it.
    bed.netns(place)
        .enter(|| std::fs::read_to_string(COUNT))
        .ok()
        .and_then(|r| r.ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0.0)
}

fn echo(mut stream: TcpStream, _peer: SocketAddr) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
}

/// `ztund run` in node `n` logging at `info`, as in production: that includes one access-log
/// line per connection and daemon (target `access`). Waits until it is ready.
async fn start_daemon(ztund: &Path, bed: &Testbed, cluster: &Cluster, n: usize) -> Daemon {
    let log = cluster.path(&format!("node{n}-{}.log", bed.prefix()));
    let mut command = Command::new(ztund);
    command
        .args(["--log-json", "run", "--config"])
        .arg(cluster.path(&format!("node{n}.yaml")))
        .env("ZTUND_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let daemon = Daemon {
        child: bed.spawn_in(Place::Node(n), command),
        log,
        node: n,
    };
    daemon.wait_ready(bed).await;
    daemon
}

/// Many short connections from one address: reuse TIME_WAIT, use every port.
fn tune(bed: &Testbed, place: Place) {
    bed.run_in(
        place,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.core.somaxconn=8192",
        ],
    );
}

/// Whether pod (n, 1) is captured: ztund's nftables table in it, or its eBPF programs attached
/// to the pod's cgroup and netns.
fn captured(bed: &Testbed, backend: Backend, n: usize) -> Result<(), String> {
    match backend {
        Backend::Nftables => {
            let tables = bed.run_in(Place::Pod(n, 1), &["nft", "list", "tables"]);
            // One `inet` table for both families since IPv6 capture.
            if tables.lines().any(|l| l.trim() == "table inet ztund") {
                Ok(())
            } else {
                Err(tables)
            }
        }
        Backend::Ebpf => {
            let sandbox = bed.sandbox(n, 1).expect("eBPF worlds sandbox every pod");
            let cgroup = std::fs::File::open(&sandbox.cgroup.0).expect("the pod's cgroup");
            let connect = bpf::attached(&cgroup, bpf::INET4_CONNECT);
            let lookup = bpf::attached(&*bed.netns(Place::Pod(n, 1)), bpf::SK_LOOKUP);
            if connect == 1 && lookup == 1 {
                Ok(())
            } else {
                Err(format!(
                    "connect4 programs {connect}, sk_lookup programs {lookup}"
                ))
            }
        }
    }
}

/// pod (1,1) → pod (2,1), both captured through `backend`, against pod (1,2) → pod (2,2), not
/// captured; and pod (1,1) → pod (2,2), the capture hop alone ([`World::hop`]). With eBPF
/// every pod gets a sandbox (a process in its netns and own cgroup, as kubelet's pause
/// container): ztund finds the pod's cgroup from it, and the servers and load tools join that
/// cgroup ([`tools::spawn`]).
pub async fn inpod_world(ztund: &Path, backend: Backend) -> World {
    let bed = Testbed::new(2, 2);
    let bpffs = (backend == Backend::Ebpf).then(|| {
        bed.sandbox_pods();
        Bpffs::new()
    });
    // Pod (2,2) is left out of the mesh: ztund reaches a mesh workload, even an uncaptured
    // one, through HBONE (or as a `Direct` workload when it opts out of the tunnel), and passes
    // an address no workload owns through as plain TCP (`proxy::route::plan`), which is what
    // the hop route measures. Route 0 never meets ztund either way.
    let pods = [
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
        MeshPod::uncaptured(1, 2, "plain-client"),
    ];
    let cluster = Cluster::new();
    cluster.write(MESH_FILE, &mesh_yaml(&bed, &pods));
    for n in [1, 2] {
        let mut extra = "capture: standalone\n".to_string();
        if let Some(bpffs) = &bpffs {
            let dir = bpffs.path().join(format!("node{n}"));
            extra.push_str(&format!(
                "captureBackend: ebpf\nbpfDir: {}\n",
                dir.display()
            ));
        }
        cluster.node_config(&format!("node{n}"), MESH_FILE, &extra);
        for place in [Place::Node(n), Place::Pod(n, 1), Place::Pod(n, 2)] {
            tune(&bed, place);
        }
    }
    // The servers before the daemons: with eBPF, ztund reads the pod's cgroup from the
    // processes in its netns when it enrols the pod, and they are all in the sandbox's.
    let mut servers = Vec::new();
    for p in [1, 2] {
        let dir = cluster.path(&format!("servers-pod-2-{p}"));
        servers.extend(tools::start_servers(
            &bed,
            Place::Pod(2, p),
            bed.pod_ip(2, p),
            &dir,
        ));
    }
    let node2 = start_daemon(ztund, &bed, &cluster, 2).await;
    let node1 = start_daemon(ztund, &bed, &cluster, 1).await;
    for n in [1, 2] {
        eventually(
            &format!("pod ({n},1) captured ({backend:?})"),
            Duration::from_secs(10),
            || captured(&bed, backend, n),
        )
        .await;
    }
    let echo = bed.echo_server(2, 1, ECHO_PORT);
    let routes = [
        Route {
            client: Place::Pod(1, 2),
            server: bed.pod_ip(2, 2),
        },
        Route {
            client: Place::Pod(1, 1),
            server: bed.pod_ip(2, 1),
        },
    ];
    let hop = Route {
        client: Place::Pod(1, 1),
        server: bed.pod_ip(2, 2),
    };
    World {
        name: match backend {
            Backend::Nftables => "inpod",
            Backend::Ebpf => "inpod-ebpf",
        },
        daemons: [node1, node2],
        _servers: servers,
        _bpffs: bpffs,
        routes,
        hop: Some(hop),
        echo,
        _cluster: cluster,
        bed,
    }
}

/// A VM host's own processes (`capture: host`): node 1 → node 2's address, against node 1 →
/// pod (2,1), no mesh member.
pub async fn host_world(ztund: &Path) -> World {
    let bed = Testbed::new(2, 1);
    let (n1, n2) = (bed.node_ip(1), bed.node_ip(2));
    let cluster = Cluster::new();
    cluster.write(
        MESH_FILE,
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: vm, namespace: default, annotations: {{ztund.io/node: node1}}}}\n\
             spec: {{address: \"{n1}\", serviceAccount: vm}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: app, namespace: default, annotations: {{ztund.io/node: node2}}}}\n\
             spec: {{address: \"{n2}\", serviceAccount: app}}\n"
        ),
    );
    for n in [1, 2] {
        cluster.node_config(&format!("node{n}"), MESH_FILE, "capture: host\n");
        for place in [Place::Node(n), Place::Pod(n, 1)] {
            tune(&bed, place);
        }
    }
    let node2 = start_daemon(ztund, &bed, &cluster, 2).await;
    let node1 = start_daemon(ztund, &bed, &cluster, 1).await;
    let mut servers =
        tools::start_servers(&bed, Place::Node(2), n2, &cluster.path("servers-node-2"));
    servers.extend(tools::start_servers(
        &bed,
        Place::Pod(2, 1),
        bed.pod_ip(2, 1),
        &cluster.path("servers-pod-2-1"),
    ));
    let echo = bed.serve(Place::Node(2), SocketAddr::new(n2, ECHO_PORT), echo);
    let routes = [
        Route {
            client: Place::Node(1),
            server: bed.pod_ip(2, 1),
        },
        Route {
            client: Place::Node(1),
            server: n2,
        },
    ];
    World {
        name: "host",
        _bpffs: None,
        daemons: [node1, node2],
        _servers: servers,
        routes,
        hop: None,
        echo,
        _cluster: cluster,
        bed,
    }
}

/// Waits (bounded) until every server answers on every route (the hop's too), and warms
/// ztund's pool.
pub fn wait_for_servers(world: &World) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for route in world.routes.into_iter().chain(world.hop) {
        let url = format!("http://{}:{}/", route.server, tools::HTTP_PORT);
        while tools::try_run(
            &world.bed,
            route.client,
            &["wrk", "-t1", "-c1", "-d1s", &url],
        )
        .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: nginx on {url} did not answer",
                world.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
