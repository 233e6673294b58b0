//! The manifests in daemonset/ against what ztund reads: each DaemonSet's mounts are laid out in
//! a temporary root as Kubernetes would lay them, its environment resolved as the downward API
//! would, and the config ztund builds from them must find its root certificate, token, ZDS
//! socket and a writable state directory there, on the ports the probes and scrape annotations
//! name. The constants come from the code, so a manifest and the code cannot drift apart.
//! (Schema validation of the same files is `kubernetes-validate` in .ci/run.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::Value;
use ztund::config::{CaptureMode, Config};
use ztund::ztunnel_env::{self, ChartEnv};

fn docs(path: &str) -> Vec<Value> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

/// The single container of a DaemonSet or Deployment.
fn container(workload: &Value) -> &Value {
    let containers = list(&workload["spec"]["template"]["spec"]["containers"]);
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The container's environment as the kubelet gives it: downward API fields filled in with
/// stand-ins, `$(VAR)` references to earlier variables expanded.
fn resolved_env(workload: &Value, stand_ins: &[(&str, &str)]) -> BTreeMap<String, String> {
    let pod = &workload["spec"]["template"]["spec"];
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for var in list(&container(workload)["env"]) {
        let name = text(&var["name"]).to_string();
        let value = if let Some(v) = var["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.namespace" => text(&workload["metadata"]["namespace"]).to_string(),
                "spec.serviceAccountName" => text(&pod["serviceAccountName"]).to_string(),
                other => stand_ins
                    .iter()
                    .find(|(k, _)| *k == other)
                    .unwrap_or_else(|| panic!("no stand-in for {other}"))
                    .1
                    .to_string(),
            }
        } else if var["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu" {
            "2".into()
        } else {
            panic!("{name}: unexpected source {var:?}")
        };
        env.insert(name, value);
    }
    env
}

const STAND_INS: &[(&str, &str)] = &[
    ("spec.nodeName", "node-a"),
    ("metadata.name", "proxy-x1"),
    ("status.podIP", "10.244.0.9"),
];

/// A pod's volume as mounted: what kind, and where in the container.
struct Mount {
    volume: Value,
    path: PathBuf,
    read_only: bool,
}

fn mounts(workload: &Value) -> Vec<Mount> {
    let volumes = list(&workload["spec"]["template"]["spec"]["volumes"]);
    list(&container(workload)["volumeMounts"])
        .iter()
        .map(|m| {
            let name = &m["name"];
            let volume = volumes
                .iter()
                .find(|v| &v["name"] == name)
                .unwrap_or_else(|| panic!("mount {name:?} has no volume"))
                .clone();
            Mount {
                volume,
                path: PathBuf::from(text(&m["mountPath"])),
                read_only: m["readOnly"] == true,
            }
        })
        .collect()
}

/// The mount holding `path`, the deepest one.
fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> &'a Mount {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.path))
        .max_by_key(|m| m.path.components().count())
        .unwrap_or_else(|| panic!("{} is on no mount (the read-only root)", path.display()))
}

/// Lays the mounts out under `root` as the kubelet would: ConfigMap and Secret keys as files
/// (from `docs` when the object is there, else a stand-in), projected tokens, empty dirs.
fn lay_out(root: &Path, mounts: &[Mount], docs: &[Value]) {
    for m in mounts {
        let dir = root.join(m.path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let v = &m.volume;
        for source in list(&v["projected"]["sources"]) {
            let token = &source["serviceAccountToken"];
            std::fs::write(dir.join(text(&token["path"])), "a.jwt.token").unwrap();
        }
        if let Some(name) = v["configMap"]["name"].as_str() {
            let data = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
                .map(|d| d["data"].clone());
            match data {
                Some(Value::Mapping(data)) => {
                    for (key, value) in data {
                        std::fs::write(dir.join(text(&key)), text(&value)).unwrap();
                    }
                }
                // Made by someone else (istiod's istio-ca-root-cert, the operator's root).
                _ => std::fs::write(dir.join("root-cert.pem"), "PEM").unwrap(),
            }
        }
    }
}

/// Under `root`, the path the container sees as `path`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    PathBuf::from("/").join(
        path.strip_prefix(root)
            .unwrap_or_else(|_| panic!("{} is outside the container root", path.display())),
    )
}

