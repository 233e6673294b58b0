//! ztund under systemd: the real binary started with a `NOTIFY_SOCKET` and `WATCHDOG_USEC`, as
//! systemd starts a `Type=notify` unit, and the shipped units checked by `systemd-analyze
//! verify`.

mod support;
mod testbed;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Cluster, Daemon, readiness_code, ztund_bin};
use testbed::{Place, Testbed};
use tokio::net::UnixDatagram;

/// One datagram from ztund, or `None` after `wait`.
async fn next_message(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .expect("reading the notify socket");
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_with_readiness_pets_the_watchdog_and_says_stopping_on_sigterm() {
    let bed = Testbed::new(1, 1);
    let cluster = Cluster::new();
    // One workload on this node: READY=1 must wait for its certificate.
    cluster.write(
        "mesh.yaml",
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {ztund.io/node: node1}}
spec: {address: \"10.200.0.1\", serviceAccount: vm}
",
    );
    let config = cluster.node_config("node1", "mesh.yaml", "");
    let notify_path = cluster.path("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).expect("binding the notify socket");
    let log = cluster.path("node1-systemd.log");
    let mut command = Command::new(ztund_bin());
    command
        .args(["--log-json", "run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        // 400 ms: a pet every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env("ZTUND_LOG", "info,ztund=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let started = Instant::now();
    let mut daemon = Daemon {
        child: bed.spawn_in(Place::Node(1), command),
        log,
        node: 1,
    };

    // Readiness polled all along: the first 200 is when systemd should hear READY=1.
    let poller = {
        let sockets = bed.app_sockets(Place::Node(1));
        tokio::spawn(async move {
            loop {
                if readiness_code(&sockets).await == Some(200) {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut messages = Vec::new();
    let ready_at = loop {
        let message = next_message(&socket, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no READY=1 within 20 s; got {messages:?}\n{}",
                    daemon.log_text()
                )
            });
        if message.lines().any(|l| l == "READY=1") {
            // At this moment readiness must already answer 200.
            let code = daemon.readiness_code(&bed).await;
            assert_eq!(
                code,
                Some(200),
                "READY=1 arrived while /healthz/ready answered {code:?}"
            );
            messages.push(message);
            break Instant::now();
        }
        messages.push(message);
    };
    let first_200 = tokio::time::timeout(Duration::from_secs(5), poller)
        .await
        .expect("readiness poller")
        .expect("poller task");
    // And not long after it: the poller looks every 10 ms.
    let late = ready_at.saturating_duration_since(first_200);
    assert!(
        late < Duration::from_millis(500),
        "READY=1 came {late:?} after readiness first answered 200"
    );
    assert!(
        messages[0].starts_with("STATUS=starting"),
        "first message {messages:?}"
    );
    let ready = messages.last().expect("READY message");
    assert!(ready.contains("STATUS=ready: node node1"), "{ready}");
    eprintln!("READY=1 after {:?}", ready_at - started);

    // The watchdog: about five pets a second; at least three in 1.2 s.
    let mut pets = 0;
    let window = Instant::now() + Duration::from_millis(1200);
    while let Some(message) =
        next_message(&socket, window.saturating_duration_since(Instant::now())).await
    {
        if message == "WATCHDOG=1" {
            pets += 1;
        }
    }
    assert!(
        pets >= 3,
        "{pets} WATCHDOG=1 in 1.2 s with WATCHDOG_USEC=400000"
    );

    // SIGTERM: STOPPING=1 first, then a clean exit within the drain deadline plus a margin.
    let pid = daemon.pid() as libc::pid_t;
    // SAFETY: signals the child this test started, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping_since = Instant::now();
    let stopping = loop {
        let message = next_message(&socket, Duration::from_secs(5))
            .await
            .expect("STOPPING=1 after SIGTERM");
        if message != "WATCHDOG=1" {
            break message;
        }
    };
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    let deadline = Duration::from_secs(5) + Duration::from_secs(2);
    let status = loop {
        if let Some(status) = daemon.child.child().try_wait().expect("waiting for ztund") {
            break status;
        }
        assert!(
            stopping_since.elapsed() < deadline,
            "ztund still running {deadline:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "ztund exited with {status}");
    eprintln!("exited {:?} after SIGTERM", stopping_since.elapsed());
}

/// Each shipped unit passes `systemd-analyze verify` with nothing to say about it (unknown keys
/// and bad values are only warnings there, so any line naming the unit fails the test). The
/// unit's `ExecStart` names the installed path; the copy checked names the binary under test.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut checked = 0;
    for entry in std::fs::read_dir(&units).expect("deploy/systemd") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("reading the unit");
        assert!(
            text.contains("ExecStart=/usr/local/bin/ztund "),
            "{name}: ExecStart must run /usr/local/bin/ztund"
        );
        let copy = dir.path().join(&name);
        std::fs::write(
            &copy,
            text.replace(
                "ExecStart=/usr/local/bin/ztund ",
                &format!("ExecStart={} ", ztund_bin()),
            ),
        )
        .expect("writing the copy");
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (package systemd; .ci/run installs it)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains(&name)).collect();
        assert!(
            output.status.success() && about_unit.is_empty(),
            "systemd-analyze verify {name}: {}\n{stderr}",
            output.status
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "ztund.service and ztund-controlplane.service");
}

/// A unit with a mistake is caught, so the check above can fail.
#[test]
fn systemd_analyze_verify_reports_a_misspelt_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("broken.service");
    std::fs::write(
        &copy,
        format!(
            "[Service]\nExecStart={} run\nProtectClok=yes\n",
            ztund_bin()
        ),
    )
    .expect("writing the unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("broken.service") && stderr.contains("ProtectClok"),
        "{stderr}"
    );
}
