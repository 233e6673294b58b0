//! Tests of the ZDS server against an istio-cni-shaped client: the handshake, pod add/delete
//! with netns descriptors, snapshots and the refusals of malformed messages.

use std::os::fd::OwnedFd;

use super::*;

/// A network namespace of its own (ztund's own is refused), made on a throwaway thread.
pub(super) fn fresh_netns() -> OwnedFd {
    std::thread::spawn(|| {
        // SAFETY: unshare only changes this short-lived thread's namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

fn fd() -> OwnedFd {
    fresh_netns()
}

fn packet(request: Request, fds: usize) -> Packet {
    let bytes = proto::WorkloadRequest {
        payload: Some(request),
    }
    .encode_to_vec();
    Packet {
        bytes,
        fds: (0..fds).map(|_| fd()).collect(),
        truncated: false,
    }
}

fn add(uid: &str, info: bool) -> Request {
    Request::Add(proto::AddWorkload {
        uid: uid.into(),
        workload_info: info.then(|| proto::WorkloadInfo {
            name: "sleep-1".into(),
            namespace: "default".into(),
            service_account: "sleep".into(),
        }),
    })
}

#[test]
fn add_with_one_fd_and_info_is_accepted() {
    let event = validate(packet(add("u1", true), 1), false).unwrap();
    let PodEvent::Add { pod, netns } = event else {
        panic!("not an add: {event:?}");
    };
    assert_eq!(pod.uid, "u1");
    assert_eq!(pod.service_account, "sleep");
    assert!(netns.is_network_namespace());
    // Adds stay valid after the snapshot.
    assert!(validate(packet(add("u2", true), 1), true).is_ok());
}

#[test]
fn add_needs_exactly_one_fd_and_info() {
    let cases = [
        (packet(add("u1", true), 0), "0 file descriptors"),
        (packet(add("u1", true), 2), "2 file descriptors"),
        (packet(add("u1", false), 1), "no workload_info"),
        (packet(add("", true), 1), "empty uid"),
    ];
    for (packet, text) in cases {
        let err = validate(packet, false).unwrap_err();
        assert!(err.to_string().contains(text), "{err} should say {text}");
        assert!(!err.ends_session());
    }
}

#[test]
fn only_add_may_carry_an_fd() {
    let cases = [
        Request::Del(proto::DelWorkload { uid: "u1".into() }),
        Request::Keep(proto::KeepWorkload { uid: "u1".into() }),
        Request::SnapshotSent(proto::SnapshotSent {}),
    ];
    for request in cases {
        let err = validate(packet(request, 1), false).unwrap_err();
        assert!(
            matches!(err, ZdsError::UnexpectedFds { count: 1, .. }),
            "{err}"
        );
    }
}

// HARDENING Z5
#[test]
fn snapshot_order_violations_end_the_session() {
    let keep = Request::Keep(proto::KeepWorkload { uid: "u1".into() });
    assert!(matches!(
        validate(packet(keep.clone(), 0), false),
        Ok(PodEvent::Keep { .. })
    ));
    let err = validate(packet(keep, 0), true).unwrap_err();
    assert!(matches!(err, ZdsError::KeepAfterSnapshot { .. }) && err.ends_session());
    let sent = Request::SnapshotSent(proto::SnapshotSent {});
    assert!(matches!(
        validate(packet(sent.clone(), 0), false),
        Ok(PodEvent::SnapshotSent)
    ));
    let err = validate(packet(sent, 0), true).unwrap_err();
    assert!(matches!(err, ZdsError::DuplicateSnapshotSent) && err.ends_session());
    let del = Request::Del(proto::DelWorkload { uid: "u1".into() });
    let err = validate(packet(del.clone(), 0), false).unwrap_err();
    assert!(matches!(err, ZdsError::DelBeforeSnapshot { .. }) && err.ends_session());
    assert!(matches!(
        validate(packet(del, 0), true),
        Ok(PodEvent::Del { .. })
    ));
}

#[test]
fn garbage_truncation_and_empty_requests_are_errors() {
    let garbage = Packet {
        bytes: vec![0xff, 0xff, 0xff],
        fds: vec![],
        truncated: false,
    };
    assert!(matches!(
        validate(garbage, false),
        Err(ZdsError::Decode { .. })
    ));
    let mut truncated = packet(add("u1", true), 1);
    truncated.truncated = true;
    assert!(matches!(
        validate(truncated, false),
        Err(ZdsError::Truncated)
    ));
    let empty = Packet {
        bytes: proto::WorkloadRequest { payload: None }.encode_to_vec(),
        fds: vec![],
        truncated: false,
    };
    assert!(matches!(
        validate(empty, false),
        Err(ZdsError::EmptyRequest)
    ));
}

/// How many of this process's fds name `target` (a path, or `net:[inode]`).
fn fds_naming(target: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| link == target)
        .count()
}

// HARDENING Z1 Z2 Z3 Z4
#[test]
fn every_refused_request_names_its_fault_and_closes_every_fd_it_carried() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let file_path = dir.path().join("not-a-netns");
    std::fs::write(&file_path, b"x").unwrap();
    let file = || OwnedFd::from(std::fs::File::open(&file_path).unwrap());
    let ns = fresh_netns();
    let ns_link = std::fs::read_link(format!("/proc/self/fd/{}", ns.as_raw_fd())).unwrap();
    let netns = || ns.try_clone().unwrap();
    let socket = || OwnedFd::from(std::os::unix::net::UnixDatagram::unbound().unwrap());
    let open = |path: &str| OwnedFd::from(std::fs::File::open(path).unwrap());
    let with = |request: Request, fds: Vec<OwnedFd>| Packet {
        fds,
        ..packet(request, 0)
    };
    let del = Request::Del(proto::DelWorkload { uid: "u1".into() });
    let keep = Request::Keep(proto::KeepWorkload { uid: "u1".into() });
    let sent = Request::SnapshotSent(proto::SnapshotSent {});
    let cases = vec![
        (with(add("u1", true), vec![]), "0 file descriptors"),
        (
            with(add("u1", true), vec![netns(), netns()]),
            "2 file descriptors",
        ),
        (
            with(add("u1", true), vec![netns(), file()]),
            "2 file descriptors",
        ),
        (with(add("u1", false), vec![netns()]), "no workload_info"),
        (with(add("", true), vec![netns()]), "empty uid"),
        (with(del, vec![netns()]), "only Add may carry"),
        (with(keep, vec![file()]), "only Add may carry"),
        (with(sent, vec![netns()]), "only Add may carry"),
        (
            with(add("u1", true), vec![file()]),
            "not a network namespace",
        ),
        (
            with(add("u1", true), vec![socket()]),
            "not a network namespace",
        ),
        (
            with(add("u1", true), vec![open("/proc/self/ns/mnt")]),
            "not a network namespace",
        ),
        (
            with(add("u1", true), vec![open("/proc/self/ns/net")]),
            "ztund's own network namespace",
        ),
        (
            Packet {
                truncated: true,
                ..with(add("u1", true), vec![netns()])
            },
            "did not fit",
        ),
        (
            Packet {
                bytes: vec![0xff, 0xff, 0xff],
                fds: vec![netns(), file()],
                truncated: false,
            },
            "undecodable",
        ),
    ];
    assert!(fds_naming(&file_path) > 0 && fds_naming(&ns_link) > 1);
    for (packet, text) in cases {
        let err = validate(packet, false).unwrap_err();
        assert!(err.to_string().contains(text), "{err} should say {text}");
    }
    assert_eq!(fds_naming(&file_path), 0, "every file fd closed");
    assert_eq!(
        fds_naming(&ns_link),
        1,
        "only the test's own netns fd is left"
    );
}

#[test]
fn wire_field_numbers_match_istio() {
    // DelWorkload.uid is field 2: tag byte 0x12; WorkloadRequest.keep is field 5: tag 0x2a.
    let del = proto::WorkloadRequest {
        payload: Some(Request::Del(proto::DelWorkload { uid: "x".into() })),
    }
    .encode_to_vec();
    assert_eq!(del, [0x12, 3, 0x12, 1, b'x']);
    let keep = proto::WorkloadRequest {
        payload: Some(Request::Keep(proto::KeepWorkload { uid: "x".into() })),
    }
    .encode_to_vec();
    assert_eq!(keep, [0x2a, 3, 0x0a, 1, b'x']);
    let hello = proto::ZdsHello { version: 1 }.encode_to_vec();
    assert_eq!(hello, [0x08, 1]);
    assert_eq!(ack::<PodError>(&Ok(())), [0x0a, 0]);
}
