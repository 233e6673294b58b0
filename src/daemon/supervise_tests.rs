//! Issue 14 item 8: a background task that dies is never silent. Each test kills a task (a
//! panic, an early end, a real fault such as the watched directory vanishing, or its input
//! closing) and checks readiness, the log line, the failure metric and the restart or stop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::{Duration, Instant};

use super::*;
use crate::mesh::{MeshFileWatch, MeshSettings, MeshStore, Snapshot};

/// Log lines written while the returned guard lives (current-thread tests only: every task
/// runs on this thread, where the default subscriber is set).
fn capture_log() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let bytes = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(bytes.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (bytes, tracing::subscriber::set_default(subscriber))
}

fn log_text(bytes: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&bytes.lock().unwrap()).into_owned()
}

const QUICK: RestartBackoff = RestartBackoff {
    initial: Duration::from_millis(100),
    max: Duration::from_millis(400),
    healthy_after: Duration::from_millis(1000),
};

fn supervisor() -> (Supervisor, Readiness, watch::Sender<bool>) {
    let readiness = Readiness::new();
    let (stop, stopping) = watch::channel(false);
    (
        Supervisor::new(readiness.clone(), stopping),
        readiness,
        stop,
    )
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not true after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_task_turns_readiness_500_naming_it_is_counted_logged_and_restarted() {
    let (log, _guard) = capture_log();
    let (supervisor, readiness, _stop) = supervisor();
    let starts = Arc::new(AtomicUsize::new(0));
    let counted = starts.clone();
    supervisor.spawn("mesh watcher", OnFailure::Restart(QUICK), move || {
        let run = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if run == 0 {
                panic!("period must be non-zero");
            }
            std::future::pending::<()>().await;
            Ok::<(), std::convert::Infallible>(())
        }
    });
    wait_until("the failure is seen", Duration::from_secs(1), || {
        supervisor.failures("mesh watcher") == 1
    })
    .await;
    assert_eq!(readiness.pending(), vec!["task failed: mesh watcher"]);
    let line = log_text(&log);
    assert!(
        line.contains("ERROR")
            && line.contains("background task mesh watcher failed")
            && line.contains("panicked: period must be non-zero")
            && line.contains("restarting in 100ms"),
        "{line}"
    );
    tokio::time::sleep(QUICK.initial + Duration::from_millis(10)).await;
    assert_eq!(
        starts.load(Ordering::SeqCst),
        2,
        "restarted after the backoff"
    );
    assert!(
        !readiness.is_ready(),
        "not ready until the copy proved healthy"
    );
    tokio::time::sleep(QUICK.healthy_after).await;
    assert!(readiness.is_ready(), "{:?}", readiness.pending());
    assert_eq!(supervisor.failures("mesh watcher"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_task_that_keeps_ending_is_restarted_with_a_doubling_capped_backoff() {
    let (supervisor, readiness, stop) = supervisor();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let seen = starts.clone();
    supervisor.spawn("pod retries", OnFailure::Restart(QUICK), move || {
        seen.lock().unwrap().push(Instant::now());
        async { Ok::<(), std::convert::Infallible>(()) }
    });
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let gaps: Vec<u128> = starts
        .lock()
        .unwrap()
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(&gaps[..5], [100, 200, 400, 400, 400], "{gaps:?}");
    assert!(supervisor.failures("pod retries") >= 6);
    assert_eq!(readiness.pending(), vec!["task failed: pod retries"]);
    // Once the daemon stops, neither a failure nor a restart follows.
    stop.send_replace(true);
    let before = starts.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(starts.lock().unwrap().len(), before);
}

#[tokio::test(start_paused = true)]
async fn a_task_ending_after_the_daemon_stops_is_no_failure() {
    let (supervisor, readiness, stop) = supervisor();
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
    let mut end = Some(end_rx);
    supervisor.spawn("policy enforcer", OnFailure::Restart(QUICK), move || {
        let end = end.take();
        async move {
            if let Some(end) = end {
                let _ = end.await;
            }
            Ok::<(), std::convert::Infallible>(())
        }
    });
    stop.send_replace(true);
    end_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(supervisor.failures("policy enforcer"), 0);
    assert!(readiness.is_ready());
}

#[tokio::test]
async fn a_server_that_ends_stops_the_daemon_naming_it() {
    let (log, _guard) = capture_log();
    let (supervisor, readiness, _stop) = supervisor();
    supervisor.spawn_once("readiness server", async {
        Err::<(), _>(std::io::Error::other("listener closed"))
    });
    let fatal = tokio::time::timeout(Duration::from_secs(5), supervisor.fatal())
        .await
        .expect("the daemon hears of it");
    assert_eq!(fatal.task, "readiness server");
    assert_eq!(fatal.failure, TaskFailure::Failed("listener closed".into()));
    assert_eq!(supervisor.failures("readiness server"), 1);
    assert_eq!(readiness.pending(), vec!["task failed: readiness server"]);
    let text = log_text(&log);
    assert!(
        text.contains("background task readiness server failed")
            && text.contains("stopping the daemon"),
        "{text}"
    );
    // What `ztund run` prints before exiting non-zero.
    let error = crate::daemon::DaemonError::TaskFailed {
        task: fatal.task,
        failure: fatal.failure,
    };
    assert_eq!(
        error.to_string(),
        "background task readiness server failed: listener closed"
    );
}

/// The real mesh watcher, killed by a real fault: its file's directory removed. It fails,
/// readiness names it and each restart fails again until the directory is back; then the
/// restarted watcher applies the file written meanwhile.
#[tokio::test]
async fn the_mesh_watcher_fails_while_its_directory_is_gone_and_heals_when_it_returns() {
    const SLEEP: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: sleep}\nspec: {nodeName: node1}\nstatus: {podIP: 10.201.1.2}\n";
    const ECHO: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: echo}\nspec: {nodeName: node2}\nstatus: {podIP: 10.201.2.2}\n";
    let (log, _guard) = capture_log();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mesh");
    let path = dir.join("mesh.yaml");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&path, SLEEP).unwrap();
    let settings = MeshSettings::default();
    let (store, watch) = crate::mesh::load_for_watching(path.clone(), settings.clone()).unwrap();
    let (supervisor, readiness, _stop) = supervisor();
    let mut primed = Some(watch);
    let watched = store.clone();
    let quick = RestartBackoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        healthy_after: Duration::from_millis(300),
    };
    supervisor.spawn("mesh watcher", OnFailure::Restart(quick), move || {
        let watch = primed
            .take()
            .unwrap_or_else(|| MeshFileWatch::unstarted(path.clone(), settings.clone()));
        crate::mesh::watch_file(watch, watched.clone(), Duration::from_millis(20))
    });

    std::fs::remove_dir_all(&dir).unwrap();
    wait_until("the watcher fails", Duration::from_secs(5), || {
        supervisor.failures("mesh watcher") >= 2
    })
    .await;
    assert_eq!(readiness.pending(), vec!["task failed: mesh watcher"]);
    let text = log_text(&log);
    assert!(
        text.contains("background task mesh watcher failed")
            && text.contains("failed: the mesh file's directory")
            && text.contains("is gone"),
        "{text}"
    );
    assert_eq!(
        store.load().workloads()[0].name,
        "sleep",
        "last good mesh kept"
    );

    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), ECHO).unwrap();
    wait_until("the edit is applied", Duration::from_secs(5), || {
        store.load().workloads().first().map(|w| w.name.as_str()) == Some("echo")
    })
    .await;
    wait_until("ready again", Duration::from_secs(5), || {
        readiness.is_ready()
    })
    .await;
}

/// The real policy enforcer, killed by closing its input (the drain signal's sender gone while
/// the daemon is not stopping): it is restarted, and each copy rechecks at start.
#[tokio::test(start_paused = true)]
async fn the_policy_enforcer_ending_unexpectedly_is_restarted() {
    let (supervisor, readiness, _stop) = supervisor();
    let tracker = crate::proxy::tracker::ConnectionTracker::new();
    let mesh = Arc::new(MeshStore::new(Snapshot::default()));
    let metrics = crate::admin::Metrics::new();
    let (closed_input, drain) = watch::channel(false);
    drop(closed_input);
    supervisor.spawn("policy enforcer", OnFailure::Restart(QUICK), move || {
        never_fails(crate::proxy::tracker::watch_policies(
            tracker.clone(),
            mesh.clone(),
            metrics.clone(),
            drain.clone(),
        ))
    });
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        supervisor.failures("policy enforcer"),
        3,
        "ended at 0, 100 and 300 ms"
    );
    assert_eq!(readiness.pending(), vec!["task failed: policy enforcer"]);
}
