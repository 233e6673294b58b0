//! The world the policy tests share: two nodes running the real ztund. Node 1 (capture `none`)
//! holds two mesh clients on its own addresses — `default/sleep` on 10.200.0.1 and `foo/foo` on
//! 10.200.0.11 — that reach the mesh through its SOCKS5 listener, and plays plaintext clients
//! with plain TCP. Node 2 (capture `host`: its inbound TCP goes to 15006, HBONE to 15008) holds
//! `default/echo` on 10.200.0.2 (apps on 9000 and 9001, behind `example-service` 10.96.0.20:80)
//! and `bar/bar` on 10.200.0.22 (app on 9000); node 2 also routes to pod 10.201.2.2, which is
//! no mesh member (for destinations outside the mesh). Policies change by rewriting the one mesh file
//! both daemons watch. Use it with `mod support; mod testbed; mod policy_world;`.
//!
//! Every address has an IPv6 twin ([`Family`]): a world built with [`Family::V6`] lists the
//! workloads and the service by their v6 addresses (fd00:200::1, ::11, ::2, ::22, VIP
//! fd00:96::20, the outside pod fd00:201:2::2) and its clients speak v6 only; the constants
//! below are the IPv4 ones. `on_both_families!` runs a case on each.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::controlplane::ControlPlane;
use crate::support::{Cluster, Daemon};
use crate::testbed::{Place, Testbed};

pub const SLEEP: &str = "10.200.0.1";
pub const FOO: &str = "10.200.0.11";
pub const ECHO: &str = "10.200.0.2";
pub const BAR: &str = "10.200.0.22";
/// Pod 1 of node 2: reachable, but no mesh member.
pub const OUTSIDE: &str = "10.201.2.2";
pub const EXAMPLE_SERVICE: &str = "10.96.0.20:80";

/// The address family a world's workloads, service and clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `default/sleep` on node 1.
    pub fn sleep(self) -> &'static str {
        self.pick(SLEEP, "fd00:200::1")
    }

    /// `foo/foo` on node 1.
    pub fn foo(self) -> &'static str {
        self.pick(FOO, "fd00:200::11")
    }

    /// `default/echo` on node 2.
    pub fn echo(self) -> &'static str {
        self.pick(ECHO, "fd00:200::2")
    }

    /// `bar/bar` on node 2.
    pub fn bar(self) -> &'static str {
        self.pick(BAR, "fd00:200::22")
    }

    /// Pod 1 of node 2: reachable, but no mesh member.
    pub fn outside(self) -> &'static str {
        self.pick(OUTSIDE, "fd00:201:2::2")
    }

    /// `example-service`'s cluster IP.
    pub fn service_vip(self) -> &'static str {
        self.pick("10.96.0.20", "fd00:96::20")
    }

    /// `example-service` on port 80.
    pub fn example_service(self) -> SocketAddr {
        addr(self.service_vip(), 80)
    }

    /// The CIDR holding exactly `ip`, for ipBlocks.
    pub fn host_cidr(self, ip: &str) -> String {
        format!("{ip}/{}", self.pick("32", "128"))
    }

    /// The wildcard address node 1's SOCKS5 listener binds, quoted for YAML.
    fn any(self) -> &'static str {
        self.pick("0.0.0.0", "\"::\"")
    }

    fn pick(self, v4: &'static str, v6: &'static str) -> &'static str {
        match self {
            Family::V4 => v4,
            Family::V6 => v6,
        }
    }
}

