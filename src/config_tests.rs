//! The daemon config: defaults, errors that name their field, environment overrides.
use super::*;

const MINIMAL: &str = "node: node1\nmeshFile: mesh.yaml\nca: {mode: builtin, dir: ca}\n";

#[test]
fn minimal_config_gets_istio_defaults() {
    let c = Config::parse(MINIMAL, "t.yaml").unwrap();
    assert_eq!(c.trust_domain, "cluster.local");
    assert_eq!(c.ports.hbone, 15008);
    assert_eq!(c.ports.socks5, 15080);
    assert_eq!(c.cert_ttl, Duration::from_secs(86400));
    assert_eq!(c.socks5_bind, IpAddr::from([127, 0, 0, 1]));
    assert_eq!(c.pool.max_streams_per_connection, 100);
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            "node: ''\nmeshFile: m\nca: {mode: builtin, dir: c}\n",
            "node",
        ),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\ntrustDomain: Bad Domain\n",
            "trustDomain",
        ),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\nports: {socks5: 15008}\n",
            "ports.socks5",
        ),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\ncertTtl: 5x\n",
            "certTtl",
        ),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\nnodee: x\n",
            "nodee",
        ),
        ("node: n\nca: {mode: builtin, dir: c}\n", "meshFile"),
        (
            "node: n\ncontrolPlane: {address: cp:15012, rootCert: r}\nca: {mode: istio, adress: x}\n",
            "adress",
        ),
        ("node: n\nmeshFile: m\nca: {mode: istio}\n", "ca.address"),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\ndataPlane: {threads: 0}\n",
            "dataPlane.threads",
        ),
        (
            "node: n\nmeshFile: m\nca: {mode: builtin, dir: c}\ndataPlane: {scheduling: fifo}\n",
            "dataPlane.scheduling",
        ),
    ];
    for (text, field) in cases {
        let err = Config::parse(text, "cfg.yaml").unwrap_err().to_string();
        assert!(err.contains("cfg.yaml"), "{err}");
        assert!(err.contains(field), "{err} should name {field}");
    }
}

#[test]
fn data_plane_threads_and_scheduling_from_file_and_environment() {
    let c = Config::parse(MINIMAL, "t.yaml").unwrap();
    assert_eq!(c.data_plane.scheduling, ThreadScheduling::Normal);
    assert!(c.data_plane.thread_count() >= 2);

    let text = format!("{MINIMAL}dataPlane: {{threads: 3, scheduling: batch}}\n");
    let mut c = Config::parse(&text, "t.yaml").unwrap();
    assert_eq!(c.data_plane.thread_count(), 3);
    assert_eq!(c.data_plane.scheduling, ThreadScheduling::Batch);

    let env = |threads: &'static str, policy: &'static str| {
        move |key: &str| match key {
            "ZTUND_WORKER_THREADS" => Some(threads.to_string()),
            "ZTUND_DATA_PLANE_SCHEDULING" => Some(policy.to_string()),
            _ => None,
        }
    };
    c.apply_env(env("1", "normal")).unwrap();
    assert_eq!(c.data_plane.thread_count(), 1);
    assert_eq!(c.data_plane.scheduling, ThreadScheduling::Normal);

    // A bad value fails the start with an error that names its field.
    for (threads, policy, field) in [
        ("two", "batch", "dataPlane.threads"),
        ("0", "batch", "dataPlane.threads"),
        ("2", "fifo", "dataPlane.scheduling"),
    ] {
        let err = c.clone().apply_env(env(threads, policy)).unwrap_err();
        let err = err.to_string();
        assert!(err.contains(field), "{err} should name {field}");
        assert!(err.contains("environment"), "{err}");
    }
}

#[test]
fn the_control_plane_from_the_environment() {
    let mut c = Config::parse(MINIMAL, "t.yaml").unwrap();
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        }
    };
    let err = c
        .clone()
        .apply_env(env(&[("ZTUND_CONTROL_PLANE_ADDRESS", "https://cp:15012")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("controlPlane.rootCert"), "{err}");
    c.apply_env(env(&[
        ("ZTUND_CONTROL_PLANE_ADDRESS", "https://cp:15012"),
        ("ZTUND_CONTROL_PLANE_ROOT_CERT", "/etc/root.pem"),
        ("ZTUND_CONTROL_PLANE_TOKEN_FILE", "/etc/token"),
        ("ZTUND_CLUSTER_ID", "c1"),
        ("ZTUND_POD_NAME", "ztund-x"),
        ("ZTUND_INSTANCE_IP", "10.0.0.9"),
    ]))
    .unwrap();
    let cp = c.control_plane.clone().unwrap();
    assert_eq!(cp.address, "https://cp:15012");
    assert_eq!(cp.root_cert, PathBuf::from("/etc/root.pem"));
    assert_eq!(cp.token_file, Some(PathBuf::from("/etc/token")));
    assert_eq!(cp.cluster_id, "c1");
    assert_eq!(cp.pod_name.as_deref(), Some("ztund-x"));
    assert_eq!(cp.instance_ip, Some(IpAddr::from([10, 0, 0, 9])));
    let err = c
        .apply_env(env(&[("ZTUND_INSTANCE_IP", "ten")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("controlPlane.instanceIp"), "{err}");
}

#[test]
fn relative_paths_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, format!("{MINIMAL}zdsSocket: run/ztunnel.sock\n")).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.mesh_file, Some(dir.path().join("mesh.yaml")));
    assert_eq!(c.zds_socket, dir.path().join("run/ztunnel.sock"));
    assert!(matches!(&c.ca, CaConfig::Builtin { dir: d } if *d == dir.path().join("ca")));
}