/// What every node DaemonSet must get right, whichever way it configures ztund.
fn check_node_proxy(ds: &Value, config: &Config, root: &Path, mounts: &[Mount]) {
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(ds);
    assert_eq!(config.capture, CaptureMode::IstioCni);
    // istio-cni's socket: the host directory, mounted at the same path.
    let zds_dir = inside(root, config.zds_socket.parent().unwrap());
    let zds = mount_of(mounts, &zds_dir);
    assert_eq!(zds.path, zds_dir, "the ZDS socket's directory is the mount");
    assert_eq!(
        text(&zds.volume["hostPath"]["path"]),
        zds_dir.to_str().unwrap()
    );
    assert!(!zds.read_only);
    // The root filesystem is read-only: the state directory must be on a writable emptyDir.
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let state = mount_of(mounts, &inside(root, &config.state_dir));
    assert!(state.volume["emptyDir"].is_mapping() && !state.read_only);
    // Probes, ports and scraping on ztund's ports.
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"].as_u64(), Some(config.ports.readiness.into()));
    assert_eq!(probe["path"], "/healthz/ready");
    let ports: Vec<u64> = list(&c["ports"])
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert!(ports.contains(&config.ports.metrics.into()), "{ports:?}");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        text(&annotations["prometheus.io/port"]),
        config.ports.metrics.to_string()
    );
    // Kubernetes waits longer than ztund drains.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        config.drain_deadline.as_secs() < grace,
        "drain {:?} within grace {grace}s",
        config.drain_deadline
    );
    // The capabilities ztund uses, no more.
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        serde_norway::from_str::<Value>("[ALL]").unwrap()
    );
    let mut added: Vec<&str> = list(&caps["add"]).iter().map(text).collect();
    added.sort();
    assert_eq!(added, ["NET_ADMIN", "SYS_ADMIN"]);
    // The proxy is never captured itself.
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"],
        "none"
    );
}

