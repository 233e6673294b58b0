//! HARDENING.md §8 `zds_message`: one ZDS request as istio-cni would send it (a well-formed
//! request of each kind or raw bytes) with fuzzed SCM_RIGHTS file descriptors of every kind
//! (ztund's own netns, a regular file, a socket, a mount namespace, a pipe) and the truncation
//! flag, through ztund's [`zds::validate`]. Every fd received is closed on every error, and an
//! accepted Add holds exactly its one netns fd, closed with the event.
#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztund::capture::zds::{self, PodEvent, proto};
use ztund::fuzzing::Packet;

#[derive(Debug, Arbitrary)]
struct Input {
    request: Request,
    fds: Vec<FdKind>,
    truncated: bool,
    snapshot_done: bool,
}

#[derive(Debug, Arbitrary)]
enum Request {
    Add { uid: String, info: bool },
    Keep(String),
    Del(String),
    SnapshotSent,
    Empty,
    Raw(Vec<u8>),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum FdKind {
    OwnNetns,
    File,
    Socket,
    MountNs,
    Pipe,
}

fn open(kind: FdKind) -> OwnedFd {
    let file = |path: &str| OwnedFd::from(File::open(path).unwrap());
    match kind {
        FdKind::OwnNetns => file("/proc/self/ns/net"),
        FdKind::File => file("/proc/self/status"),
        FdKind::MountNs => file("/proc/self/ns/mnt"),
        FdKind::Socket => OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()),
        FdKind::Pipe => std::io::pipe().unwrap().0.into(),
    }
}

fn encode(request: &Request) -> Vec<u8> {
    use proto::workload_request::Payload;
    let payload = match request {
        Request::Add { uid, info } => Payload::Add(proto::AddWorkload {
            uid: uid.clone(),
            workload_info: info.then(|| proto::WorkloadInfo {
                name: "pod".into(),
                namespace: "default".into(),
                service_account: "sleep".into(),
            }),
        }),
        Request::Keep(uid) => Payload::Keep(proto::KeepWorkload { uid: uid.clone() }),
        Request::Del(uid) => Payload::Del(proto::DelWorkload { uid: uid.clone() }),
        Request::SnapshotSent => Payload::SnapshotSent(proto::SnapshotSent {}),
        Request::Empty => return proto::WorkloadRequest { payload: None }.encode_to_vec(),
        Request::Raw(bytes) => return bytes.clone(),
    };
    proto::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fuzz_target!(|input: Input| {
    let bytes = encode(&input.request);
    let baseline = open_fds();
    // The receive side keeps at most 4 fds (seqpacket MAX_FDS); more arrive as MSG_CTRUNC.
    let kinds: Vec<FdKind> = input.fds.iter().take(4).copied().collect();
    let fds: Vec<OwnedFd> = kinds.iter().map(|k| open(*k)).collect();
    let packet = Packet {
        bytes,
        fds,
        truncated: input.truncated,
    };
    let result = zds::validate(packet, input.snapshot_done);
    match &result {
        Err(e) => {
            assert_eq!(open_fds(), baseline, "fds left open after {e}");
            return;
        }
        Ok(PodEvent::Add { .. }) => {
            assert_eq!(kinds.len(), 1, "an Add with {} fds accepted", kinds.len());
            assert!(!input.truncated, "a truncated packet accepted");
            assert_eq!(
                open_fds(),
                baseline + 1,
                "the Add holds other than its one fd"
            );
            // Z2: only another network namespace's fd makes an Add, and
            // every fd this target sends is something else (or ztund's own netns).
            panic!("an Add with a {:?} fd accepted", kinds[0]);
        }
        Ok(other) => {
            assert!(
                kinds.is_empty(),
                "{other:?} with {} fds accepted",
                kinds.len()
            );
            assert_eq!(open_fds(), baseline, "fds left open after {other:?}");
        }
    }
    drop(result);
    assert_eq!(open_fds(), baseline, "the event's fd outlived it");
});
