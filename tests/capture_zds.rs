//! ZDS conformance against the CNI side (`CniServer`), with ztund's real client and pod
//! lifecycle and a recording `PodProxies` that binds a real listener in each pod's namespace:
//! hello, snapshot with Add(fd) and Keep, SnapshotSent dropping pods not named, Add/Del after it,
//! a known uid in a new namespace replacing its proxy, and malformed requests refused without
//! harming the daemon. Also the standalone source: pods from the mesh file get proxies and nft
//! rules, gone pods lose both.

mod testbed;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message;
use testbed::{Place, Testbed};
use tokio::net::TcpListener;
use ztund::capture::cni::{CniConnection, CniServer, SnapshotPod};
use ztund::capture::nft::{self, RedirectPorts};
use ztund::capture::zds::proto;
use ztund::capture::{PodError, PodInfo, PodManager, PodProxies, ZdsClient, ZdsError};
use ztund::net::{Netns, SocketFactory};

/// Records starts and stops; a started pod holds a real listener on 15008 in its namespace.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
    listeners: Mutex<HashMap<String, TcpListener>>,
    refuse: Mutex<HashSet<String>>,
}

impl Recorder {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn running(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.listeners.lock().unwrap().keys().cloned().collect();
        uids.sort();
        uids
    }
}

impl PodProxies for Recorder {
    fn start(&self, pod: PodInfo, netns: Arc<Netns>) -> BoxFuture<'_, Result<(), PodError>> {
        Box::pin(async move {
            if self.refuse.lock().unwrap().contains(&pod.uid) {
                return Err(PodError::Bind {
                    port: 15008,
                    source: std::io::Error::other(format!("cannot bind for {}", pod.uid)),
                });
            }
            let listener = SocketFactory::in_netns(netns.clone())
                .listener(SocketAddr::from(([0, 0, 0, 0], 15008)), true)
                .map_err(|source| PodError::Bind {
                    port: 15008,
                    source,
                })?;
            self.log
                .lock()
                .unwrap()
                .push(format!("start {} {}", pod.uid, netns.id().ino));
            self.listeners.lock().unwrap().insert(pod.uid, listener);
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.log.lock().unwrap().push(format!("stop {uid}"));
            self.listeners.lock().unwrap().remove(uid);
        })
    }
}

fn pod(uid: &str) -> PodInfo {
    PodInfo {
        uid: uid.into(),
        name: format!("{uid}-name"),
        namespace: "default".into(),
        service_account: "sleep".into(),
    }
}

struct Daemon {
    recorder: Arc<Recorder>,
    manager: Arc<PodManager>,
    client: tokio::task::JoinHandle<()>,
    server: CniServer,
    _dir: tempfile::TempDir,
}

fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let server = CniServer::bind(&path).unwrap();
    let recorder = Arc::new(Recorder::default());
    let manager = Arc::new(PodManager::new(recorder.clone()));
    let client = ZdsClient::new(&path, manager.clone());
    let client = tokio::spawn(async move { client.run().await });
    Daemon {
        recorder,
        manager,
        client,
        server,
        _dir: dir,
    }
}

impl Daemon {
    async fn accept(&self) -> CniConnection {
        tokio::time::timeout(Duration::from_secs(5), self.server.accept())
            .await
            .expect("ztund connects (again)")
            .expect("hello")
    }
}

fn ino(bed: &Testbed, place: Place) -> u64 {
    bed.netns(place).id().ino
}

