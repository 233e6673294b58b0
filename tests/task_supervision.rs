//! Issue 14 item 8, through the real binary: a config that would kill a background task is
//! refused at load naming the key, and a background task killed by a real fault (the mesh
//! file's directory removed) turns readiness to 500 naming it, is logged and counted, and is
//! restarted until the fault heals, after which changes apply again.

mod support;
mod testbed;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::Cluster;
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SLEEP: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: default}\nspec: {nodeName: node1}\nstatus: {podIP: 10.201.1.2}\n";
const ECHO: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: echo, namespace: default}\nspec: {nodeName: node2}\nstatus: {podIP: 10.201.2.2}\n";

/// `GET path` on 127.0.0.1:`port` inside node 1: the status code and the body.
async fn get(bed: &Testbed, port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = bed
        .app_sockets(Place::Node(1))
        .connect(addr, None)
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    let code = answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

#[test]
fn a_zero_watch_interval_is_refused_by_run_and_check_naming_the_key() {
    let cluster = Cluster::new();
    cluster.write("mesh.yaml", SLEEP);
    let config = cluster.node_config("node1", "mesh.yaml", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("watchInterval: 200ms", "watchInterval: 0s"),
    )
    .unwrap();
    for args in [["run", "--config"], ["check", "--config"]] {
        let out = Command::new(support::ztund_bin())
            .args(args)
            .arg(&config)
            .output()
            .expect("running ztund");
        assert!(!out.status.success(), "{args:?} accepted watchInterval: 0s");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("node1.yaml")
                && stderr.contains("field `watchInterval`")
                && stderr.contains("out of range"),
            "{args:?}: {stderr}"
        );
    }
    // The same file with a sane interval passes `check`, which then reads its mesh file.
    let good = cluster.node_config("node1", "mesh.yaml", "");
    let out = Command::new(support::ztund_bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("running ztund check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_watcher_killed_by_its_directory_vanishing_is_reported_and_restarted() {
    let bed = Testbed::new(1, 0);
    let cluster = Cluster::new();
    let dir = cluster.path("meshdir");
    std::fs::create_dir(&dir).unwrap();
    cluster.write("meshdir/mesh.yaml", SLEEP);
    let config = cluster.node_config("node1", "meshdir/mesh.yaml", "");
    let node = cluster.start(&bed, 1, &config).await;

    std::fs::remove_dir_all(&dir).unwrap();
    let line = node
        .wait_log(&["background task mesh watcher failed", "is gone"])
        .await;
    assert!(line.to_lowercase().contains("error"), "{line}");
    let (code, body) = get(&bed, 15021, "/healthz/ready").await.expect("readiness");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("task failed: mesh watcher"), "{body}");
    let (_, metrics) = get(&bed, 15020, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("ztund_task_failures_total{task=\"mesh watcher\"}"),
        "{metrics}"
    );
    // The daemon keeps serving the last good mesh meanwhile.
    let (_, dump) = get(&bed, 15000, "/config_dump").await.expect("config dump");
    assert!(dump.contains("sleep"), "{dump}");

    // The directory comes back with a changed mesh: a restarted watcher applies it, and once
    // it has run healthy for a while readiness is 200 again.
    std::fs::create_dir(&dir).unwrap();
    cluster.write("meshdir/mesh.yaml", &format!("{SLEEP}---\n{ECHO}"));
    node.wait_log(&["restarting the background task", "mesh watcher"])
        .await;
    node.wait_log(&["mesh file applied", "\"workloads\":2"])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get(&bed, 15021, "/healthz/ready").await.map(|(c, _)| c);
        if ready == Some(200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again: {ready:?}\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, dump) = get(&bed, 15000, "/config_dump").await.expect("config dump");
    assert!(dump.contains("echo"), "{dump}");
}
