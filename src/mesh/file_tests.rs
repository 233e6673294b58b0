//! Tests of the mesh file as a source: loading, polling, and keeping the last good snapshot
//! through bad and half-written edits.

use std::net::IpAddr;

use super::*;
use crate::mesh::model::{Endpoints, TunnelProtocol};

const SLEEP: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: sleep, labels: {app: sleep}}\nspec: {nodeName: node1}\nstatus: {podIP: 10.201.1.2}\n";
const ECHO: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: echo, labels: {app: echo}}\nspec: {nodeName: node2}\nstatus: {podIP: 10.201.2.2}\n";
const BROKEN: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: echo}\nspec: {nodeName: node2}\nstatus: {podIP: not-an-ip}\n";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Saves the way editors do: write a sibling file, then rename it over the original.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls twice: a change is news only once it has held still from one poll to the next.
fn settled(watch: &mut MeshFileWatch) -> Option<Reload> {
    if let Some(early) = watch.poll() {
        panic!("reported before the content held still for a poll: {early:?}");
    }
    watch.poll()
}

#[test]
fn the_example_mesh_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh.yaml");
    let snapshot = load_snapshot(&path, &MeshSettings::default()).unwrap();
    let sleep = snapshot
        .workload_by_ip(ip("10.201.1.2"))
        .expect("sleep pod");
    assert_eq!(
        (sleep.name.as_str(), sleep.node.as_str()),
        ("sleep", "node1")
    );
    assert_eq!(
        sleep.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    let echo = snapshot.workload_by_ip(ip("10.201.2.2")).expect("echo pod");
    assert_eq!((echo.name.as_str(), echo.node.as_str()), ("echo", "node2"));
    assert_eq!(echo.tunnel, TunnelProtocol::Hbone);
    let service = snapshot
        .service_by_vip(ip("10.96.0.10"))
        .expect("echo service");
    assert_eq!(service.hostname, "echo.default.svc.cluster.local");
    assert_eq!(service.port(80).map(|p| p.target_port), Some(8080));
    let endpoints: Vec<&str> = snapshot
        .endpoints(service)
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(endpoints, ["echo"]);
    let external = snapshot
        .service_by_hostname("httpbin.org", "default")
        .expect("external service");
    assert!(external.external);
    assert_eq!(external.endpoints, Endpoints::None);
    assert_eq!(snapshot.local_workloads("node1").count(), 1);
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let err = load_snapshot(
        Path::new("/nonexistent/mesh.yaml"),
        &MeshSettings::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("reading mesh file /nonexistent/mesh.yaml: "),
        "{err}"
    );
}

#[test]
fn polling_reports_each_distinct_content_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, SLEEP).unwrap();
    let mut watch = MeshFileWatch::new(path.clone(), MeshSettings::default());
    assert!(watch.poll().is_none(), "the baseline is in force already");

    save(&path, &format!("{SLEEP}---\n{ECHO}"));
    let Some(Reload::Applied(snapshot)) = settled(&mut watch) else {
        panic!("valid edit must apply")
    };
    assert!(snapshot.workload_by_ip(ip("10.201.2.2")).is_some());
    assert!(watch.poll().is_none());

    save(&path, &format!("{SLEEP}---\n{BROKEN}"));
    let Some(Reload::Refused(err)) = settled(&mut watch) else {
        panic!("invalid edit must be refused")
    };
    let err = err.to_string();
    assert!(
        err.contains("mesh.yaml document 2 (Pod default/echo): field `status.podIP`"),
        "{err}"
    );
    // The same bad content, even rewritten, is not reported again.
    assert!(watch.poll().is_none());
    save(&path, &format!("{SLEEP}---\n{BROKEN}"));
    assert!(watch.poll().is_none());

    save(&path, &format!("{SLEEP}---\n{ECHO}"));
    assert!(matches!(settled(&mut watch), Some(Reload::Restored)));

    std::fs::remove_file(&path).unwrap();
    let Some(Reload::Refused(MeshError::Io { .. })) = watch.poll() else {
        panic!("missing file must be reported")
    };
    assert!(watch.poll().is_none(), "a missing file is reported once");

    save(&path, SLEEP);
    let Some(Reload::Applied(snapshot)) = settled(&mut watch) else {
        panic!("file came back with new content")
    };
    assert_eq!(snapshot.workloads().len(), 1);
}