// HARDENING Z6 (a second Add for a uid: same netns a no-op, a new netns replaces the proxy)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_keep_and_later_adds_and_dels_drive_the_proxies() {
    let bed = Testbed::new(1, 3);
    let d = daemon();
    let (p1, p2, p3) = (
        bed.netns(Place::Pod(1, 1)),
        bed.netns(Place::Pod(1, 2)),
        bed.netns(Place::Pod(1, 3)),
    );
    let (a, c, x) = (pod("a"), pod("c"), pod("x"));

    let first = d.accept().await;
    assert!(
        !d.manager.is_ready(true).await,
        "not ready before the snapshot"
    );
    first
        .send_snapshot(&[
            SnapshotPod::Add(&a, &p1),
            SnapshotPod::Add(&c, &p2),
            SnapshotPod::Add(&x, &p3),
        ])
        .await
        .unwrap();
    assert_eq!(d.recorder.running(), ["a", "c", "x"]);
    assert!(d.manager.is_ready(true).await);
    // The listener really lives in pod a's namespace.
    bed.app_sockets(Place::Pod(1, 2))
        .connect(SocketAddr::new(bed.pod_ip(1, 1), 15008), None)
        .await
        .expect("pod a's 15008 listener answers on pod a's address");

    // The CNI restarts: a new snapshot names a (same netns) and keeps c; x is gone.
    drop(first);
    let second = d.accept().await;
    second
        .send_snapshot(&[SnapshotPod::Add(&a, &p1), SnapshotPod::Keep("c")])
        .await
        .unwrap();
    assert_eq!(d.recorder.running(), ["a", "c"]);
    let starts_of_a = d
        .recorder
        .log()
        .iter()
        .filter(|l| l.starts_with("start a "))
        .count();
    assert_eq!(
        starts_of_a, 1,
        "a repeated Add with the same netns is idempotent"
    );

    second.del("c").await.unwrap();
    second
        .del("never-seen")
        .await
        .expect("Del of an unknown pod is fine");
    second.add(&x, &p3).await.unwrap();
    assert_eq!(d.recorder.running(), ["a", "x"]);

    // Pod a reappears in another namespace: old proxy stopped, new one started there.
    second.add(&a, &p2).await.unwrap();
    let log = d.recorder.log();
    let tail: Vec<&str> = log.iter().rev().take(2).rev().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "stop a".to_string(),
            format!("start a {}", ino(&bed, Place::Pod(1, 2)))
        ]
    );
    let status = d.manager.pods().await;
    let a_status = status.iter().find(|s| s.info.uid == "a").unwrap();
    assert_eq!(a_status.netns, p2.id());
    assert_eq!(a_status.info.service_account, "sleep");
    assert!(!d.client.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_daemon_carries_on() {
    let bed = Testbed::new(1, 1);
    let d = daemon();
    let ns = bed.netns(Place::Pod(1, 1));
    let conn = d.accept().await;
    let add = |uid: &str, info: bool| {
        proto::WorkloadRequest {
            payload: Some(proto::workload_request::Payload::Add(proto::AddWorkload {
                uid: uid.into(),
                workload_info: info.then(proto::WorkloadInfo::default),
            })),
        }
        .encode_to_vec()
    };
    let del = proto::WorkloadRequest {
        payload: Some(proto::workload_request::Payload::Del(proto::DelWorkload {
            uid: "a".into(),
        })),
    }
    .encode_to_vec();

    let refusals = [
        (
            conn.send_raw(&add("a", true), &[]).await,
            "exactly one netns fd",
        ),
        (
            conn.send_raw(&add("a", true), &[ns.as_fd(), ns.as_fd()])
                .await,
            "2 file descriptors",
        ),
        (
            conn.send_raw(&add("a", false), &[ns.as_fd()]).await,
            "no workload_info",
        ),
        (
            conn.send_raw(&del, &[ns.as_fd()]).await,
            "only Add may carry",
        ),
        (
            conn.send_raw(&vec![0x0a; 2000], &[]).await,
            "did not fit in 1024 bytes",
        ),
        (conn.send_raw(&[0xff, 0xff, 0xff], &[]).await, "undecodable"),
    ];
    for (ack, text) in refusals {
        let error = ack.expect("an Ack comes back").expect_err("refused");
        assert!(error.0.contains(text), "{error:?} should mention {text:?}");
    }
    assert!(
        d.recorder.log().is_empty(),
        "no refused request started anything"
    );

    // The session is still good: a proper snapshot works.
    conn.send_snapshot(&[SnapshotPod::Add(&pod("a"), &ns)])
        .await
        .unwrap();
    assert_eq!(d.recorder.running(), ["a"]);

    // Keep after the snapshot: refused, and ztund reconnects for a fresh snapshot.
    let err = conn.keep("a").await.unwrap_err();
    assert!(
        matches!(&err, ZdsError::Refused { error, .. } if error.contains("after the snapshot")),
        "{err}"
    );
    conn.closed()
        .await
        .expect("ztund hangs up after a snapshot-order violation");
    let again = d.accept().await;
    again.snapshot_sent().await.unwrap();
    let err = again.snapshot_sent().await.unwrap_err();
    assert!(err.to_string().contains("second SnapshotSent"), "{err}");
    again.closed().await.unwrap();
    assert!(
        d.recorder.running().is_empty(),
        "the empty snapshot dropped pod a"
    );

    let third = d.accept().await;
    assert!(!d.client.is_finished(), "the ZDS client is alive");
    drop(third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_fails_to_start_is_reported_and_retried() {
    let bed = Testbed::new(1, 1);
    let d = daemon();
    let ns = bed.netns(Place::Pod(1, 1));
    d.recorder.refuse.lock().unwrap().insert("a".into());
    let conn = d.accept().await;
    let err = conn.add(&pod("a"), &ns).await.unwrap_err();
    assert!(err.to_string().contains("cannot bind for a"), "{err}");
    conn.snapshot_sent().await.unwrap();
    assert!(
        !d.manager.is_ready(true).await,
        "a pending pod keeps the daemon unready"
    );

    assert_eq!(d.manager.retry_pending().await.len(), 1);
    d.recorder.refuse.lock().unwrap().clear();
    assert!(d.manager.retry_pending().await.is_empty());
    assert_eq!(d.recorder.running(), ["a"]);
    assert!(d.manager.is_ready(true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_pods_get_proxies_and_redirection_and_lose_both_when_gone() {
    let bed = Testbed::new(1, 2);
    let recorder = Arc::new(Recorder::default());
    let manager = PodManager::new(recorder.clone()).with_redirection(RedirectPorts::default());
    let (ns1, ns2) = (bed.netns(Place::Pod(1, 1)), bed.netns(Place::Pod(1, 2)));
    let name1 = bed.netns_name(Place::Pod(1, 1));
    let path2 = format!("/var/run/netns/{}", bed.netns_name(Place::Pod(1, 2)));

    let report = manager
        .reconcile_standalone(vec![
            (pod("a"), name1.clone()),
            (pod("b"), path2.clone()),
            (pod("lost"), "/var/run/netns/ztund-no-such-netns".into()),
        ])
        .await;
    assert_eq!(report.started, ["a", "b"]);
    assert_eq!(report.failed.len(), 1);
    assert!(
        report.failed[0]
            .1
            .to_string()
            .contains("ztund-no-such-netns"),
        "{:?}",
        report.failed
    );
    assert!(nft::redirection_installed(&ns1).unwrap());
    assert!(nft::redirection_installed(&ns2).unwrap());

    // Unchanged pods are left alone; b is gone.
    let report = manager.reconcile_standalone(vec![(pod("a"), name1)]).await;
    assert!(report.started.is_empty(), "{report:?}");
    assert_eq!(report.stopped, ["b"]);
    assert_eq!(recorder.running(), ["a"]);
    assert!(nft::redirection_installed(&ns1).unwrap());
    assert!(!nft::redirection_installed(&ns2).unwrap());

    let report = manager.reconcile_standalone(vec![]).await;
    assert_eq!(report.stopped, ["a"]);
    assert!(!nft::redirection_installed(&ns1).unwrap());
    assert!(recorder.running().is_empty());
}

/// How many of this process's fds name `target` (`net:[inode]`, or a path).
fn fds_naming(target: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| link == target)
        .count()
}

// HARDENING Z1 Z2 Z3 Z4
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_packets_on_the_real_socket_close_every_fd_they_carried() {
    use std::os::fd::AsRawFd;
    let bed = Testbed::new(1, 1);
    let d = daemon();
    let ns = bed.netns(Place::Pod(1, 1));
    let ns_link = std::fs::read_link(format!("/proc/self/fd/{}", ns.as_fd().as_raw_fd())).unwrap();
    let baseline = fds_naming(&ns_link);
    let conn = d.accept().await;
    let add = proto::WorkloadRequest {
        payload: Some(proto::workload_request::Payload::Add(proto::AddWorkload {
            uid: "a".into(),
            workload_info: Some(proto::WorkloadInfo::default()),
        })),
    }
    .encode_to_vec();
    let del = proto::WorkloadRequest {
        payload: Some(proto::workload_request::Payload::Del(proto::DelWorkload {
            uid: "a".into(),
        })),
    }
    .encode_to_vec();
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let mount_ns = std::fs::File::open("/proc/self/ns/mnt").unwrap();
    let own_ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let socket = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let six = [ns.as_fd(); 6];

    let refusals = [
        (
            conn.send_raw(&add, &six).await,
            "carries 6 file descriptors",
        ),
        (
            conn.send_raw(&add, &[file.as_fd()]).await,
            "not a network namespace",
        ),
        (
            conn.send_raw(&add, &[socket.as_fd()]).await,
            "not a network namespace",
        ),
        (
            conn.send_raw(&add, &[mount_ns.as_fd()]).await,
            "not a network namespace",
        ),
        (
            conn.send_raw(&add, &[own_ns.as_fd()]).await,
            "ztund's own network namespace",
        ),
        (
            conn.send_raw(&add, &[ns.as_fd(), ns.as_fd()]).await,
            "2 file descriptors",
        ),
        (
            conn.send_raw(&del, &[ns.as_fd()]).await,
            "only Add may carry",
        ),
        (
            conn.send_raw(&[0xff, 0xff, 0xff], &[ns.as_fd()]).await,
            "undecodable",
        ),
    ];
    for (ack, text) in refusals {
        let error = ack.expect("an Ack comes back").expect_err("refused");
        assert!(error.0.contains(text), "{error:?} should mention {text:?}");
    }
    // Many more refused fds than a process could hold open if any leaked per message.
    for _ in 0..300 {
        let ack = conn.send_raw(&add, &six).await.expect("an Ack");
        assert!(ack.is_err());
    }
    assert_eq!(
        fds_naming(&ns_link),
        baseline,
        "every fd received with a refused message is closed"
    );
    assert!(d.recorder.log().is_empty(), "nothing started");
    assert!(!d.client.is_finished());
}

// HARDENING Z8
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zds_peer_that_is_neither_root_nor_ztund_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let path = theirs.join("ztunnel.sock");

    // Another user listens on the path: a thread whose own effective uid is nobody (the raw
    // syscall changes this thread only), so the kernel records that uid for the socket.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let listening = path.clone();
    let impostor = std::thread::spawn(move || {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        // SAFETY: setresuid on this thread only; it does nothing else as root afterwards.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_setresuid,
                -1 as libc::c_long,
                NOBODY as libc::c_long,
                -1 as libc::c_long,
            )
        };
        assert_eq!(rc, 0, "setresuid");
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &UnixAddr::new(&listening).unwrap(),
        )
        .unwrap();
        socket::listen(&fd, Backlog::new(4).unwrap()).unwrap();
        ready_tx.send(()).unwrap();
        let _ = stopped.recv_timeout(Duration::from_secs(10));
    });
    ready.recv_timeout(Duration::from_secs(5)).unwrap();
    let recorder = Arc::new(Recorder::default());
    let manager = Arc::new(PodManager::new(recorder.clone()));
    let client = ZdsClient::new(&path, manager.clone());
    let err = client.session().await.unwrap_err();
    assert!(
        matches!(err, ZdsError::UntrustedPeer { uid: NOBODY }),
        "{err}"
    );
    assert!(err.to_string().contains("uid 65534"), "{err}");
    stop.send(()).unwrap();
    impostor.join().unwrap();

    // Root's own server, but in a directory anyone may write: refused before any request.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let _server = CniServer::bind(&open.join("ztunnel.sock")).unwrap();
    let client = ZdsClient::new(open.join("ztunnel.sock"), manager);
    let err = client.session().await.unwrap_err();
    assert!(matches!(err, ZdsError::UnsafeDirectory { .. }), "{err}");
    assert!(err.to_string().contains("writable by anyone"), "{err}");
    assert!(recorder.log().is_empty());
}

/// How many of this process's file descriptors refer to the network namespace `ns`: only this
/// test's testbed owns that namespace, so tests running beside it do not move the count.
fn fds_on(ns: &Netns) -> usize {
    let wanted = format!("net:[{}]", ns.id().ino);
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == wanted)
        .count()
}

