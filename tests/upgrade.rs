//! Stopping and replacing ztund under traffic, with real daemons in standalone capture:
//! - an upgrade: a second ztund starts on a node while the first runs (every listener shared
//!   through `SO_REUSEPORT`), the first is sent SIGTERM, hands over and exits once its last
//!   connection ends; a loop of short connections and a long checksummed transfer through that
//!   node see no refusal, no reset and no lost byte. Done for the client's node, then for the
//!   server's (whose HBONE server sends the client's pool a GOAWAY);
//! - a drain without a successor: readiness answers 503 at once, new connections are refused,
//!   a transfer shorter than `drainDeadline` finishes, one that outlives it is cut at the
//!   deadline, and ztund exits 0 within deadline + 1 s;
//! - a crash (`kill -9`) under STRICT mTLS: the open connections are lost, nothing reaches the
//!   app while ztund is down (the pod's redirection stays and fails closed), and a restart
//!   serves again.
//!
//! The hand-over and the crash run against both capture backends (`<case>::nftables`,
//! `<case>::ebpf`: there the successor's listeners replace the old ones in the pod's sk_lookup
//! slots, and the pinned programs keep failing closed while no ztund runs).

mod support;
mod testbed;

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use support::Daemon;
use support::pods::{Backend, MESH_FILE, MeshPod, PodWorld, mesh_yaml, on_both_backends};
use testbed::{Place, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const ECHO_PORT: u16 = 9000;
const MIB: usize = 1 << 20;
/// The long transfer's size, each way.
const LONG_TRANSFER: usize = 64 * MIB;
/// Upper bound on the short connections of one hand-over.
const MAX_SHORT: usize = 1500;

/// A client pod on node 1, a server pod on node 2.
fn pods() -> Vec<MeshPod> {
    vec![
        MeshPod::captured(1, 1, "client"),
        MeshPod::captured(2, 1, "server"),
    ]
}

/// Both nodes in standalone capture with `extra` appended to their configs; no daemon started.
fn world(backend: Backend, extra: &str) -> PodWorld {
    PodWorld::on(backend, 2, 1, &pods(), |_| {
        format!("capture: standalone\n{extra}")
    })
}

fn signal(daemon: &Daemon, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(daemon.pid() as i32);
    nix::sys::signal::kill(pid, signal).expect("signalling ztund");
}

/// Waits (bounded by `within`) until the daemon exits; its status and how long it took.
async fn wait_exit(daemon: &mut Daemon, within: Duration) -> (ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = daemon.child.child().try_wait().expect("waiting on ztund") {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "ztund on node{} still runs {within:?} after it was told to stop:\n{}",
            daemon.node,
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One echo exchange on a fresh connection from the client pod; `Err` says what failed.
async fn short_exchange(bed: &Testbed, target: SocketAddr, n: usize) -> Result<(), String> {
    let mut stream = bed
        .connect_from(1, 1, target)
        .await
        .map_err(|e| format!("connection {n}: connect: {e}"))?;
    let message = format!("short connection {n}\n");
    stream
        .write_all(message.as_bytes())
        .await
        .map_err(|e| format!("connection {n}: write: {e}"))?;
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .map_err(|_| format!("connection {n}: no echo within 5 s"))?
        .map_err(|e| format!("connection {n}: read: {e}"))?;
    if back != message.as_bytes() {
        return Err(format!("connection {n}: echo differs"));
    }
    Ok(())
}

/// Short connections one after the other until `stop` turns true (at most [`MAX_SHORT`]);
/// how many ran and the failures.
async fn short_connections(
    bed: &Testbed,
    target: SocketAddr,
    stop: watch::Receiver<bool>,
) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut count = 0;
    while !*stop.borrow() && count < MAX_SHORT {
        if let Err(e) = short_exchange(bed, target, count).await {
            failures.push(e);
        }
        count += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    (count, failures)
}

/// The byte at `offset` of the long transfer's pattern.
fn pattern_byte(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// Sends `len` patterned bytes (whole MiB) through `stream` to an echo server: the first half
/// at once, the second only after `resume` turns true; checks every echoed byte. `Err` says
/// where it broke.
async fn transfer(
    stream: TcpStream,
    len: usize,
    mut resume: watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut reader, mut writer) = stream.into_split();
    let writing = async move {
        let chunk = MIB;
        for start in (0..len).step_by(chunk) {
            if start == len / 2 {
                let _ = resume.wait_for(|r| *r).await;
            }
            let bytes: Vec<u8> = (start..start + chunk).map(pattern_byte).collect();
            writer
                .write_all(&bytes)
                .await
                .map_err(|e| format!("writing at byte {start}: {e}"))?;
        }
        writer
            .shutdown()
            .await
            .map_err(|e| format!("closing the write side: {e}"))
    };
    let reading = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0;
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading at byte {offset}: {e}"))?;
            if n == 0 {
                break;
            }
            if let Some(bad) = (0..n).find(|&i| buf[i] != pattern_byte(offset + i)) {
                return Err(format!("echoed byte {} differs", offset + bad));
            }
            offset += n;
        }
        if offset == len {
            Ok(())
        } else {
            Err(format!("echo ended after {offset} of {len} bytes"))
        }
    };
    let (written, read) = tokio::join!(writing, reading);
    written.and(read)
}

/// Replaces node `node`'s ztund (`old`) by a second one while short connections and a long
/// transfer run from the client pod to the server pod's echo app, and checks nothing was lost.
/// Returns the successor.
async fn replace_under_traffic(
    w: &PodWorld,
    node: usize,
    mut old: Daemon,
    target: SocketAddr,
) -> Daemon {
    let bed = &w.bed;
    let (stop_tx, stop) = watch::channel(false);
    let (resume_tx, resume) = watch::channel(false);
    let long = bed
        .connect_from(1, 1, target)
        .await
        .expect("the long transfer's connection");
    let config = w.cluster.path(&format!("node{node}.yaml"));

    let handover = async {
        // The long transfer is on the old daemon before its successor exists.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let successor = w.cluster.spawn(bed, node, &config);
        // Readiness on the shared port may still be the old daemon's: ask the successor's log.
        successor.wait_log(&["ztund ready"]).await;
        successor.wait_log(&["pod proxy started"]).await;
        successor
            .wait_log(&[&format!("taking over from pid {}", old.pid())])
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(&old, nix::sys::signal::Signal::SIGTERM);
        old.wait_log(&[&format!("handing over to pid {}", successor.pid())])
            .await;
        resume_tx.send_replace(true);
        let exit = wait_exit(&mut old, Duration::from_secs(12)).await;
        // Traffic keeps flowing through the successor alone for a while.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop_tx.send_replace(true);
        (successor, exit)
    };
    let (shorts, transferred, (successor, (status, took))) = tokio::join!(
        short_connections(bed, target, stop),
        transfer(long, LONG_TRANSFER, resume),
        handover
    );
    let (count, failures) = shorts;
    eprintln!(
        "node{node} hand-over: {count} short connections, old ztund exited {took:?} after SIGTERM"
    );
    assert!(
        failures.is_empty(),
        "{} of {count} short connections failed during node{node}'s hand-over: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(count >= 50, "only {count} short connections ran");
    transferred.unwrap_or_else(|e| panic!("long transfer across node{node}'s hand-over: {e}"));
    assert!(status.success(), "the old ztund exited with {status}");
    assert_eq!(
        old.log_lines(&["drained: every connection finished"]).len(),
        1,
        "the old ztund did not drain cleanly:\n{}",
        old.log_text()
    );
    short_exchange(bed, target, MAX_SHORT)
        .await
        .expect("the successor serves alone");
    // The old ztund's exit left the pod captured (its rules, or the links the successor pinned).
    let tables = w.nft_tables(Place::Pod(node, 1));
    assert!(
        w.capture_installed(node, 1, &tables),
        "node{node}'s pod lost its capture in the hand-over:\n{tables}"
    );
    for place in [Place::Node(node), Place::Pod(node, 1)] {
        let migrate = bed.run_in(place, &["sysctl", "-n", "net.ipv4.tcp_migrate_req"]);
        assert_eq!(migrate.trim(), "1", "request migration is off in {place:?}");
    }
    successor
}

on_both_backends!(
    replacing_ztund_under_traffic_refuses_resets_and_loses_nothing,
    a_crash_loses_open_connections_and_fails_closed_until_the_restart,
);

async fn replacing_ztund_under_traffic_refuses_resets_and_loses_nothing(backend: Backend) {
    let mut w = world(backend, "drainDeadline: 10s\n");
    w.start(1).await;
    w.start(2).await;
    let target = w.bed.echo_server(2, 1, ECHO_PORT);
    short_exchange(&w.bed, target, 0)
        .await
        .expect("traffic before the upgrade");

    // The client's node: its outbound listeners in the client pod change hands.
    let old = w.take(1).expect("node1's ztund");
    let _node1 = replace_under_traffic(&w, 1, old, target).await;
    // The server's node: its HBONE server sends node1's pooled tunnels a GOAWAY.
    let old = w.take(2).expect("node2's ztund");
    let _node2 = replace_under_traffic(&w, 2, old, target).await;
}

/// Echo, and a count of the connections the app accepted (only the crash test uses it), one
/// count per backend: both variants run at the same time.
static CRASH_APP_ACCEPTED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

fn counted_echo<const B: usize>(
    mut stream: TcpStream,
    _peer: SocketAddr,
) -> BoxFuture<'static, ()> {
    CRASH_APP_ACCEPTED[B].fetch_add(1, Ordering::SeqCst);
    Box::pin(async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    })
}