#[test]
fn durations() {
    assert_eq!(
        duration_text::parse("500ms").unwrap(),
        Duration::from_millis(500)
    );
    assert_eq!(
        duration_text::parse("5m").unwrap(),
        Duration::from_secs(300)
    );
    assert_eq!(
        duration_text::parse("24h").unwrap(),
        Duration::from_secs(86400)
    );
    assert!(duration_text::parse("h").is_err());
    assert!(duration_text::parse("3w").is_err());
    assert!(duration_text::parse("99999999999999999d").is_err());
}

#[test]
fn a_duration_without_a_unit_is_refused_naming_the_field() {
    for (yaml, field) in [
        ("certTtl: 86400\n", "certTtl"),
        ("pool: {idleTimeout: 300}\n", "pool.idleTimeout"),
        ("watchInterval: '500'\n", "watchInterval"),
        ("drainDeadline: 5\n", "drainDeadline"),
    ] {
        let err = Config::parse(&format!("{MINIMAL}{yaml}"), "cfg.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("field `{field}`")), "{err}");
        assert!(err.contains("needs a unit, e.g."), "{err}");
    }
    let mut c = Config::parse(MINIMAL, "t.yaml").unwrap();
    let err = c
        .apply_env(|k| (k == "ZTUND_DRAIN_DEADLINE").then(|| "5".to_string()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("drainDeadline") && err.contains("5 needs a unit, e.g. 5s"),
        "{err}"
    );
    c.apply_env(|k| (k == "ZTUND_DRAIN_DEADLINE").then(|| "2500ms".to_string()))
        .unwrap();
    assert_eq!(c.drain_deadline, Duration::from_millis(2500));
}

/// Issue 14 item 8: `watchInterval: 0s` once passed and panicked the mesh watcher. Every
/// duration and count is checked at load, the error names the key and its range, and the
/// range's own ends are accepted.
#[test]
fn every_duration_and_count_out_of_range_is_refused_naming_the_key() {
    let refused = [
        ("watchInterval: 0s\n", "watchInterval"),
        ("watchInterval: 9ms\n", "watchInterval"),
        ("watchInterval: 2h\n", "watchInterval"),
        ("certTtl: 59s\n", "certTtl"),
        ("certTtl: 366d\n", "certTtl"),
        ("pool: {idleTimeout: 0s}\n", "pool.idleTimeout"),
        ("pool: {idleTimeout: 25h}\n", "pool.idleTimeout"),
        ("drainDeadline: 0ms\n", "drainDeadline"),
        ("drainDeadline: 61m\n", "drainDeadline"),
        (
            "pool: {maxStreamsPerConnection: 0}\n",
            "pool.maxStreamsPerConnection",
        ),
        (
            "pool: {maxStreamsPerConnection: 10001}\n",
            "pool.maxStreamsPerConnection",
        ),
        ("dataPlane: {threads: 1025}\n", "dataPlane.threads"),
    ];
    for (yaml, field) in refused {
        let err = Config::parse(&format!("{MINIMAL}{yaml}"), "cfg.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg.yaml") && err.contains(&format!("field `{field}`")),
            "{yaml}: {err}"
        );
        assert!(err.contains("out of range: must be from"), "{yaml}: {err}");
    }
    let edges = "watchInterval: 10ms\ncertTtl: 365d\npool: {idleTimeout: 1s, maxStreamsPerConnection: 10000}\ndrainDeadline: 1h\ndataPlane: {threads: 1024}\n";
    let c = Config::parse(&format!("{MINIMAL}{edges}"), "cfg.yaml").unwrap();
    assert_eq!(c.watch_interval, Duration::from_millis(10));
    let mut c = Config::parse(MINIMAL, "t.yaml").unwrap();
    let err = c
        .apply_env(|k| (k == "ZTUND_DRAIN_DEADLINE").then(|| "0s".to_string()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("environment") && err.contains("drainDeadline"),
        "{err}"
    );
}

#[test]
fn the_capture_backend_from_file_and_environment() {
    let c = Config::parse(MINIMAL, "t.yaml").unwrap();
    assert_eq!(c.capture_backend, CaptureBackend::Nftables);
    assert_eq!(c.bpf_dir, PathBuf::from("/sys/fs/bpf/ztund/v1"));

    let text = format!("{MINIMAL}capture: standalone\ncaptureBackend: ebpf\nbpfDir: /b/z\n");
    let mut c = Config::parse(&text, "t.yaml").unwrap();
    assert_eq!(c.capture_backend, CaptureBackend::Ebpf);
    assert_eq!(c.bpf_dir, PathBuf::from("/b/z"));
    let env = |value: &'static str| {
        move |key: &str| (key == "ZTUND_CAPTURE_BACKEND").then(|| value.to_string())
    };
    c.apply_env(env("nftables")).unwrap();
    assert_eq!(c.capture_backend, CaptureBackend::Nftables);
    let err = c.clone().apply_env(env("bpf")).unwrap_err().to_string();
    assert!(
        err.contains("captureBackend") && err.contains("environment"),
        "{err}"
    );

    // eBPF captures pods: not a mode without pods.
    for mode in ["none", "host"] {
        let text = format!("{MINIMAL}capture: {mode}\ncaptureBackend: ebpf\n");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("captureBackend"), "{err}");
    }
}
