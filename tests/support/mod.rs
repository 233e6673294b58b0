//! Running the real `ztund` binary inside the testbed: a shared CA, per-node config and mesh
//! files in a temporary directory, daemons started in node namespaces and stopped on drop, and
//! their logs for assertions.
#![allow(dead_code)]

pub mod controlplane;
pub mod pods;
pub mod sniffer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testbed::{ChildGuard, Place, Testbed};

/// Field `number` (counted as in proc(5), from 1) of a `/proc/.../stat` file, if it is there
/// and numeric. The command name (field 2) may hold spaces; the fields after it start past its
/// last ')'.
pub fn proc_stat_field(path: &Path, number: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name
        .split_whitespace()
        .nth(number.checked_sub(3)?)?
        .parse()
        .ok()
}

/// The `ztund` binary under test.
pub fn ztund_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ztund")
}

/// A working directory with a CA that every node of one test shares.
pub struct Cluster {
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new(ztund_bin())
            .args(["ca", "init", "--dir"])
            .arg(dir.path().join("ca"))
            .status()
            .expect("running ztund ca init");
        assert!(status.success(), "ztund ca init failed");
        Cluster { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` inside the working directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }

    /// Writes a node config (`extra` is appended YAML) pointing at `mesh_file`.
    pub fn node_config(&self, node: &str, mesh_file: &str, extra: &str) -> PathBuf {
        let ca = self.path("ca");
        let text = format!(
            "node: {node}\nmeshFile: {mesh}\nstateDir: {state}\nca: {{mode: builtin, dir: {ca}}}\nwatchInterval: 200ms\n{extra}",
            mesh = self.path(mesh_file).display(),
            state = self.path(&format!("state-{node}")).display(),
            ca = ca.display(),
        );
        self.write(&format!("{node}.yaml"), &text)
    }

    /// Starts `ztund run` inside node `n`'s namespace, logging JSON to a file, and waits until
    /// its readiness endpoint answers 200.
    pub async fn start(&self, bed: &Testbed, n: usize, config: &Path) -> Daemon {
        let daemon = self.spawn(bed, n, config);
        daemon.wait_ready(bed).await;
        daemon
    }

    /// Starts `ztund run` inside node `n`'s namespace without waiting for readiness.
    pub fn spawn(&self, bed: &Testbed, n: usize, config: &Path) -> Daemon {
        self.spawn_with(bed, n, config, |_| {})
    }

    /// [`Cluster::spawn`], with `adjust` applied to the command first (limits, environment).
    pub fn spawn_with(
        &self,
        bed: &Testbed,
        n: usize,
        config: &Path,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        // A restarted daemon gets a fresh log; the earlier one stays for the failure message.
        let log = (0..)
            .map(|run| match run {
                0 => self.path(&format!("node{n}-{}.log", bed.prefix())),
                run => self.path(&format!("node{n}-{}-{run}.log", bed.prefix())),
            })
            .find(|path| !path.exists())
            .expect("a free log name");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(ztund_bin());
        command
            .args(["--log-json", "run", "--config"])
            .arg(config)
            .env("ZTUND_LOG", "info,access=debug")
            .stdout(Stdio::null())
            .stderr(log_file);
        adjust(&mut command);
        let child = bed.spawn_in(Place::Node(n), command);
        Daemon {
            child,
            log,
            node: n,
        }
    }
}

/// A running ztund; killed when dropped.
pub struct Daemon {
    pub child: ChildGuard,
    pub log: PathBuf,
    pub node: usize,
}

/// A failing test shows what every daemon it ran said: a race between two of them is read from
/// both logs, and a rare failure may not come back for another look.
impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- node{} log ({}) -----\n{}----- end of node{} log -----",
                self.node,
                self.log.display(),
                self.log_text(),
                self.node
            );
        }
    }
}

impl Daemon {
    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until a log line contains all of `needles`.
    pub async fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "node{} log has no line with {needles:?}:\n{text}",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line containing all of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Open file descriptors of the daemon process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// The status code of the readiness endpoint (`/healthz/ready` on 127.0.0.1:15021 in the
    /// node's namespace), or `None` while nothing answers there.
    pub async fn readiness_code(&self, bed: &Testbed) -> Option<u16> {
        readiness_code(&bed.app_sockets(Place::Node(self.node))).await
    }

    /// Waits (bounded) until the readiness endpoint answers 200.
    pub async fn wait_ready(&self, bed: &Testbed) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.readiness_code(bed).await == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ztund on node{} did not become ready:\n{}",
                self.node,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or fails the test after `timeout` naming
/// `what` and the last state `check` described.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(state) => assert!(
                Instant::now() < deadline,
                "{what}: not true after {timeout:?}; last state:\n{state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A SOCKS5 CONNECT from `place` through the local ztund (127.0.0.1:15080) to `target`.
/// Returns the stream after a success reply, or the reply code.
pub async fn socks5_connect(
    bed: &Testbed,
    place: Place,
    target: SocketAddr,
) -> Result<tokio::net::TcpStream, u8> {
    let proxy: SocketAddr = "127.0.0.1:15080".parse().expect("addr");
    let mut stream = bed
        .app_sockets(place)
        .connect(proxy, None)
        .await
        .expect("connecting to the SOCKS5 listener");
    stream.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.expect("method choice");
    assert_eq!(choice, [5, 0]);
    let mut request = vec![5, 1, 0];
    match target {
        SocketAddr::V4(v4) => {
            request.push(1);
            request.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            request.push(4);
            request.extend_from_slice(&v6.ip().octets());
        }
    }
    request.extend_from_slice(&target.port().to_be_bytes());
    stream.write_all(&request).await.expect("request");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.expect("reply");
    if reply[1] == 0 {
        Ok(stream)
    } else {
        Err(reply[1])
    }
}

/// The status code of `/healthz/ready` on 127.0.0.1:15021 where `sockets` connect from, or
/// `None` while nothing answers there.
pub async fn readiness_code(sockets: &ztund::net::SocketFactory) -> Option<u16> {
    let addr: SocketAddr = "127.0.0.1:15021".parse().expect("addr");
    let mut s = sockets.connect(addr, None).await.ok()?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}
