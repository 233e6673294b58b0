//! A mesh run entirely from `ztund controlplane`: the real control plane process serves the
//! YAML over Delta xDS and signs every node's certificates through Istio's CA API; the real
//! daemons enforce what it pushes. The same policy documents decide as they do from a mesh
//! file; a change reaches every node within 2 s and closes the open connections it now denies
//! (namespace-wide and selector policies alike); a control plane that goes away leaves the
//! nodes serving from their last state, and they resync when it is back.

mod policy_world;
mod support;
mod testbed;

use std::time::{Duration, Instant};

use policy_world::*;
use support::controlplane::{all_workloads_from_xds, config_dump};

fn ap(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}"
    )
}

const DENY_SLEEP_SELECTOR: &str = "  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n";

/// Time until a new connection from `client` is refused (polled every 20 ms, bounded).
async fn until_denied(w: &World, client: &str, port: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if w.mesh_client(client, addr(ECHO, port)).await.is_err() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{client} → echo:{port} still allowed after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_from_the_control_plane_decide_as_the_mesh_file_does() {
    let w = World::from_source(
        MeshSource::ControlPlane,
        &[&ap("deny-sleep", DENY_SLEEP_SELECTOR), PA_DEFAULT_STRICT],
    )
    .await;
    // The selector policy reaches echo through its authorization_policies list.
    assert_mesh_denied(&w, SLEEP, 9000, "default/deny-sleep").await;
    assert_mesh_allowed(&w, FOO, 9000).await;
    // STRICT arrives as the static policy istiod would reference: plaintext is closed unserved.
    let mut plain = w.plaintext(FOO, addr(ECHO, 9001)).await;
    assert!(!echoes(&mut plain).await, "plaintext served under STRICT");
    assert_eq!(w.echo_9001.accepted(), 0, "plaintext reached the app");
    log_line(
        &w.node2,
        &[
            "connection refused",
            "istio-system/istio_converted_static_strict",
        ],
    )
    .await;
    // The identity the server saw is the one the control plane's CA signed for node 1.
    log_line(
        &w.node2,
        &[
            "spiffe://cluster.local/ns/foo/sa/foo",
            "\"dst.addr\":\"10.200.0.2:9000\"",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_reaches_every_node_within_two_seconds_and_closes_what_it_denies() {
    let w = World::from_source(MeshSource::ControlPlane, &[]).await;
    let mut hbone_sleep = w.mesh_client(SLEEP, addr(ECHO, 9000)).await.expect("sleep");
    let mut hbone_foo = w.mesh_client(FOO, addr(ECHO, 9000)).await.expect("foo");
    let mut plain = w.plaintext(FOO, addr(ECHO, 9001)).await;
    for stream in [&mut hbone_sleep, &mut hbone_foo, &mut plain] {
        assert!(echoes(stream).await);
    }

    // Namespace-wide: no selector.
    let namespace_wide = ap(
        "ns-deny-sleep",
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n",
    );
    let cp = w.control_plane.as_ref().expect("control plane");
    cp.write("mesh.yaml", &mesh_with(&[&namespace_wide]));
    let took = until_denied(&w, SLEEP, 9000, Duration::from_secs(2)).await;
    eprintln!("namespace-wide policy enforced after {took:?}");
    assert!(
        is_closed(&mut hbone_sleep).await,
        "the denied stream stayed open"
    );
    assert!(echoes(&mut hbone_foo).await, "an allowed stream was closed");

    // Workload selector: reaches echo only through its authorization_policies list.
    let selector = ap(
        "deny-plaintext-9001",
        "  selector: {matchLabels: {app: echo}}\n  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}], to: [{operation: {ports: ['9001']}}]}]\n",
    );
    let start = Instant::now();
    cp.write("mesh.yaml", &mesh_with(&[&namespace_wide, &selector]));
    assert!(
        is_closed(&mut plain).await,
        "the open plaintext connection a new selector policy denies stayed open"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    log_line(
        &w.node2,
        &["connection closed by policy", "default/deny-plaintext-9001"],
    )
    .await;
    assert!(echoes(&mut hbone_foo).await, "an allowed stream was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_serve_from_their_last_state_while_the_control_plane_is_away() {
    let mut w = World::from_source(MeshSource::ControlPlane, &[]).await;
    let mut open = w.mesh_client(FOO, addr(ECHO, 9000)).await.expect("foo");
    assert!(echoes(&mut open).await);
    let dump_before = config_dump(&w.bed, 2);

    w.control_plane.as_mut().expect("control plane").kill();
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(30) {
        assert!(
            echoes(&mut open).await,
            "an open connection stopped flowing"
        );
        // New connections between known workloads are served from cached state.
        assert_mesh_allowed(&w, SLEEP, 9001).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut cp = w.control_plane.take().expect("control plane");
    cp.restart(&w.bed).await;
    // Both nodes come back; their state is what it was, without duplicates or losses.
    // Each node resumes with the versions it holds: the control plane's first push of the
    // workload type to it sends nothing new (initial_resource_versions honoured).
    let address_pushes = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("\"push\"") && l.contains("istio.workload.Address"))
            .map(str::to_string)
            .collect()
    };
    support::eventually("nodes resumed", Duration::from_secs(20), || {
        let pushes = address_pushes(&cp.log_text());
        if pushes.len() >= 2 {
            Ok(())
        } else {
            Err(cp.log_text())
        }
    })
    .await;
    for push in address_pushes(&cp.log_text()) {
        assert!(
            push.contains("\"added\":0") && push.contains("\"removed\":0"),
            "a resumed node was sent workloads it already held: {push}"
        );
    }
    w.control_plane = Some(cp);
    assert_eq!(
        workload_uids(&config_dump(&w.bed, 2)),
        workload_uids(&dump_before)
    );
    assert!(
        echoes(&mut open).await,
        "the open connection broke on resync"
    );
    assert_mesh_allowed(&w, FOO, 9000).await;
}

fn mesh_with(policies: &[&str]) -> String {
    let mut all = vec![BASE_MESH];
    all.extend_from_slice(policies);
    docs(&all)
}

fn workload_uids(dump: &serde_json::Value) -> Vec<String> {
    let mut uids: Vec<String> = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| w["uid"].as_str().unwrap_or_default().to_string())
        .collect();
    uids.sort();
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_mesh_file_is_merged_with_the_control_plane() {
    // Node 2 also reads a local file holding one policy of its own; the control plane has none.
    let local = |policies: &[&str]| docs(policies);
    let deny_foo = ap(
        "local-deny-foo",
        "  action: DENY\n  rules: [{from: [{source: {namespaces: [foo]}}]}]\n",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("local.yaml");
    std::fs::write(&file, local(&[&deny_foo])).expect("local mesh file");
    let extra = format!("meshFile: {}\nwatchInterval: 100ms\n", file.display());
    let w = World::with_node2_extra(MeshSource::ControlPlane, &[], &extra).await;
    assert_mesh_denied(&w, FOO, 9000, "default/local-deny-foo").await;
    assert_mesh_allowed(&w, SLEEP, 9000).await;
    // The workloads are the control plane's: echo is known to node 2 only through xDS.
    let dump = config_dump(&w.bed, 2);
    assert!(all_workloads_from_xds(&dump), "{dump}");
    assert!(
        dump["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "default/local-deny-foo" && p["origin"]["source"] == "meshFile"),
        "{dump}"
    );

    // The local file changes: merged again without touching what the control plane sent.
    let tmp = dir.path().join("local.yaml.tmp");
    std::fs::write(&tmp, "").expect("local mesh file");
    std::fs::rename(&tmp, &file).expect("rename");
    support::eventually("the local policy gone", Duration::from_secs(5), || {
        let lines = w
            .node2
            .log_lines(&["mesh file merged with the control plane"]);
        if lines.is_empty() {
            Err(w.node2.log_text())
        } else {
            Ok(())
        }
    })
    .await;
    assert_mesh_allowed(&w, FOO, 9000).await;
    assert_eq!(workload_uids(&config_dump(&w.bed, 2)).len(), 4);
}