/// Two `#[tokio::test]`s per case, `<case>::ipv4` and `<case>::ipv6`: each case is an
/// `async fn case(fam: Family)` in the test file, run in a world of each family.
#[allow(unused_macros)] // Not every user of this module has cases.
macro_rules! on_both_families {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ipv4() {
                super::$case(crate::policy_world::Family::V4).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ipv6() {
                super::$case(crate::policy_world::Family::V6).await
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_families;

/// The four documents of Istio's mutual-TLS guide, as the issue gives them.
pub const PA_DEFAULT_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
";
pub const PA_DEFAULT_PERMISSIVE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: PERMISSIVE
";
pub const DR_EXAMPLE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: example-destination
  namespace: default
spec:
  host: example-service.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";
pub const PA_GLOBAL_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: global-mtls
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
";

/// The workloads and the service; policies are appended to it.
pub const BASE_MESH: &str = r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: sleep, namespace: default, annotations: {ztund.io/node: node1}}
spec: {address: "10.200.0.1", serviceAccount: sleep, labels: {app: sleep}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: foo, namespace: foo, annotations: {ztund.io/node: node1}}
spec: {address: "10.200.0.11", serviceAccount: foo, labels: {app: foo}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo, namespace: default, annotations: {ztund.io/node: node2}}
spec: {address: "10.200.0.2", serviceAccount: echo, labels: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: bar, namespace: bar, annotations: {ztund.io/node: node2}}
spec: {address: "10.200.0.22", serviceAccount: bar, labels: {app: bar}}
---
apiVersion: v1
kind: Service
metadata: {name: example-service, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: 9000}]
"#;

/// [`BASE_MESH`] with `fam`'s addresses.
pub fn base_mesh(fam: Family) -> String {
    if fam == Family::V4 {
        return BASE_MESH.to_string();
    }
    // Quoted, so "10.200.0.1" does not match the start of "10.200.0.11".
    [FOO, BAR, SLEEP, ECHO]
        .iter()
        .zip([fam.foo(), fam.bar(), fam.sleep(), fam.echo()])
        .fold(BASE_MESH.to_string(), |mesh, (v4, v6)| {
            mesh.replace(&format!("\"{v4}\""), &format!("\"{v6}\""))
        })
        .replace(
            "clusterIP: 10.96.0.20\n",
            &format!(
                "clusterIP: \"{vip}\"\n  clusterIPs: [\"{vip}\"]\n  ipFamilies: [IPv6]\n",
                vip = fam.service_vip()
            ),
        )
}

/// Joins YAML documents into one file.
pub fn docs(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_end())
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("test IP"), port)
}

/// An echo app that counts the connections it accepted and the bytes it received.
#[derive(Clone, Default)]
pub struct App {
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl App {
    pub fn start(bed: &Testbed, place: Place, addr: SocketAddr) -> App {
        let app = App::default();
        let listener = bed
            .app_sockets(place)
            .listener(addr, false)
            .expect("app listener");
        let counters = app.clone();
        bed.keep_task(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counters.accepted.fetch_add(1, Ordering::SeqCst);
                let bytes = counters.bytes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                bytes.fetch_add(n, Ordering::SeqCst);
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        }));
        app
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

pub struct World {
    /// The family of every address below.
    pub fam: Family,
    pub bed: Testbed,
    pub cluster: Cluster,
    /// `default/echo` on 9000 and 9001.
    pub echo: App,
    pub echo_9001: App,
    /// `bar/bar` on 9000.
    pub bar: App,
    pub node1: Daemon,
    pub node2: Daemon,
    /// Set when the daemons take the mesh from `ztund controlplane` (on node 1, 10.200.0.1:15012)
    /// instead of the mesh file.
    pub control_plane: Option<ControlPlane>,
}

/// Where the daemons of a [`World`] take the mesh from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshSource {
    /// The mesh file both daemons watch.
    File,
    /// `ztund controlplane` serving the same YAML over xDS, certificates from its CA.
    ControlPlane,
}

impl World {
    /// Both daemons up with the base mesh plus `policies`.
    pub async fn new(policies: &[&str]) -> World {
        World::from_source(MeshSource::File, policies).await
    }

    /// Both daemons up with the base mesh plus `policies`, taken from `source`.
    pub async fn from_source(source: MeshSource, policies: &[&str]) -> World {
        World::with_node2_extra(source, policies, "").await
    }