/// An in-place write truncates the file before writing it: a poll in between finds an empty
/// file, which parses as a valid mesh without workloads. It must not replace the mesh.
#[test]
fn a_file_caught_in_the_middle_of_a_write_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    let both = format!("{SLEEP}---\n{ECHO}");
    std::fs::write(&path, &both).unwrap();
    let mut watch = MeshFileWatch::new(path.clone(), MeshSettings::default());

    // Truncated, not yet written: what `std::fs::write` leaves between its open and write.
    std::fs::File::create(&path).unwrap();
    assert!(
        watch.poll().is_none(),
        "a file that just changed may be half written"
    );
    std::fs::write(&path, both.replace("name: echo", "name: echo-v2")).unwrap();
    let Some(Reload::Applied(snapshot)) = settled(&mut watch) else {
        panic!("the finished write must apply")
    };
    let names: Vec<&str> = snapshot
        .workloads()
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"echo-v2"), "{names:?}");

    // Truncated and written back to the content in force: nothing to do, nothing applied.
    std::fs::File::create(&path).unwrap();
    assert!(watch.poll().is_none());
    std::fs::write(&path, both.replace("name: echo", "name: echo-v2")).unwrap();
    assert!(watch.poll().is_none());
    assert!(watch.poll().is_none());
}

/// Content first seen when its times are already old still applies at the next poll: the
/// unchanged-stamp shortcut is only for content already dealt with.
#[test]
fn an_old_file_seen_once_is_applied_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, SLEEP).unwrap();
    let mut watch = MeshFileWatch::new(path.clone(), MeshSettings::default());

    save(&path, ECHO);
    let old = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let Some(Reload::Applied(snapshot)) = settled(&mut watch) else {
        panic!("an edit seen once must apply at the next poll")
    };
    assert_eq!(snapshot.workloads()[0].name, "echo");
    assert!(watch.poll().is_none());
}

#[tokio::test]
async fn the_watcher_applies_valid_edits_and_keeps_serving_through_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, SLEEP).unwrap();
    let settings = MeshSettings::default();
    let store = Arc::new(MeshStore::new(load_snapshot(&path, &settings).unwrap()));
    let mut changes = store.subscribe();
    let watcher = spawn_watcher(
        path.clone(),
        settings,
        store.clone(),
        Duration::from_millis(20),
    );
    let wait_for_change = async |changes: &mut tokio::sync::watch::Receiver<u64>| {
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the watcher applies a valid edit within 5s")
            .unwrap();
    };

    save(&path, &format!("{SLEEP}---\n{ECHO}"));
    wait_for_change(&mut changes).await;
    let snapshot = store.load();
    assert_eq!(snapshot.generation, 1);
    assert_eq!(
        snapshot
            .workload_by_ip(ip("10.201.2.2"))
            .map(|w| w.name.as_str()),
        Some("echo")
    );

    save(&path, BROKEN);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snapshot = store.load();
    assert_eq!(
        snapshot.generation, 1,
        "an invalid edit must not replace the snapshot"
    );
    assert!(snapshot.workload_by_ip(ip("10.201.2.2")).is_some());
    assert!(!changes.has_changed().unwrap());

    save(&path, ECHO);
    wait_for_change(&mut changes).await;
    let snapshot = store.load();
    assert_eq!(snapshot.generation, 2);
    assert!(
        snapshot.workload_by_ip(ip("10.201.1.2")).is_none(),
        "sleep was removed"
    );
    assert!(snapshot.workload_by_ip(ip("10.201.2.2")).is_some());
    watcher.abort();
}

#[tokio::test]
async fn load_and_watch_starts_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, BROKEN).unwrap();
    let err = load_and_watch(
        path.clone(),
        MeshSettings::default(),
        Duration::from_millis(20),
    )
    .unwrap_err();
    assert!(err.to_string().contains("field `status.podIP`"), "{err}");

    std::fs::write(&path, SLEEP).unwrap();
    let (store, watcher) = load_and_watch(
        path.clone(),
        MeshSettings::default(),
        Duration::from_millis(20),
    )
    .unwrap();
    assert_eq!(store.load().workloads().len(), 1);
    assert_eq!(store.load().generation, 0);
    let mut changes = store.subscribe();
    save(&path, ECHO);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.load().workloads()[0].name, "echo");
    watcher.abort();
}
