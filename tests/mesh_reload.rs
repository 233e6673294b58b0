//! Bad input gets a clear error and loses nothing: an invalid mesh file stops a starting daemon
//! with a message naming file, document and field; an invalid change to a running daemon's mesh
//! file is refused and the last good mesh keeps serving; a valid change applies without restart.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::process::Command;

use support::{Cluster, socks5_connect};
use testbed::{Place, Testbed};

fn entry(name: &str, address: std::net::IpAddr, node: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default, annotations: {{ztund.io/node: {node}}}}}\nspec: {{address: \"{address}\", serviceAccount: {name}}}\n"
    )
}

#[test]
fn an_invalid_mesh_file_stops_the_daemon_with_the_field() {
    let cluster = Cluster::new();
    cluster.write(
        "mesh.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, targetPort: 70000}]\n",
    );
    let config = cluster.node_config("node1", "mesh.yaml", "");
    let out = Command::new(support::ztund_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("running ztund");
    assert!(
        !out.status.success(),
        "ztund started with an invalid mesh file"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "mesh.yaml",
        "document 1",
        "Service default/web",
        "spec.ports[0].targetPort",
    ] {
        assert!(
            stderr.contains(needle),
            "error does not name {needle:?}: {stderr}"
        );
    }
}

#[test]
fn an_invalid_config_names_the_field() {
    let cluster = Cluster::new();
    cluster.write("mesh.yaml", "");
    let config = cluster.node_config("node1", "mesh.yaml", "ports: {socks5: 15008}\n");
    let out = Command::new(support::ztund_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("running ztund");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node1.yaml") && stderr.contains("ports.socks5"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_change_is_refused_and_the_last_good_mesh_keeps_serving() {
    let bed = Testbed::new(2, 0);
    let cluster = Cluster::new();
    let good = format!(
        "{}---\n{}",
        entry("client", bed.node_ip(1), "node1"),
        entry("echo", bed.node_ip(2), "node2")
    );
    cluster.write("mesh.yaml", &good);
    let app = bed.serve(
        Place::Node(2),
        SocketAddr::new(bed.node_ip(2), 9000),
        |mut stream, _| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        },
    );
    let c1 = cluster.node_config("node1", "mesh.yaml", "");
    let c2 = cluster.node_config("node2", "mesh.yaml", "");
    let node2 = cluster.start(&bed, 2, &c2).await;
    let node1 = cluster.start(&bed, 1, &c1).await;

    // A broken edit: refused, named, and the tunnel still works.
    cluster.write(
        "mesh.yaml",
        &format!("{good}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: bad, namespace: default}}\nspec: {{nodeName: node1}}\nstatus: {{podIP: not-an-ip}}\n"),
    );
    let line = node1.wait_log(&["mesh file refused"]).await;
    assert!(
        line.contains("Pod default/bad") && line.contains("status.podIP"),
        "{line}"
    );
    let stream = socks5_connect(&bed, Place::Node(1), app)
        .await
        .expect("still serving");
    Testbed::assert_echo(stream, 1 << 20).await;

    // HARDENING Y1 (the "mesh file has no size cap"): a file over the cap is refused
    // without being parsed, naming the cap; memory stays where it was.
    let rss_before = rss_kib(node1.pid());
    let mut huge = good.clone();
    huge.push_str(&"#".repeat(ztund::mesh::k8s::MAX_MESH_BYTES + 1 - good.len()));
    cluster.write("mesh.yaml", &huge);
    let line = node1
        .wait_log(&["mesh file refused", "MAX_MESH_BYTES"])
        .await;
    assert!(line.contains("over the cap of 8388608 bytes"), "{line}");
    let rss_after = rss_kib(node1.pid());
    eprintln!("node1 RSS around an oversized mesh file: {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // HARDENING Y3: a misspelt field is refused by name, not read as absent.
    cluster.write(
        "mesh.yaml",
        &good.replace("serviceAccount: echo", "serviceAcount: echo"),
    );
    let line = node1
        .wait_log(&["mesh file refused", "spec.serviceAcount"])
        .await;
    assert!(line.contains("unknown field"), "{line}");
    let stream = socks5_connect(&bed, Place::Node(1), app)
        .await
        .expect("still serving after the refusals");
    Testbed::assert_echo(stream, 1 << 16).await;

    // A valid edit that renames the echo workload's service account: applied without restart
    // on both nodes; the client now expects the new identity and node 2 proves it.
    cluster.write(
        "mesh.yaml",
        &good.replace("serviceAccount: echo", "serviceAccount: echo-v2"),
    );
    node1
        .wait_log(&["mesh file applied", "\"generation\":1"])
        .await;
    node2
        .wait_log(&["mesh file applied", "\"generation\":1"])
        .await;
    let stream = socks5_connect(&bed, Place::Node(1), app)
        .await
        .expect("serving after reload");
    Testbed::assert_echo(stream, 1 << 16).await;
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