    /// [`World::from_source`] with `extra` YAML appended to node 2's config.
    pub async fn with_node2_extra(source: MeshSource, policies: &[&str], extra: &str) -> World {
        World::build(Family::V4, source, policies, extra).await
    }

    /// Both daemons up with the base mesh of `fam` plus `policies`, from the mesh file.
    pub async fn of_family(fam: Family, policies: &[&str]) -> World {
        World::build(fam, MeshSource::File, policies, "").await
    }

    /// The world of `fam` with the mesh from `source` and `extra` YAML in node 2's config.
    pub async fn build(fam: Family, source: MeshSource, policies: &[&str], extra: &str) -> World {
        let bed = Testbed::new(2, 1);
        // Without DAD the v6 addresses are usable at once (the testbed adds its own so too).
        let (len, nodad) = fam_prefix(fam);
        for (node, ip) in [(1, fam.foo()), (2, fam.bar())] {
            let cidr = format!("{ip}/{len}");
            let mut cmd = vec!["ip", "addr", "add", &cidr, "dev", "eth0"];
            cmd.extend_from_slice(nodad);
            bed.run_in(Place::Node(node), &cmd);
        }
        let cluster = Cluster::new();
        let echo = App::start(&bed, Place::Node(2), addr(fam.echo(), 9000));
        let echo_9001 = App::start(&bed, Place::Node(2), addr(fam.echo(), 9001));
        let bar = App::start(&bed, Place::Node(2), addr(fam.bar(), 9000));
        let socks5 = format!("socks5Bind: {}\n", fam.any());
        let (c1, c2, control_plane) = match source {
            MeshSource::File => {
                write_atomically(&cluster, &mesh_text(fam, policies));
                let c1 = cluster.node_config("node1", "mesh.yaml", &socks5);
                let c2 =
                    cluster.node_config("node2", "mesh.yaml", &format!("capture: host\n{extra}"));
                (c1, c2, None)
            }
            MeshSource::ControlPlane => {
                std::fs::create_dir_all(cluster.path("cp")).expect("control plane dir");
                std::fs::write(cluster.path("cp/mesh.yaml"), mesh_text(fam, policies))
                    .expect("control plane YAML");
                let listen = addr(fam.sleep(), 15012);
                let cp = ControlPlane::start(&bed, &cluster, Place::Node(1), listen).await;
                let c1 = cp.node_config(&cluster, "node1", &socks5);
                let c2 = cp.node_config(&cluster, "node2", &format!("capture: host\n{extra}"));
                (c1, c2, Some(cp))
            }
        };
        let node2 = cluster.start(&bed, 2, &c2).await;
        let node1 = cluster.start(&bed, 1, &c1).await;
        World {
            fam,
            bed,
            cluster,
            echo,
            echo_9001,
            bar,
            node1,
            node2,
            control_plane,
        }
    }

