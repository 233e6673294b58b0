//! Three real ztund nodes run entirely from one `ztund controlplane`: workloads, policies and
//! every certificate come from it. A workload added to its directory is reachable from another
//! node within 2 s; removed, its node drops the certificate of its identity.

mod policy_world;
mod support;
mod testbed;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use policy_world::{App, addr, docs, echoes};
use support::controlplane::{ControlPlane, all_workloads_from_xds, config_dump};
use support::{Cluster, Daemon, eventually, socks5_connect};
use testbed::{Place, Testbed};

fn entry(name: &str, address: &str, node: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: default, annotations: {{ztund.io/node: {node}}}}}\nspec: {{address: \"{address}\", serviceAccount: {name}, labels: {{app: {name}}}}}\n"
    )
}

fn identities(dump: &serde_json::Value) -> Vec<String> {
    dump["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .map(|c| c["identity"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn reaches(bed: &Testbed, target: SocketAddr) -> bool {
    match socks5_connect(bed, Place::Node(1), target).await {
        Ok(mut stream) => echoes(&mut stream).await,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_from_the_control_plane_gain_and_lose_a_workload() {
    let bed = Testbed::new(3, 0);
    bed.run_in(
        Place::Node(3),
        &["ip", "addr", "add", "10.200.0.33/24", "dev", "eth0"],
    );
    let cluster = Cluster::new();
    let base = [
        entry("sleep", "10.200.0.1", "node1"),
        entry("echo", "10.200.0.2", "node2"),
        entry("web", "10.200.0.3", "node3"),
    ];
    let base_refs: Vec<&str> = base.iter().map(String::as_str).collect();
    std::fs::create_dir_all(cluster.path("cp")).expect("cp dir");
    std::fs::write(cluster.path("cp/mesh.yaml"), docs(&base_refs)).expect("cp yaml");
    let cp = ControlPlane::start(&bed, &cluster, Place::Node(1), addr("10.200.0.1", 15012)).await;
    let echo = App::start(&bed, Place::Node(2), addr("10.200.0.2", 9000));
    let web = App::start(&bed, Place::Node(3), addr("10.200.0.3", 9000));
    let web2 = App::start(&bed, Place::Node(3), addr("10.200.0.33", 9000));
    let mut daemons: Vec<Daemon> = Vec::new();
    for (n, extra) in [(1, ""), (2, "capture: host\n"), (3, "capture: host\n")] {
        let config = cp.node_config(&cluster, &format!("node{n}"), extra);
        daemons.push(cluster.start(&bed, n, &config).await);
    }

    // Every node took its workloads and its certificates from the control plane.
    for (n, identity) in [(1, "sleep"), (2, "echo"), (3, "web")] {
        let dump = config_dump(&bed, n);
        assert_eq!(
            dump["workloads"].as_array().map(Vec::len),
            Some(3),
            "{dump}"
        );
        assert!(all_workloads_from_xds(&dump), "node{n}: {dump}");
        assert_eq!(
            identities(&dump),
            [format!("spiffe://cluster.local/ns/default/sa/{identity}")],
            "node{n}"
        );
    }
    assert!(
        reaches(&bed, addr("10.200.0.2", 9000)).await,
        "node1 → echo on node2"
    );
    assert!(
        reaches(&bed, addr("10.200.0.3", 9000)).await,
        "node1 → web on node3"
    );
    assert_eq!((echo.accepted(), web.accepted()), (1, 1));
    daemons[1]
        .wait_log(&[
            "spiffe://cluster.local/ns/default/sa/sleep",
            "10.200.0.2:9000",
        ])
        .await;

    // A new workload: reachable through HBONE within 2 s of the file change.
    let mut grown = base_refs.clone();
    let added = entry("web2", "10.200.0.33", "node3");
    grown.push(&added);
    let start = Instant::now();
    cp.write("mesh.yaml", &docs(&grown));
    // Before node 1 knows it, the address is no mesh member: only a connection that node 3's
    // ztund served with sleep's identity counts.
    let over_hbone = |d: &Daemon| !d.log_lines(&["sa/sleep", "10.200.0.33:9000"]).is_empty();
    while !(reaches(&bed, addr("10.200.0.33", 9000)).await && over_hbone(&daemons[2])) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the new workload was not reachable within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("new workload reachable after {:?}", start.elapsed());
    assert!(web2.accepted() >= 1);
    let web2_id = "spiffe://cluster.local/ns/default/sa/web2".to_string();
    assert!(identities(&config_dump(&bed, 3)).contains(&web2_id));

    // Removed: node 3 drops the certificate of the identity no workload of it has any more.
    cp.write("mesh.yaml", &docs(&base_refs));
    eventually(
        "web2's certificate dropped on node3",
        Duration::from_secs(2),
        || {
            let ids = identities(&config_dump(&bed, 3));
            if ids.contains(&web2_id) {
                Err(format!("{ids:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    daemons[2]
        .wait_log(&["certificate dropped", "sa/web2"])
        .await;
    drop(cp);
}