// HARDENING Z7 (the node agent closes mid-session and reconnects; 10 000 Add/Del cycles)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_keeps_proxies_and_add_del_cycles_leave_no_fd_behind() {
    const CYCLES: usize = 10_000;
    let bed = Testbed::new(1, 2);
    let d = daemon();
    let (p1, p2) = (bed.netns(Place::Pod(1, 1)), bed.netns(Place::Pod(1, 2)));
    let (a, b) = (pod("a"), pod("b"));

    let first = d.accept().await;
    first
        .send_snapshot(&[SnapshotPod::Add(&a, &p1)])
        .await
        .unwrap();
    let baseline = fds_on(&p2);
    for _ in 0..CYCLES {
        first.add(&b, &p2).await.unwrap();
        first.del("b").await.unwrap();
    }
    assert_eq!(
        fds_on(&p2),
        baseline,
        "every netns fd of {CYCLES} Add/Del cycles is closed"
    );
    let starts_of_b = d
        .recorder
        .log()
        .iter()
        .filter(|l| l.starts_with("start b "))
        .count();
    assert_eq!(starts_of_b, CYCLES, "each Add started a proxy");
    assert_eq!(d.recorder.running(), ["a"]);

    // The agent goes away in the middle of a session: pod a keeps its proxy, and its listener
    // still answers, while ztund waits for the agent to come back.
    first.add(&b, &p2).await.unwrap();
    drop(first);
    let second = d.accept().await;
    assert_eq!(
        d.recorder.running(),
        ["a", "b"],
        "proxies outlive the session"
    );
    bed.app_sockets(Place::Pod(1, 2))
        .connect(SocketAddr::new(bed.pod_ip(1, 1), 15008), None)
        .await
        .expect("pod a's listener answers while the agent is away");
    assert!(
        !d.manager.is_ready(true).await,
        "not ready until the new session's snapshot"
    );

    // The new session's snapshot names only a: b is drained and its namespace fd closed.
    second
        .send_snapshot(&[SnapshotPod::Keep("a")])
        .await
        .unwrap();
    assert_eq!(d.recorder.running(), ["a"]);
    assert_eq!(
        fds_on(&p2),
        baseline,
        "b's netns fd is closed after the drain"
    );
    assert!(d.manager.is_ready(true).await);
    assert!(!d.client.is_finished());
}
