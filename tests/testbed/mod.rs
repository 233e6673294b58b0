//! The test world: `ztund::topology` (nodes and pods from network namespaces, shared with
//! `ztund demo`) behind a `Testbed` whose setup calls fail the test with the reason instead of
//! returning errors, plus test-only assertions. Use it from a test file with `mod testbed;`.
#![allow(dead_code)]

pub mod bpf;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztund::net::{Netns, SocketFactory};
pub use ztund::topology::*;

/// A [`Topology`] for one test; everything is removed when it drops, also on panic. Pods may
/// get sandboxes ([`Testbed::sandbox_pods`]): then their apps' sockets belong to the pod's
/// cgroup, as the eBPF capture backend needs.
pub struct Testbed(Topology, Mutex<HashMap<(usize, usize), Arc<bpf::Sandbox>>>);

impl Drop for Testbed {
    fn drop(&mut self) {
        // The sandboxes' processes before the namespaces they run in.
        self.1.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Deref for Testbed {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.0
    }
}

impl Testbed {
    /// Builds `nodes` nodes with `pods_per_node` pods each, with a name prefix unique to this
    /// test. Panics (failing the test) when the namespaces cannot be made.
    pub fn new(nodes: usize, pods_per_node: usize) -> Testbed {
        Testbed(
            Topology::new(nodes, pods_per_node).unwrap_or_else(|e| panic!("testbed: {e}")),
            Mutex::default(),
        )
    }

    /// [`Testbed::new`] with namespaces named `<prefix>-…` (a test file's own prefix, so
    /// sessions running tests side by side never collide).
    pub fn with_prefix(prefix: &str, nodes: usize, pods_per_node: usize) -> Testbed {
        Testbed(
            Topology::with_prefix(prefix, nodes, pods_per_node)
                .unwrap_or_else(|e| panic!("testbed: {e}")),
            Mutex::default(),
        )
    }

    /// Gives every pod a sandbox process in its netns and a cgroup of its own (`bpf2-<netns>`),
    /// as kubelet does: the eBPF backend finds the pod's cgroup from it, and the pod's apps
    /// ([`Testbed::connect_from`]) make their sockets through it.
    pub fn sandbox_pods(&self) {
        let mut sandboxes = self.1.lock().unwrap_or_else(|e| e.into_inner());
        for n in 1..=self.nodes() {
            for p in 1..=self.pods_per_node() {
                let place = Place::Pod(n, p);
                let sandbox = bpf::Sandbox::start(&self.netns(place), &self.netns_name(place));
                sandboxes.insert((n, p), Arc::new(sandbox));
            }
        }
    }

    /// Ends pod (n, p)'s sandbox: the pod then has no process in its netns (its cgroup
    /// cannot be found from it).
    pub fn remove_sandbox(&self, n: usize, p: usize) {
        let mut sandboxes = self.1.lock().unwrap_or_else(|e| e.into_inner());
        sandboxes.remove(&(n, p));
    }

    /// Pod (n, p)'s sandbox, if it has one.
    pub fn sandbox(&self, n: usize, p: usize) -> Option<Arc<bpf::Sandbox>> {
        let sandboxes = self.1.lock().unwrap_or_else(|e| e.into_inner());
        sandboxes.get(&(n, p)).cloned()
    }

    /// Connects from inside pod `(n, p)` as an application would (no mark); with a sandbox,
    /// from a socket of the pod's cgroup.
    pub async fn connect_from(
        &self,
        n: usize,
        p: usize,
        dst: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let Some(sandbox) = self.sandbox(n, p) else {
            return self.0.connect_from(n, p, dst).await;
        };
        let socket = sandbox.socket(dst.is_ipv6())?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(dst).await
    }

    /// The topology underneath, for code shared with `ztund demo`.
    pub fn topology(&self) -> &Topology {
        &self.0
    }

    /// The open namespace of a place.
    pub fn netns(&self, place: Place) -> Arc<Netns> {
        self.0
            .netns(place)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// Runs a command inside a place and returns its stdout; panics with stderr on failure.
    pub fn run_in(&self, place: Place, args: &[&str]) -> String {
        self.0
            .run_in(place, args)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// Runs a command inside a place; `Err(reason with stderr)` on failure.
    pub fn try_run_in(&self, place: Place, args: &[&str]) -> Result<String, String> {
        self.0.run_in(place, args).map_err(|e| e.to_string())
    }

    /// Starts a process inside a place; it is killed when the guard drops.
    pub fn spawn_in(&self, place: Place, command: Command) -> ChildGuard {
        self.0
            .spawn_in(place, command)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// A socket factory for a place: no mark, as an application's sockets have none.
    pub fn app_sockets(&self, place: Place) -> SocketFactory {
        self.0
            .app_sockets(place)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// An echo server on `pod_ip(n, p):port` inside the pod (a tokio task, stopped on drop).
    pub fn echo_server(&self, n: usize, p: usize, port: u16) -> SocketAddr {
        self.0
            .echo_server(n, p, port)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// A server that writes the client's address as seen by the app (`ip:port\n`), then closes.
    pub fn whoami_server(&self, n: usize, p: usize, port: u16) -> SocketAddr {
        self.0
            .whoami_server(n, p, port)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// Serves `addr` inside `place` with `handle` per connection (a task stopped on drop).
    pub fn serve(&self, place: Place, addr: SocketAddr, handle: Handler) -> SocketAddr {
        self.0
            .serve(place, addr, handle)
            .unwrap_or_else(|e| panic!("testbed: {e}"))
    }

    /// Sends `len` patterned bytes through an echo connection and checks they all come back
    /// intact and in order.
    pub async fn assert_echo(stream: TcpStream, len: usize) {
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (mut reader, mut writer) = stream.into_split();
        let sent = pattern.clone();
        let writing = tokio::spawn(async move {
            writer
                .write_all(&sent)
                .await
                .expect("writing to the echo server");
            writer.shutdown().await.expect("closing the write side");
        });
        let mut back = Vec::with_capacity(len);
        reader
            .read_to_end(&mut back)
            .await
            .expect("reading the echo");
        writing.await.expect("writer task");
        assert_eq!(
            back.len(),
            len,
            "echo returned {} of {len} bytes",
            back.len()
        );
        assert!(back == pattern, "echoed bytes differ from what was sent");
    }
}
