//! A VM host (`capture: host`) keeps its network when ztund stops: a clean stop removes the nft
//! table, ip rule and route table; after `kill -9` the rules left behind refuse only mesh
//! destinations (fail closed) while every other destination still works, and a restarted ztund
//! adopts them; an upgrade leaves them to the successor, whose own clean stop removes them. Two nodes run the real ztund in host mode: node 1 (`vm`, 10.200.0.1) calls out,
//! node 2 holds the mesh workload `echo` (10.200.0.2:9000); pod 10.201.2.2 on node 2 is no mesh
//! member.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use support::{Cluster, Daemon, eventually};
use testbed::{Place, Testbed};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MESH: &str = r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {ztund.io/node: node1}}
spec: {address: "10.200.0.1", serviceAccount: vm}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo, namespace: default, annotations: {ztund.io/node: node2}}
spec: {address: "10.200.0.2", serviceAccount: echo}
"#;

const LATER: &str = r#"---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: later, namespace: default, annotations: {ztund.io/node: node2}}
spec: {address: "10.200.0.3", serviceAccount: later}
"#;

fn echo(mut stream: TcpStream, _peer: SocketAddr) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
}

/// Connections the VM host's own app (node 1, port 9001) accepted.
static HOST_APP_ACCEPTS: AtomicUsize = AtomicUsize::new(0);

fn counted_echo(stream: TcpStream, peer: SocketAddr) -> BoxFuture<'static, ()> {
    HOST_APP_ACCEPTS.fetch_add(1, Ordering::SeqCst);
    echo(stream, peer)
}

struct Vm {
    bed: Testbed,
    cluster: Cluster,
    node1: Daemon,
    _node2: Daemon,
    mesh_app: SocketAddr,
    outside_app: SocketAddr,
}

impl Vm {
    async fn start() -> Vm {
        let bed = Testbed::new(2, 1);
        // The nodes' own addresses: 10.200.0.1 and 10.200.0.2.
        assert_eq!(bed.node_ip(1).to_string(), "10.200.0.1");
        assert_eq!(bed.node_ip(2).to_string(), "10.200.0.2");
        let mesh_app = bed.serve(Place::Node(2), "10.200.0.2:9000".parse().unwrap(), echo);
        let outside_app = bed.echo_server(2, 1, 8080);
        let cluster = Cluster::new();
        cluster.write("mesh.yaml", MESH);
        let node2 = cluster
            .start(
                &bed,
                2,
                &cluster.node_config("node2", "mesh.yaml", "capture: host\n"),
            )
            .await;
        let node1 = cluster
            .start(
                &bed,
                1,
                &cluster.node_config("node1", "mesh.yaml", "capture: host\n"),
            )
            .await;
        Vm {
            bed,
            cluster,
            node1,
            _node2: node2,
            mesh_app,
            outside_app,
        }
    }

