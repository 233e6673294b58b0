//! Running the real `ztund controlplane` inside the testbed: its YAML directory and state
//! directory in the test's working directory, node tokens made with `ztund controlplane token`,
//! node configs that take everything (mesh and certificates) from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Cluster, ztund_bin};
use crate::testbed::{ChildGuard, Place, Testbed};

/// A running `ztund controlplane`; killed when dropped.
pub struct ControlPlane {
    pub child: Option<ChildGuard>,
    /// The YAML directory it serves.
    pub dir: PathBuf,
    pub state: PathBuf,
    pub listen: SocketAddr,
    pub place: Place,
    pub log: PathBuf,
    runs: usize,
}

impl ControlPlane {
    /// Starts it in `place` listening on `listen`, serving `cluster`'s `cp/` directory (already
    /// holding the YAML), and waits until it accepts connections.
    pub async fn start(
        bed: &Testbed,
        cluster: &Cluster,
        place: Place,
        listen: SocketAddr,
    ) -> ControlPlane {
        let dir = cluster.path("cp");
        std::fs::create_dir_all(&dir).expect("control plane dir");
        let mut cp = ControlPlane {
            child: None,
            dir,
            state: cluster.path("cp-state"),
            listen,
            place,
            log: cluster.path("controlplane.log"),
            runs: 0,
        };
        cp.restart(bed).await;
        cp
    }

    /// (Re)starts the process and waits until it accepts connections.
    pub async fn restart(&mut self, bed: &Testbed) {
        self.runs += 1;
        let log = self
            .log
            .with_file_name(format!("controlplane-{}.log", self.runs));
        let log_file = std::fs::File::create(&log).expect("control plane log");
        self.log = log;
        let mut command = Command::new(ztund_bin());
        command
            .args(["--log-json", "controlplane", "--dir"])
            .arg(&self.dir)
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--san")
            .arg(self.listen.ip().to_string())
            .env("ZTUND_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file);
        self.child = Some(bed.spawn_in(self.place, command));
        let deadline = Instant::now() + Duration::from_secs(20);
        let sockets = bed.app_sockets(self.place);
        while sockets.connect(self.listen, None).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "ztund controlplane did not start listening:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (SIGKILL): the nodes see their stream break.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// What it logged in its current run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The root certificate clients verify it with.
    pub fn root_cert(&self) -> PathBuf {
        self.state.join("ca").join("root-cert.pem")
    }

    /// Replaces `name` in the served directory in one rename.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing a control plane file");
        std::fs::rename(&tmp, self.dir.join(name)).expect("renaming a control plane file");
    }

    /// The node's token (made by `ztund controlplane token`), written to a file for the node.
    pub fn token_file(&self, cluster: &Cluster, node: &str) -> PathBuf {
        let output = Command::new(ztund_bin())
            .args(["controlplane", "token", "--state-dir"])
            .arg(&self.state)
            .args(["--node", node])
            .output()
            .expect("running ztund controlplane token");
        assert!(
            output.status.success(),
            "ztund controlplane token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).expect("token is text");
        // A trailing newline, as `kubectl create secret` and editors leave one.
        cluster.write(&format!("token-{node}"), &format!("{}\n", token.trim()))
    }

    /// A node config that takes mesh and certificates from this control plane.
    pub fn node_config(&self, cluster: &Cluster, node: &str, extra: &str) -> PathBuf {
        let token = self.token_file(cluster, node);
        let text = format!(
            "node: {node}\ncontrolPlane: {{address: \"https://{listen}\", rootCert: {root}, tokenFile: {token}}}\nstateDir: {state}\nca: {{mode: istio}}\n{extra}",
            listen = self.listen,
            root = self.root_cert().display(),
            token = token.display(),
            state = cluster.path(&format!("state-{node}")).display(),
        );
        cluster.write(&format!("{node}.yaml"), &text)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- controlplane log ({}) -----\n{}----- end of controlplane log -----",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A node's `/config_dump` (admin port 15000 in its namespace).
pub fn config_dump(bed: &Testbed, node: usize) -> serde_json::Value {
    let text = bed.run_in(
        Place::Node(node),
        &["curl", "-s", "http://127.0.0.1:15000/config_dump"],
    );
    serde_json::from_str(&text).expect("config dump is JSON")
}

/// Whether every workload in a dump came from the control plane.
pub fn all_workloads_from_xds(dump: &serde_json::Value) -> bool {
    dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|w| w["origin"]["source"] == "xds")
}