    /// Rewrites the mesh file with the base mesh plus `policies` and waits until both daemons
    /// have applied it.
    pub async fn apply(&self, policies: &[&str]) {
        let before = [applied(&self.node1), applied(&self.node2)];
        match &self.control_plane {
            None => write_atomically(&self.cluster, &mesh_text(self.fam, policies)),
            Some(cp) => cp.write("mesh.yaml", &mesh_text(self.fam, policies)),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while applied(&self.node1) == before[0] || applied(&self.node2) == before[1] {
            assert!(
                Instant::now() < deadline,
                "the daemons did not apply the new mesh file:\n{}\n{}",
                self.node1.log_text(),
                self.node2.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A SOCKS5 CONNECT through node 1's ztund as the mesh client at `client` (sleep or foo of
    /// the world's family).
    pub async fn mesh_client(&self, client: &str, target: SocketAddr) -> Result<TcpStream, u8> {
        let proxy = addr(self.fam.sleep(), 15080);
        let mut stream = self
            .bed
            .app_sockets(Place::Node(1))
            .connect(proxy, Some(client.parse().expect("client IP")))
            .await
            .expect("connecting to the SOCKS5 listener");
        stream.write_all(&[5, 1, 0]).await.expect("greeting");
        let mut choice = [0u8; 2];
        stream.read_exact(&mut choice).await.expect("method choice");
        assert_eq!(choice, [5, 0]);
        let mut request = vec![5, 1, 0];
        match target.ip() {
            IpAddr::V4(v4) => {
                request.push(1);
                request.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                request.push(4);
                request.extend_from_slice(&v6.octets());
            }
        }
        request.extend_from_slice(&target.port().to_be_bytes());
        stream.write_all(&request).await.expect("request");
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).await.expect("reply");
        if reply[1] == 0 {
            Ok(stream)
        } else {
            Err(reply[1])
        }
    }

    /// Plain TCP from node 1 (source `client`) straight to `target` on node 2.
    pub async fn plaintext(&self, client: &str, target: SocketAddr) -> TcpStream {
        self.bed
            .app_sockets(Place::Node(1))
            .connect(target, Some(client.parse().expect("client IP")))
            .await
            .expect("plain TCP to node 2 (the capture accepts before deciding)")
    }
}

/// Sends `ping` and expects it back within a few seconds.
pub async fn echoes(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"ping"
    )
}

/// Waits (bounded) until the peer closes or resets the stream.
pub async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// The log lines of `daemon` that contain all of `needles`, waiting (bounded) for one.
pub async fn log_line(daemon: &Daemon, needles: &[&str]) -> String {
    daemon.wait_log(needles).await
}

fn applied(daemon: &Daemon) -> usize {
    daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("mesh file applied") || l.contains("xds update applied"))
        .count()
}

fn mesh_text(fam: Family, policies: &[&str]) -> String {
    let base = base_mesh(fam);
    let mut all = vec![base.as_str()];
    all.extend_from_slice(policies);
    docs(&all)
}

/// The prefix length of a node's extra address on the bridge, and the flag that skips DAD.
fn fam_prefix(fam: Family) -> (&'static str, &'static [&'static str]) {
    match fam {
        Family::V4 => ("24", &[]),
        Family::V6 => ("64", &["nodad"]),
    }
}

/// Replaces the mesh file in one rename, so a watcher never reads half a file.
fn write_atomically(cluster: &Cluster, text: &str) {
    let tmp = cluster.write("mesh.yaml.tmp", text);
    std::fs::rename(tmp, cluster.path("mesh.yaml")).expect("renaming the mesh file");
}

impl Drop for World {
    /// A failing test shows what both daemons said.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node1 log ---\n{}", self.node1.log_text());
            eprintln!("--- node2 log ---\n{}", self.node2.log_text());
        }
    }
}

/// A mesh client denied: non-zero SOCKS5 reply, nothing at the app, the policy in node 2's log.
pub async fn assert_mesh_denied(w: &World, client: &str, port: u16, policy: &str) {
    let before = (w.echo.accepted(), w.echo_9001.accepted());
    let reply = w.mesh_client(client, addr(w.fam.echo(), port)).await;
    assert!(reply.is_err(), "{client} → echo:{port} was let through");
    let line = log_line(&w.node2, &["connection refused", "\"status\":401", policy]).await;
    assert!(
        line.contains(&addr(w.fam.echo(), port).to_string()),
        "{line}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        (w.echo.accepted(), w.echo_9001.accepted()),
        before,
        "a denied client reached the app"
    );
}

pub async fn assert_mesh_allowed(w: &World, client: &str, port: u16) {
    let mut stream = w
        .mesh_client(client, addr(w.fam.echo(), port))
        .await
        .unwrap_or_else(|code| panic!("{client} → echo:{port} refused with {code}"));
    assert!(
        echoes(&mut stream).await,
        "{client} → echo:{port} not served"
    );
}
