//! HARDENING.md §8 `zds_state`: a fuzzed ZDS session as istio-cni could drive it (hellos,
//! snapshots, Add/Keep/Del of a few pods in a few namespaces, disconnects, proxies that fail to
//! start, retries), each message checked by ztund's [`zds::validate`] the way the ZDS client
//! checks it, then handled by ztund's [`PodManager`]. The proxies running are always exactly
//! the pods the manager tracks as running, a proxy is never started twice or stopped when not
//! running, and once a snapshot is complete every running proxy belongs to a pod it named.
#![no_main]

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use futures::executor::block_on;
use futures::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztund::capture::pods::{PodError, PodInfo, PodManager, PodProxies};
use ztund::capture::zds::{self, PodEvents, proto};
use ztund::fuzzing::Packet;
use ztund::net::Netns;

#[derive(Debug, Arbitrary)]
enum Step {
    Connect,
    Disconnect,
    Add {
        pod: u8,
        namespace: u8,
    },
    Keep(u8),
    Del(u8),
    SnapshotSent,
    /// Which pods' proxies fail to start from now on (bits).
    Failing(u8),
    Retry,
}

const PODS: usize = 5;

/// Files standing in for network namespaces: the manager only compares their inodes.
const NAMESPACES: [&str; 3] = [
    "/proc/self/ns/net",
    "/proc/self/status",
    "/proc/self/cmdline",
];

#[derive(Default)]
struct Proxies {
    running: Mutex<BTreeSet<String>>,
    failing: Mutex<u8>,
}

impl PodProxies for Proxies {
    fn start(&self, pod: PodInfo, _netns: Arc<Netns>) -> BoxFuture<'_, Result<(), PodError>> {
        Box::pin(async move {
            let index: usize = pod.uid.trim_start_matches("pod-").parse().unwrap();
            if *self.failing.lock().unwrap() & (1 << index) != 0 {
                return Err(PodError::Bind {
                    port: 15008,
                    source: std::io::ErrorKind::AddrInUse.into(),
                });
            }
            let fresh = self.running.lock().unwrap().insert(pod.uid.clone());
            assert!(fresh, "the proxy of {} started twice", pod.uid);
            Ok(())
        })
    }

    fn stop<'a>(&'a self, uid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let was = self.running.lock().unwrap().remove(uid);
            assert!(was, "the proxy of {uid} stopped while not running");
        })
    }
}

fn request(payload: proto::workload_request::Payload) -> Vec<u8> {
    proto::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn uid(pod: u8) -> String {
    format!("pod-{}", usize::from(pod) % PODS)
}

fuzz_target!(|steps: Vec<Step>| {
    use proto::workload_request::Payload;
    let proxies = Arc::new(Proxies::default());
    let manager = PodManager::new(proxies.clone());
    let mut connected = false;
    let mut snapshot_done = false;
    // Pods named by Add or Keep in this session before its SnapshotSent.
    let mut named = BTreeSet::new();
    block_on(async {
        for step in steps.into_iter().take(40) {
            let packet = |bytes, fds| Packet {
                bytes,
                fds,
                truncated: false,
            };
            let message = match step {
                Step::Connect | Step::Disconnect => {
                    if connected {
                        manager.session_ended().await;
                    }
                    connected = matches!(step, Step::Connect);
                    if connected {
                        manager.session_started().await;
                        snapshot_done = false;
                        named.clear();
                    }
                    None
                }
                Step::Failing(bits) => {
                    *proxies.failing.lock().unwrap() = bits;
                    None
                }
                Step::Retry => {
                    manager.retry_pending().await;
                    None
                }
                Step::Add { pod, namespace } => {
                    let path = NAMESPACES[usize::from(namespace) % NAMESPACES.len()];
                    let fd = OwnedFd::from(File::open(path).unwrap());
                    let add = Payload::Add(proto::AddWorkload {
                        uid: uid(pod),
                        workload_info: Some(proto::WorkloadInfo {
                            name: uid(pod),
                            namespace: "default".into(),
                            service_account: "sleep".into(),
                        }),
                    });
                    Some(packet(request(add), vec![fd]))
                }
                Step::Keep(pod) => Some(packet(
                    request(Payload::Keep(proto::KeepWorkload { uid: uid(pod) })),
                    vec![],
                )),
                Step::Del(pod) => Some(packet(
                    request(Payload::Del(proto::DelWorkload { uid: uid(pod) })),
                    vec![],
                )),
                Step::SnapshotSent => Some(packet(
                    request(Payload::SnapshotSent(proto::SnapshotSent {})),
                    vec![],
                )),
            };
            if let Some(packet) = message.filter(|_| connected) {
                match zds::validate(packet, snapshot_done) {
                    Ok(event) => {
                        let (is_snapshot, added, deleted) = match &event {
                            zds::PodEvent::SnapshotSent => (true, None, None),
                            zds::PodEvent::Add { pod, .. } => (false, Some(pod.uid.clone()), None),
                            zds::PodEvent::Keep { uid } => (false, Some(uid.clone()), None),
                            zds::PodEvent::Del { uid } => (false, None, Some(uid.clone())),
                        };
                        let _ = manager.handle(event).await;
                        if let Some(uid) = added.filter(|_| !snapshot_done) {
                            named.insert(uid);
                        }
                        if let Some(uid) = deleted {
                            assert!(
                                !proxies.running.lock().unwrap().contains(&uid),
                                "{uid} runs after its Del"
                            );
                            named.remove(&uid);
                        }
                        if is_snapshot {
                            snapshot_done = true;
                            let running = proxies.running.lock().unwrap().clone();
                            assert!(
                                running.is_subset(&named),
                                "after the snapshot {running:?} run, but only {named:?} were named"
                            );
                        }
                    }
                    // As the ZDS client does: these end the session; it reconnects.
                    Err(e) if e.ends_session() => {
                        manager.session_ended().await;
                        manager.session_started().await;
                        snapshot_done = false;
                        named.clear();
                    }
                    Err(_) => {}
                }
            }
            let tracked: BTreeSet<String> = (manager.pods().await.into_iter())
                .filter(|p| p.running)
                .map(|p| p.info.uid)
                .collect();
            let running = proxies.running.lock().unwrap().clone();
            assert_eq!(
                tracked, running,
                "the manager and the running proxies disagree"
            );
            if manager.is_ready(true).await {
                assert!(
                    connected && snapshot_done,
                    "ready without a complete snapshot"
                );
            }
        }
    });
});
