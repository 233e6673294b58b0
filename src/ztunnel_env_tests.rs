//! ztunnel's environment read as the chart sets it: defaults, the drain rule, layering, and
//! errors that name the variable.
use super::*;

/// The chart's environment with its default values (README "Istio's ztunnel Helm chart").
fn chart(root: &Path, extra: &[(&str, &str)]) -> ChartEnv {
    let root = root.display().to_string();
    let mut env: BTreeMap<String, String> = [
        ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("RUST_LOG", "info"),
        ("RUST_BACKTRACE", "1"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("INPOD_ENABLED", "true"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("POD_NAME", "ztunnel-abcde"),
        ("POD_NAMESPACE", "istio-system"),
        ("NODE_NAME", "worker-1"),
        ("INSTANCE_IP", "10.244.1.7"),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("ZTUNNEL_CPU_LIMIT", "4"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        (CHART_ROOT_ENV, root.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    ChartEnv(env)
}

fn mounts() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for file in [ROOT_CERT, TOKEN] {
        let path = root.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "x").unwrap();
    }
    root
}

#[test]
fn the_charts_defaults_make_an_istio_ambient_node() {
    let root = mounts();
    let loaded = load(&chart(root.path(), &[])).unwrap();
    let c = &loaded.config;
    let cp = c.control_plane.as_ref().unwrap();
    assert_eq!(c.node, "worker-1");
    assert_eq!(cp.address, ISTIOD_IN_CLUSTER);
    assert_eq!(cp.root_cert, root.path().join(ROOT_CERT));
    assert_eq!(cp.token_file, Some(root.path().join(TOKEN)));
    assert_eq!(cp.cluster_id, "Kubernetes");
    assert_eq!(cp.pod_name.as_deref(), Some("ztunnel-abcde"));
    assert_eq!(cp.instance_ip, Some("10.244.1.7".parse().unwrap()));
    assert_eq!(cp.metadata.get("CLUSTER_ID").unwrap(), "Kubernetes");
    assert_eq!(
        c.ca,
        crate::config::CaConfig::Istio {
            address: Some(ISTIOD_IN_CLUSTER.into()),
            root_cert: Some(root.path().join(ROOT_CERT)),
            token_file: Some(root.path().join(TOKEN)),
            server_name: None,
        }
    );
    assert_eq!(c.capture, crate::config::CaptureMode::IstioCni);
    assert_eq!(c.zds_socket, root.path().join(ZDS_SOCKET));
    assert_eq!(c.state_dir, root.path().join(STATE_DIR));
    assert_eq!(c.drain_deadline, Duration::from_secs(25));
    assert_eq!(c.trust_domain, "cluster.local");
    assert!(loaded.file.is_none());
    // Only the DNS proxy ztund lacks is worth a word under the chart's defaults.
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].contains("DNS"));
}

#[test]
fn drain_deadline_follows_ztunnels_rule() {
    let env = |pairs: &[(&str, &str)]| pairs.iter().copied().collect::<ChartEnv>();
    let secs = Duration::from_secs;
    assert_eq!(drain_deadline(&env(&[])).unwrap(), secs(5));
    let grace = |g: &str| drain_deadline(&env(&[("TERMINATION_GRACE_PERIOD_SECONDS", g)]));
    assert_eq!(grace("30").unwrap(), secs(25));
    assert_eq!(grace("11").unwrap(), secs(6));
    assert_eq!(grace("10").unwrap(), secs(9));
    assert_eq!(grace("2").unwrap(), secs(1));
    assert_eq!(grace("0").unwrap(), secs(1));
    let both = env(&[
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("CONNECTION_TERMINATION_DEADLINE", "2500ms"),
    ]);
    assert_eq!(drain_deadline(&both).unwrap(), Duration::from_millis(2500));
    let err = grace("thirty").unwrap_err().to_string();
    assert!(err.contains("TERMINATION_GRACE_PERIOD_SECONDS"), "{err}");
}

#[test]
fn malformed_values_name_their_variable() {
    let root = mounts();
    for (var, value) in [
        ("INSTANCE_IP", "10.0.0"),
        ("XDS_ADDRESS", "http://istiod:15010"),
        ("CA_ADDRESS", ""),
        ("XDS_ROOT_CA", "SYSTEM"),
        ("SECRET_TTL", "soon"),
        ("ZTUNNEL_WORKER_THREADS", "0"),
        ("ZTUNNEL_WORKER_THREADS", "150%"),
        ("LOG_FORMAT", "yaml"),
        ("RUST_LOG", "loud"),
        ("AUTH_TOKEN", "eyJhbGciOi"),
        ("POOL_UNUSED_RELEASE_TIMEOUT", "5 minutes"),
    ] {
        let err = load(&chart(root.path(), &[(var, value)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(var), "{var}={value:?}: {err}");
    }
    let mut env = chart(root.path(), &[]);
    env.0.remove("NODE_NAME");
    assert!(load(&env).unwrap_err().to_string().contains("NODE_NAME"));
}

#[test]
fn other_settings_map_onto_ztunds_keys() {
    let root = mounts();
    let env = chart(
        root.path(),
        &[
            ("XDS_ADDRESS", "istiod-canary.istio-system.svc:15012"),
            ("CA_ADDRESS", "https://ca.example:443"),
            ("ALT_XDS_HOSTNAME", "istiod.istio-system.svc"),
            ("LOG_FORMAT", "json"),
            ("SECRET_TTL", "12h"),
            ("ZTUNNEL_WORKER_THREADS", "50%"),
            ("POOL_MAX_STREAMS_PER_CONNECTION", "50"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("TRUST_DOMAIN", "example.org"),
        ],
    );
    let c = load(&env).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let c = c.config;
    let cp = c.control_plane.unwrap();
    assert_eq!(cp.address, "https://istiod-canary.istio-system.svc:15012");
    assert_eq!(cp.server_name.as_deref(), Some("istiod.istio-system.svc"));
    let crate::config::CaConfig::Istio { address, .. } = &c.ca else {
        panic!("{:?}", c.ca)
    };
    assert_eq!(address.as_deref(), Some("https://ca.example:443"));
    assert_eq!(c.log_format, crate::config::LogFormat::Json);
    assert_eq!(c.cert_ttl, Duration::from_secs(12 * 3600));
    assert_eq!(c.data_plane.threads, Some(2));
    assert_eq!(c.pool.max_streams_per_connection, 50);
    assert_eq!(c.trust_domain, "example.org");
}

#[test]
fn unhonoured_settings_are_reported_not_fatal() {
    let root = mounts();
    let env = chart(
        root.path(),
        &[
            ("PROXY_MODE", "dedicated"),
            ("NETWORK", "net1"),
            ("XDS_HEADER_X", "1"),
        ],
    );
    let warnings = load(&env).unwrap().warnings.join("\n");
    for var in ["PROXY_MODE", "NETWORK", "XDS_HEADER_*"] {
        assert!(warnings.contains(var), "{var}: {warnings}");
    }
}

#[test]
fn a_ztund_file_then_ztund_env_go_on_top() {
    let root = mounts();
    let file = root.path().join(DEFAULT_FILE);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        "ports: {admin: 16000}\nmeshFile: local.yaml\ncontrolPlane: {clusterId: east}\n",
    )
    .unwrap();
    let env = chart(root.path(), &[("ZTUND_DRAIN_DEADLINE", "3s")]);
    let c = load(&env).unwrap();
    assert_eq!(c.file.as_deref(), Some(file.as_path()));
    let c = c.config;
    assert_eq!(c.ports.admin, 16000);
    assert_eq!(c.ports.readiness, 15021);
    assert_eq!(c.mesh_file, Some(file.parent().unwrap().join("local.yaml")));
    let cp = c.control_plane.unwrap();
    assert_eq!(cp.cluster_id, "east");
    assert_eq!(cp.pod_name.as_deref(), Some("ztunnel-abcde"));
    assert_eq!(c.drain_deadline, Duration::from_secs(3));
    // A file that changes the identity source replaces the chart's `ca` instead of mixing in.
    std::fs::write(&file, "ca: {mode: spiffe}\n").unwrap();
    let c = load(&env).unwrap().config;
    assert!(
        matches!(c.ca, crate::config::CaConfig::Spiffe { .. }),
        "{:?}",
        c.ca
    );
    // A bad file key is named with the file.
    std::fs::write(&file, "portz: {admin: 1}\n").unwrap();
    let err = load(&env).unwrap_err().to_string();
    assert!(
        err.contains("portz") && err.contains("config.yaml"),
        "{err}"
    );
}

#[test]
fn printed_config_reads_back_the_same() {
    let root = mounts();
    let c = load(&chart(root.path(), &[])).unwrap().config;
    let text = serde_norway::to_string(&c).unwrap();
    assert_eq!(Config::parse(&text, "printed").unwrap(), c);
}