const MESH_WIDE_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// Whether a connection echoes a probe (false on a refused connect, a reset, an EOF or silence).
async fn echoes(stream: std::io::Result<TcpStream>) -> bool {
    let Ok(mut stream) = stream else {
        return false;
    };
    if stream.write_all(b"probe\n").await.is_err() {
        return false;
    }
    let mut back = [0u8; 6];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut back)).await,
        Ok(Ok(_)) if &back == b"probe\n"
    )
}

async fn a_crash_loses_open_connections_and_fails_closed_until_the_restart(backend: Backend) {
    let mut w = world(backend, "");
    let b = backend as usize;
    let mesh = format!("{}---\n{MESH_WIDE_STRICT}", mesh_yaml(&w.bed, &pods()));
    w.cluster.write(MESH_FILE, &mesh);
    w.start(1).await;
    w.start(2).await;
    let bed = &w.bed;
    let target = bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(bed.pod_ip(2, 1), ECHO_PORT),
        if b == 0 {
            counted_echo::<0>
        } else {
            counted_echo::<1>
        },
    );
    let mut open = bed.connect_from(1, 1, target).await.expect("connect");
    open.write_all(b"probe\n").await.expect("write");
    let mut back = [0u8; 6];
    open.read_exact(&mut back).await.expect("echo over HBONE");
    assert!(
        !echoes(bed.app_sockets(Place::Node(1)).connect(target, None).await).await,
        "plaintext served under STRICT before the crash"
    );

    let crashed = w.kill(2).expect("node2's ztund");
    let bed = &w.bed;
    let accepted_at_crash = CRASH_APP_ACCEPTED[b].load(Ordering::SeqCst);
    // The open connection is lost: its tunnel ended with the process.
    let lost = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = open.write_all(b"after the crash\n").await;
        let mut buf = [0u8; 64];
        open.read(&mut buf).await
    })
    .await
    .expect("the open connection still hangs 5 s after the crash");
    assert!(
        matches!(lost, Ok(0) | Err(_)),
        "the open connection still carried data after the crash: {lost:?}"
    );
    // While ztund is down nothing reaches the app, through the mesh or around it.
    for _ in 0..5 {
        assert!(
            !echoes(bed.connect_from(1, 1, target).await).await,
            "served while down"
        );
        // Dropped (fails closed): the connect never completes.
        let plain = tokio::time::timeout(
            Duration::from_millis(500),
            bed.app_sockets(Place::Node(1)).connect(target, None),
        )
        .await;
        assert!(
            !matches!(plain, Ok(Ok(_))),
            "plaintext connect accepted while ztund is down"
        );
    }
    let tables = w.nft_tables(Place::Pod(2, 1));
    assert!(
        w.capture_installed(2, 1, &tables),
        "the crash took the pod's capture away"
    );
    assert_eq!(
        CRASH_APP_ACCEPTED[b].load(Ordering::SeqCst),
        accepted_at_crash,
        "a connection reached the app while its ztund was down"
    );

    let restarted = w.start(2).await;
    let pid = restarted.pid();
    assert!(
        echoes(w.bed.connect_from(1, 1, target).await).await,
        "no traffic after the restart"
    );
    assert!(
        !echoes(
            w.bed
                .app_sockets(Place::Node(1))
                .connect(target, None)
                .await
        )
        .await,
        "plaintext served under STRICT after the restart"
    );
    let instances: Vec<String> = std::fs::read_dir(w.cluster.path("state-node2/instances"))
        .expect("the instance registry")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        instances,
        vec![pid.to_string()],
        "the crashed instance's registration (pid {}) was not cleared",
        crashed.pid()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_finishes_short_transfers_and_cuts_the_rest_at_the_deadline() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let mut w = world(Backend::Nftables, "drainDeadline: 2s\n");
    w.start(1).await;
    w.start(2).await;
    let target = w.bed.echo_server(2, 1, ECHO_PORT);
    let mut daemon = w.take(1).expect("node1's ztund");
    let bed = &w.bed;
    // One connection that never ends by itself, one transfer that ends within the deadline.
    let mut idle = bed.connect_from(1, 1, target).await.expect("connect");
    idle.write_all(b"probe\n").await.expect("write");
    let mut back = [0u8; 6];
    idle.read_exact(&mut back).await.expect("echo");
    let (resume_tx, resume) = watch::channel(false);
    let short = bed.connect_from(1, 1, target).await.expect("connect");
    let short = tokio::spawn(transfer(short, 8 * MIB, resume));

    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let sent = Instant::now();
    daemon.wait_log(&["\"draining\""]).await;
    resume_tx.send_replace(true);
    assert_eq!(
        daemon.readiness_code(bed).await,
        Some(503),
        "readiness while draining"
    );
    assert!(
        bed.connect_from(1, 1, target).await.is_err(),
        "a new connection was accepted while draining"
    );

    let cut = tokio::time::timeout(DEADLINE + Duration::from_secs(2), async {
        let mut buf = [0u8; 64];
        idle.read(&mut buf).await
    })
    .await
    .expect("the idle connection outlived the deadline");
    let cut_after = sent.elapsed();
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    assert!(
        cut_after >= DEADLINE - Duration::from_millis(200),
        "cut {cut_after:?} after SIGTERM, before the {DEADLINE:?} deadline"
    );
    short
        .await
        .expect("transfer task")
        .expect("the transfer shorter than the deadline finished intact");
    let (status, _) = wait_exit(&mut daemon, DEADLINE + Duration::from_secs(2)).await;
    let exited_after = sent.elapsed();
    assert!(status.success(), "ztund exited with {status}");
    assert!(
        exited_after <= DEADLINE + Duration::from_secs(1),
        "ztund exited {exited_after:?} after SIGTERM (deadline {DEADLINE:?})"
    );
    let line = daemon
        .wait_log(&["drain deadline passed", "\"open\":1"])
        .await;
    eprintln!(
        "drain: idle connection cut after {cut_after:?}, exit after {exited_after:?}: {line}"
    );
}