    /// A host process on node 1 calling `target`, as any program on the VM would.
    async fn call(&self, target: SocketAddr) -> std::io::Result<TcpStream> {
        let sockets = self.bed.app_sockets(Place::Node(1));
        match tokio::time::timeout(Duration::from_secs(5), sockets.connect(target, None)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {target}"),
            )),
        }
    }

    async fn assert_echoes(&self, target: SocketAddr) {
        let stream = self
            .call(target)
            .await
            .unwrap_or_else(|e| panic!("{target} from the VM host: {e}"));
        Testbed::assert_echo(stream, 256 * 1024).await;
    }

    fn node1(&self, args: &[&str]) -> Result<String, String> {
        self.bed.try_run_in(Place::Node(1), args)
    }

    /// Whether any of ztund's table, ip rule or route table is in node 1.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for family in ["ip", "inet"] {
            if self
                .node1(&["nft", "list", "table", family, "ztund"])
                .is_ok()
            {
                found.push(format!("nft table {family} ztund"));
            }
        }
        // The testbed's nodes have IPv6: its rule and route must go too.
        for family in ["-4", "-6"] {
            let rules = self
                .node1(&["ip", family, "rule", "show", "pref", "32764"])
                .unwrap();
            if !rules.trim().is_empty() {
                found.push(format!("ip {family} rule: {rules}"));
            }
            let routes = self
                .node1(&["ip", family, "route", "show", "table", "100"])
                .unwrap_or_default();
            if !routes.trim().is_empty() {
                found.push(format!("ip {family} route table 100: {routes}"));
            }
        }
        found
    }

    fn mesh_set(&self) -> String {
        self.node1(&["nft", "list", "set", "inet", "ztund", "mesh_destinations"])
            .unwrap_or_else(|e| e)
    }

    /// Waits (bounded) for node 1's ztund to exit; returns how long it took.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let since = Instant::now();
        loop {
            if let Some(status) = self.node1.child.child().try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                since.elapsed() < limit,
                "ztund still running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal_node1(&self, signal: libc::c_int) {
        // SAFETY: signals the ztund this test started, by its pid.
        assert_eq!(
            unsafe { libc::kill(self.node1.pid() as libc::pid_t, signal) },
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_removes_the_host_rules_and_both_destinations_stay_reachable() {
    let mut vm = Vm::start().await;
    // Only mesh destinations are redirected: the set holds the workloads, not the outsider.
    let set = vm.mesh_set();
    assert!(
        set.contains("10.200.0.1") && set.contains("10.200.0.2"),
        "{set}"
    );
    assert!(!set.contains("10.201.2.2"), "{set}");

    vm.assert_echoes(vm.mesh_app).await;
    vm.node1.wait_log(&["10.200.0.2:9000", "hbone"]).await;
    vm.assert_echoes(vm.outside_app).await;
    assert!(
        vm.node1.log_lines(&["10.201.2.2:8080"]).is_empty(),
        "a non-mesh destination went through ztund"
    );

    // A mesh change reaches the set without a restart.
    vm.cluster.write("mesh.yaml.tmp", &format!("{MESH}{LATER}"));
    std::fs::rename(
        vm.cluster.path("mesh.yaml.tmp"),
        vm.cluster.path("mesh.yaml"),
    )
    .unwrap();
    eventually(
        "the new workload in the set",
        Duration::from_secs(10),
        || {
            let set = vm.mesh_set();
            if set.contains("10.200.0.3") {
                Ok(())
            } else {
                Err(set)
            }
        },
    )
    .await;

    vm.signal_node1(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(7)).await;
    assert!(status.success(), "ztund exited with {status}");
    assert_eq!(
        vm.leftovers(),
        Vec::<String>::new(),
        "left behind after a clean stop"
    );
    vm.node1.wait_log(&["host capture removed"]).await;

    // The host's network is its own again: both reachable plainly.
    vm.assert_echoes(vm.mesh_app).await;
    vm.assert_echoes(vm.outside_app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_only_mesh_destinations_fail_closed_and_a_restart_adopts_the_rules() {
    let mut vm = Vm::start().await;
    vm.assert_echoes(vm.mesh_app).await;

    vm.signal_node1(libc::SIGKILL);
    vm.wait_exit(Duration::from_secs(5)).await;
    assert!(
        !vm.leftovers().is_empty(),
        "kill -9 cannot have removed the rules"
    );

    // Every other destination still works; the mesh destination is refused, never plaintext.
    vm.assert_echoes(vm.outside_app).await;
    match vm.call(vm.mesh_app).await {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "mesh destination with ztund dead: {e}"
        ),
        Ok(_) => panic!("a mesh destination was reached without ztund"),
    }

    // Inbound to the host's apps fails closed too (no plaintext falls through to them), while
    // an exempt port (SSH) stays reachable: ztund's death never cuts a host off entirely.
    let host_app = vm.bed.serve(
        Place::Node(1),
        "10.200.0.1:9001".parse().unwrap(),
        counted_echo,
    );
    let ssh = vm
        .bed
        .serve(Place::Node(1), "10.200.0.1:22".parse().unwrap(), echo);
    let outsider = vm.bed.app_sockets(Place::Pod(2, 1));
    let reached = tokio::time::timeout(Duration::from_secs(2), outsider.connect(host_app, None))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(!reached, "plaintext reached the host's app with ztund dead");
    assert_eq!(HOST_APP_ACCEPTS.load(Ordering::SeqCst), 0);
    let stream = outsider
        .connect(ssh, None)
        .await
        .expect("the exempt SSH port with ztund dead");
    Testbed::assert_echo(stream, 4096).await;

    // A restarted ztund adopts the rules: one rule, one table, traffic tunneled again.
    let config = vm.cluster.path("node1.yaml");
    vm.node1 = vm.cluster.start(&vm.bed, 1, &config).await;
    vm.assert_echoes(vm.mesh_app).await;
    vm.node1.wait_log(&["10.200.0.2:9000", "hbone"]).await;
    let rules = vm.node1(&["ip", "rule", "show", "pref", "32764"]).unwrap();
    assert_eq!(rules.lines().count(), 1, "{rules}");
    vm.assert_echoes(vm.outside_app).await;
}

// Issue 12, item 10: an upgrade leaves the rules to the successor, which then owns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_the_host_rules_to_the_successor_and_its_clean_stop_removes_them() {
    let mut vm = Vm::start().await;
    vm.assert_echoes(vm.mesh_app).await;

    let config = vm.cluster.path("node1.yaml");
    let successor = vm.cluster.spawn(&vm.bed, 1, &config);
    successor.wait_log(&["ztund ready"]).await;
    successor
        .wait_log(&[&format!("taking over from pid {}", vm.node1.pid())])
        .await;
    vm.signal_node1(libc::SIGTERM);
    vm.node1
        .wait_log(&[&format!("handing over to pid {}", successor.pid())])
        .await;
    let status = vm.wait_exit(Duration::from_secs(12)).await;
    assert!(status.success(), "the old ztund exited with {status}");
    assert!(
        vm.node1.log_lines(&["host capture removed"]).is_empty(),
        "the old ztund removed the rules its successor runs on"
    );
    let rules = vm.node1(&["ip", "rule", "show", "pref", "32764"]).unwrap();
    assert_eq!(
        rules.lines().count(),
        1,
        "one rule after the hand-over: {rules}"
    );

    // The successor alone: mesh traffic tunneled through it, the rest plain.
    let old = std::mem::replace(&mut vm.node1, successor);
    drop(old);
    vm.assert_echoes(vm.mesh_app).await;
    vm.node1.wait_log(&["10.200.0.2:9000", "hbone"]).await;
    vm.assert_echoes(vm.outside_app).await;

    // With no successor of its own, its clean stop removes everything.
    vm.signal_node1(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(7)).await;
    assert!(status.success(), "the successor exited with {status}");
    assert_eq!(vm.leftovers(), Vec::<String>::new(), "left behind");
    vm.assert_echoes(vm.mesh_app).await;
    vm.assert_echoes(vm.outside_app).await;
}