#[test]
fn istio_daemonset_gives_ztund_what_ztunnel_mode_reads() {
    let docs = docs("daemonset/istio/ztund.yaml");
    let ds = find(&docs, "DaemonSet", "ztunnel");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        text(&pod["serviceAccountName"]),
        ztunnel_env::SERVICE_ACCOUNT
    );
    find(&docs, "ServiceAccount", ztunnel_env::SERVICE_ACCOUNT);
    assert_eq!(
        container(ds)["args"],
        serde_norway::from_str::<Value>("[proxy, ztunnel]").unwrap()
    );

    let root = tempfile::tempdir().unwrap();
    let mounts = mounts(ds);
    lay_out(root.path(), &mounts, &docs);
    let mut env = resolved_env(ds, STAND_INS);
    env.insert(
        ztunnel_env::CHART_ROOT_ENV.into(),
        root.path().display().to_string(),
    );
    env.insert("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into());
    let env: ChartEnv = env.into_iter().collect();
    let loaded = ztunnel_env::load(&env).expect("the manifest's environment makes a config");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let config = loaded.config;
    let cp = config.control_plane.as_ref().unwrap();
    assert_eq!(cp.address, ztunnel_env::ISTIOD_IN_CLUSTER);
    assert_eq!(cp.pod_name.as_deref(), Some("proxy-x1"));
    assert_eq!(cp.pod_namespace, "istio-system");
    assert_eq!(config.node, "node-a");

    // The root certificate: istiod's istio-ca-root-cert ConfigMap, where ztund reads it.
    assert!(cp.root_cert.is_file(), "{}", cp.root_cert.display());
    let roots = mount_of(&mounts, &inside(root.path(), &cp.root_cert));
    assert_eq!(roots.volume["configMap"]["name"], "istio-ca-root-cert");
    // The token: projected for istiod's audience, where ztund reads it.
    let token = cp.token_file.as_ref().expect("a token file");
    assert!(token.is_file());
    let projected = mount_of(&mounts, &inside(root.path(), token));
    let source = &list(&projected.volume["projected"]["sources"])[0]["serviceAccountToken"];
    assert_eq!(text(&source["audience"]), ztunnel_env::TOKEN_AUDIENCE);
    assert_eq!(
        text(&source["path"]),
        Path::new(ztunnel_env::TOKEN)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    // The optional ztund file is where `proxy ztunnel` looks for it, and was read.
    assert_eq!(
        loaded.file.as_deref().map(|f| inside(root.path(), f)),
        Some(PathBuf::from("/").join(ztunnel_env::DEFAULT_FILE))
    );
    // Kubernetes' grace period is what ztund is told, so ztunnel's drain rule applies.
    assert_eq!(
        env.get("TERMINATION_GRACE_PERIOD_SECONDS").unwrap(),
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap()
            .to_string()
    );
    check_node_proxy(ds, &config, root.path(), &mounts);
}

#[test]
fn standalone_daemonset_reaches_its_control_plane() {
    let cp_docs = docs("daemonset/standalone/controlplane.yaml");
    let docs = docs("daemonset/standalone/ztund.yaml");
    let ds = find(&docs, "DaemonSet", "ztund");
    let root = tempfile::tempdir().unwrap();
    let mounts = mounts(ds);
    lay_out(root.path(), &mounts, &docs);

    // `run --config FILE`: the file from its ConfigMap, then ZTUND_* from the manifest.
    let args: Vec<&str> = list(&container(ds)["args"]).iter().map(text).collect();
    assert_eq!(args[..2], ["run", "--config"]);
    let file = root.path().join(args[2].trim_start_matches('/'));
    let config_text = std::fs::read_to_string(&file).expect("the config file is mounted");
    let mut config = Config::parse(&config_text, args[2]).unwrap();
    let env = resolved_env(ds, STAND_INS);
    config.apply_env(|k| env.get(k).cloned()).unwrap();
    assert_eq!(config.node, "node-a");

    // The address is the Service, on the port the control plane listens on.
    let cp = config.control_plane.clone().unwrap();
    let service = find(&cp_docs, "Service", "ztund-controlplane");
    let host = format!(
        "{}.{}.svc",
        text(&service["metadata"]["name"]),
        text(&service["metadata"]["namespace"])
    );
    let port = &list(&service["spec"]["ports"])[0];
    assert_eq!(
        cp.address,
        format!("https://{host}:{}", port["port"].as_u64().unwrap())
    );
    let deployment = find(&cp_docs, "Deployment", "ztund-controlplane");
    let cp_container = container(deployment);
    let cp_args: Vec<&str> = list(&cp_container["args"]).iter().map(text).collect();
    let named = list(&cp_container["ports"])
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("the Service's targetPort names a container port");
    let listen = named["containerPort"].as_u64().unwrap();
    assert!(cp_args.contains(&format!("--listen=0.0.0.0:{listen}").as_str()));
    // Its serving certificate names the host the nodes dial.
    assert!(
        cp_args.contains(&format!("--san={host}").as_str()),
        "{cp_args:?}"
    );
    // Its state (CA key, tokens) on a volume that outlives the pod.
    let state_arg = cp_args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .unwrap();
    let cp_mounts = self::mounts(deployment);
    let state = mount_of(&cp_mounts, Path::new(state_arg));
    assert!(state.volume["persistentVolumeClaim"].is_mapping());

    // The root certificate and this node's token are on their mounts.
    let roots = mount_of(&mounts, &cp.root_cert);
    assert_eq!(roots.volume["configMap"]["name"], "ztund-root-cert");
    let token = cp
        .token_file
        .clone()
        .expect("ZTUND_CONTROL_PLANE_TOKEN_FILE");
    assert_eq!(token.file_name().unwrap(), "node-a", "the node's own key");
    let tokens = mount_of(&mounts, &token);
    assert_eq!(tokens.volume["secret"]["secretName"], "ztund-node-tokens");

    // Paths in the config are as the container sees them; check them under the laid-out root.
    let mut rooted = config.clone();
    rooted.zds_socket = root
        .path()
        .join(config.zds_socket.strip_prefix("/").unwrap());
    rooted.state_dir = root
        .path()
        .join(config.state_dir.strip_prefix("/").unwrap());
    check_node_proxy(ds, &rooted, root.path(), &mounts);
}

#[test]
fn helm_values_change_the_image_only() {
    let values = docs("daemonset/istio-ztunnel-values.yaml");
    assert_eq!(values.len(), 1);
    let map = values[0].as_mapping().expect("a mapping");
    let keys: Vec<&str> = map.keys().map(text).collect();
    assert_eq!(keys, ["image"]);
    // With a "/", the chart uses the value as the whole image (no hub, tag or variant).
    let image = text(&values[0]["image"]);
    assert!(image.contains('/'), "{image}");
    let ours = docs("daemonset/istio/ztund.yaml");
    assert_eq!(
        container(find(&ours, "DaemonSet", "ztunnel"))["image"],
        image
    );
}
