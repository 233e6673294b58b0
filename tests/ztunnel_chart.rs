//! The real binary started the way Istio's ztunnel Helm chart starts ztunnel: `proxy ztunnel`,
//! exactly the chart's environment (default values), files where the chart mounts them (under a
//! temporary root, `ZTUND_CHART_ROOT`). It must print the config those make, refuse a malformed
//! variable by name, and, with `ztund controlplane` standing in for istiod, fetch the node's
//! workloads over xDS and their certificates from the CA with the mounted token and root.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ztund");

/// The chart's container environment with its default values, downward API fields filled in.
fn chart_env(root: &Path) -> BTreeMap<&'static str, String> {
    [
        ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("RUST_LOG", "info"),
        ("RUST_BACKTRACE", "1"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("INPOD_ENABLED", "true"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("POD_NAME", "ztunnel-7x2kq"),
        ("POD_NAMESPACE", "istio-system"),
        ("NODE_NAME", "node1"),
        ("INSTANCE_IP", "127.0.0.1"),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("ZTUNNEL_CPU_LIMIT", "2"),
        // Set by Kubernetes in every container.
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("ZTUND_CHART_ROOT", root.to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

/// The chart's mounts under `root`: the root certificate and the projected token, the ZDS
/// socket's directory, /tmp.
fn lay_out_mounts(root: &Path, root_cert: &[u8], token: &str) {
    let put = |rel: &str, bytes: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    put("var/run/secrets/istio/root-cert.pem", root_cert);
    put("var/run/secrets/tokens/istio-token", token.as_bytes());
    std::fs::create_dir_all(root.join("var/run/ztunnel")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
}

fn ztund(args: &[&str], env: &BTreeMap<&str, String>) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v)));
    command
}

fn output(mut command: Command) -> Output {
    command.output().expect("running ztund")
}

#[test]
fn prints_the_config_the_charts_environment_and_mounts_make() {
    let root = tempfile::tempdir().unwrap();
    lay_out_mounts(root.path(), b"PEM", "a.jwt.token");
    let r = |rel: &str| root.path().join(rel).display().to_string();
    let out = output(ztund(
        &["proxy", "ztunnel", "--print-config"],
        &chart_env(root.path()),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let c: Value = serde_norway::from_slice(&out.stdout).unwrap();
    let istiod = "https://istiod.istio-system.svc:15012";
    assert_eq!(c["node"], "node1");
    assert_eq!(c["trustDomain"], "cluster.local");
    assert_eq!(c["capture"], "istio-cni");
    assert_eq!(c["zdsSocket"], r("var/run/ztunnel/ztunnel.sock").as_str());
    assert_eq!(c["stateDir"], r("tmp/ztund").as_str());
    assert_eq!(c["drainDeadline"], "25s");
    let cp = &c["controlPlane"];
    assert_eq!(cp["address"], istiod);
    assert_eq!(
        cp["rootCert"],
        r("var/run/secrets/istio/root-cert.pem").as_str()
    );
    assert_eq!(
        cp["tokenFile"],
        r("var/run/secrets/tokens/istio-token").as_str()
    );
    assert_eq!(cp["clusterId"], "Kubernetes");
    assert_eq!(cp["podName"], "ztunnel-7x2kq");
    assert_eq!(cp["podNamespace"], "istio-system");
    assert_eq!(cp["instanceIp"], "127.0.0.1");
    assert_eq!(c["ca"]["mode"], "istio");
    assert_eq!(c["ca"]["address"], istiod);
    assert_eq!(c["ports"]["readiness"], 15021);
    assert_eq!(c["ports"]["metrics"], 15020);
    // The one ztunnel default ztund cannot honour is said, once.
    assert_eq!(stderr.matches("DNS proxy").count(), 1, "{stderr}");

    // A malformed value stops it, naming the variable.
    let mut env = chart_env(root.path());
    env.insert("TERMINATION_GRACE_PERIOD_SECONDS", "30s".into());
    let out = output(ztund(&["proxy", "ztunnel", "--print-config"], &env));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("TERMINATION_GRACE_PERIOD_SECONDS"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// A child process killed (and reaped) when dropped.
struct Running(Child, PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("----- {} -----\n{log}", self.1.display());
        }
    }
}

fn spawn(mut command: Command, log: PathBuf) -> Running {
    let file = std::fs::File::create(&log).unwrap();
    command.stdout(Stdio::null()).stderr(file);
    Running(command.spawn().expect("starting ztund"), log)
}

/// Ports nothing listens on now (held together so they differ, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn with_a_control_plane_for_istiod_it_gets_workloads_and_certificates() {
    let work = tempfile::tempdir().unwrap();
    let mesh = work.path().join("mesh");
    let state = work.path().join("cp-state");
    std::fs::create_dir_all(&mesh).unwrap();
    std::fs::write(
        mesh.join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: default}\n\
         spec: {nodeName: node1, serviceAccountName: sleep}\nstatus: {podIP: 10.1.1.2}\n",
    )
    .unwrap();
    let [
        xds,
        hbone,
        socks5,
        outbound,
        inbound,
        admin,
        metrics,
        readiness,
    ] = free_ports::<8>();
    let cp_log = work.path().join("controlplane.log");
    let mut cp = Command::new(BIN);
    cp.arg("controlplane")
        .arg("--dir")
        .arg(&mesh)
        .args(["--listen", &format!("127.0.0.1:{xds}"), "--state-dir"])
        .arg(&state);
    let _cp = spawn(cp, cp_log);
    wait_for(
        "the control plane to listen",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", xds)).ok(),
    );
    let token = output({
        let mut c = Command::new(BIN);
        c.args(["controlplane", "token", "--node", "node1", "--state-dir"])
            .arg(&state);
        c
    });
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap();

    // The chart's mounts, holding what istiod's would: its root and this node's token.
    let root = work.path().join("chart");
    let root_cert = std::fs::read(state.join("ca/root-cert.pem")).unwrap();
    lay_out_mounts(&root, &root_cert, token.trim());
    // Ports of its own, so it runs beside anything else on this machine: a ztund file on top.
    let file = work.path().join("ztund.yaml");
    std::fs::write(
        &file,
        format!(
            "ports: {{hbone: {hbone}, socks5: {socks5}, outbound: {outbound}, \
             inboundPlaintext: {inbound}, admin: {admin}, metrics: {metrics}, \
             readiness: {readiness}}}\n"
        ),
    )
    .unwrap();
    let mut env = chart_env(&root);
    // The chart's caAddress / xdsAddress values; host:port as the chart passes them.
    env.insert("XDS_ADDRESS", format!("127.0.0.1:{xds}"));
    env.insert("CA_ADDRESS", format!("127.0.0.1:{xds}"));
    env.insert("ZTUND_CONFIG", file.display().to_string());
    let _node = spawn(
        ztund(&["proxy", "ztunnel"], &env),
        work.path().join("node.log"),
    );

    let identity = "spiffe://cluster.local/ns/default/sa/sleep";
    let dump = wait_for(
        "the workload from xDS and its certificate",
        Duration::from_secs(30),
        || {
            let text = get(admin, "/config_dump")?;
            let dump: serde_json::Value = serde_json::from_str(&text).ok()?;
            let from_xds = dump["workloads"]
                .as_array()?
                .iter()
                .any(|w| w["name"] == "sleep" && w["origin"]["source"] == "xds");
            let certified = dump["certificates"]
                .as_array()?
                .iter()
                .any(|c| c["identity"] == identity);
            (from_xds && certified).then_some(dump)
        },
    );
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 1, "{dump:#}");
}
