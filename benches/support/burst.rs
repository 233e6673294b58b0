//! Memory after a burst (issue 16, item 5): the daemons' RSS when idle, while a burst of
//! tunneled connections is held open, and second by second after it ends, to see whether the
//! memory comes back. Also the daemons' CPU time and RSS from /proc. Knows nothing about
//! reporting.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections being opened at once during the burst.
const OPENING_AT_ONCE: usize = 64;

/// RSS in MiB of both daemons (node 1, node 2) at each moment of a burst.
#[derive(Debug, Clone)]
pub struct Burst {
    pub idle: [f64; 2],
    pub held: [f64; 2],
    /// Seconds after the burst's connections were closed, and both RSS then.
    pub after: Vec<(f64, [f64; 2])>,
}

impl Burst {
    /// The larger of the two daemons' RSS at the end against its idle RSS.
    pub fn end_over_idle(&self) -> f64 {
        let last = self.after.last().map_or(self.held, |(_, rss)| *rss);
        (0..2).map(|i| last[i] / self.idle[i]).fold(0.0, f64::max)
    }

    /// Seconds until both daemons were within `factor` of their idle RSS (None: never).
    pub fn seconds_until_within(&self, factor: f64) -> Option<f64> {
        self.after
            .iter()
            .find(|(_, rss)| (0..2).all(|i| rss[i] <= self.idle[i] * factor))
            .map(|(seconds, _)| *seconds)
    }

    /// KiB per held connection of each daemon.
    pub fn per_connection_kib(&self, count: usize) -> [f64; 2] {
        [0, 1].map(|i| (self.held[i] - self.idle[i]) * 1024.0 / count as f64)
    }
}

/// Opens `count` connections with `connect` (an app's socket to the echo server `target`; each
/// proves its tunnel with one byte echoed), holds them for a second, closes them all, then
/// samples RSS every second for `settle`.
pub async fn run<F>(
    connect: impl Fn() -> F,
    target: SocketAddr,
    count: usize,
    pids: [u32; 2],
    settle: Duration,
) -> Burst
where
    F: Future<Output = std::io::Result<TcpStream>>,
{
    let rss = || pids.map(|pid| rss_kib(pid) / 1024.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss();
    let held: Vec<_> = futures::stream::iter(0..count)
        .map(|_| {
            let connecting = connect();
            async move {
                let mut s = connecting
                    .await
                    .unwrap_or_else(|e| panic!("burst connect to {target}: {e}"));
                s.write_all(b"b").await.expect("burst write");
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte).await.expect("burst echo");
                s
            }
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held_rss = rss();
    drop(held);
    let closed = Instant::now();
    let mut after = Vec::new();
    while closed.elapsed() < settle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after.push((closed.elapsed().as_secs_f64().round(), rss()));
    }
    Burst {
        idle,
        held: held_rss,
        after,
    }
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |field: usize| fields.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(14).unwrap_or(0) + ticks(15).unwrap_or(0)) as f64 / hz
}
