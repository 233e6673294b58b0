//! The load generators of the dataplane benchmark: bulk throughput, 1 KiB request/response at a
//! fixed rate and at the maximum rate, new connections per second, and many idle connections.
//! Each runs from node 1 either straight to the app on node 2 (`Path::Direct`) or through
//! ztund's SOCKS5 listener and HBONE (`Path::Ztund`). All are bounded in time and count.
//! Knows nothing about daemons or reporting.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztund::net::Netns;

use crate::world::enter_for_good;

/// How the client reaches the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Plain TCP from node 1 to the app on node 2: the physical limit.
    Direct,
    /// SOCKS5 into node 1's ztund, HBONE to node 2's ztund, TCP to the app.
    Ztund,
}

const SOCKS5: &str = "127.0.0.1:15080";
/// Each request and each answer of the request/response cases.
pub const MESSAGE: usize = 1024;

/// The SOCKS5 greeting and CONNECT request in one write: no authentication, IPv4 target.
fn socks5_request(target: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("bench targets are IPv4");
    };
    let mut request = vec![5, 1, 0, 5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    request
}

fn check_socks5_replies(replies: &[u8; 12]) -> std::io::Result<()> {
    if replies[..2] != [5, 0] || replies[3] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 refused: {replies:?}"
        )));
    }
    Ok(())
}

/// A connection to `target` along `path`, ready for the app's bytes.
pub async fn open(path: Path, target: SocketAddr) -> std::io::Result<TcpStream> {
    let addr = match path {
        Path::Direct => target,
        Path::Ztund => SOCKS5.parse().expect("SOCKS5 address"),
    };
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    if path == Path::Ztund {
        stream.write_all(&socks5_request(target)).await?;
        let mut replies = [0u8; 12];
        stream.read_exact(&mut replies).await?;
        check_socks5_replies(&replies)?;
    }
    Ok(stream)
}

/// The blocking twin of [`open`], for the latency clients (the calling thread is in node 1).
fn open_blocking(path: Path, target: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let addr = match path {
        Path::Direct => target,
        Path::Ztund => SOCKS5.parse().expect("SOCKS5 address"),
    };
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    if path == Path::Ztund {
        stream.write_all(&socks5_request(target))?;
        let mut replies = [0u8; 12];
        stream.read_exact(&mut replies)?;
        check_socks5_replies(&replies)?;
    }
    Ok(stream)
}

/// Bytes the sink counted over all streams, and the time from the first byte to the last count.
pub struct Moved {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Moved {
    pub fn gbit_per_second(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Writes to the sink on `streams` connections for `duration`.
pub async fn throughput(path: Path, sink: SocketAddr, streams: usize, duration: Duration) -> Moved {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut stream = open(path, sink).await.expect("connecting to the sink");
            let block = vec![0x5au8; 256 * 1024];
            let started = Instant::now();
            let mut written = 0u64;
            while started.elapsed() < duration {
                stream.write_all(&block).await.expect("writing to the sink");
                written += block.len() as u64;
            }
            stream.shutdown().await.expect("half-close");
            let counted = stream.read_u64().await.expect("sink count");
            assert_eq!(counted, written, "the sink counted other than was sent");
            (counted, started.elapsed())
        }));
    }
    let mut bytes = 0u64;
    let mut longest = Duration::ZERO;
    for task in tasks {
        let (counted, took) = task.await.expect("throughput stream");
        bytes += counted;
        longest = longest.max(took);
    }
    Moved {
        bytes,
        elapsed: longest,
    }
}

/// Request/response latencies (ns) and the rate achieved.
pub struct Latencies {
    pub nanos: Vec<u64>,
    pub per_second: f64,
    pub elapsed: Duration,
}

impl Latencies {
    /// The latency at quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&mut self, q: f64) -> f64 {
        if self.nanos.is_empty() {
            return f64::NAN;
        }
        self.nanos.sort_unstable();
        let i = ((self.nanos.len() - 1) as f64 * q).round() as usize;
        self.nanos[i] as f64 / 1e3
    }
}

/// One connection sending a 1 KiB request every `1/rate` s for `duration`; each latency runs
/// from the moment the request was due, so a stall counts against every request it delayed.
pub fn latency_at_rate(
    netns: Arc<Netns>,
    path: Path,
    echo: SocketAddr,
    rate: u32,
    duration: Duration,
) -> Latencies {
    std::thread::spawn(move || {
        enter_for_good(&netns);
        // Wake on time: the default 50 µs timer slack would show as latency.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
        let mut stream = open_blocking(path, echo).expect("connecting to the echo app");
        let interval = Duration::from_secs(1) / rate;
        let count = (duration.as_secs_f64() * rate as f64) as u32;
        let request = [0x42u8; MESSAGE];
        let mut answer = [0u8; MESSAGE];
        let mut nanos = Vec::with_capacity(count as usize);
        let started = Instant::now();
        for i in 0..count {
            let due = started + interval * i;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            stream.write_all(&request).expect("request");
            stream.read_exact(&mut answer).expect("answer");
            nanos.push(due.elapsed().as_nanos() as u64);
        }
        let elapsed = started.elapsed();
        Latencies {
            nanos,
            per_second: count as f64 / elapsed.as_secs_f64(),
            elapsed,
        }
    })
    .join()
    .expect("latency client")
}

/// `connections` clients, each sending the next 1 KiB request as soon as the last answer is in,
/// for `duration`.
pub fn latency_at_max_rate(
    netns: Arc<Netns>,
    path: Path,
    echo: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Latencies {
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let netns = netns.clone();
            std::thread::spawn(move || {
                enter_for_good(&netns);
                let mut stream = open_blocking(path, echo).expect("connecting to the echo app");
                let request = [0x42u8; MESSAGE];
                let mut answer = [0u8; MESSAGE];
                let mut nanos = Vec::new();
                let started = Instant::now();
                // Bounded in count as well as time.
                while started.elapsed() < duration && nanos.len() < 5_000_000 {
                    let sent = Instant::now();
                    stream.write_all(&request).expect("request");
                    stream.read_exact(&mut answer).expect("answer");
                    nanos.push(sent.elapsed().as_nanos() as u64);
                }
                (nanos, started.elapsed())
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut longest = Duration::ZERO;
    for client in clients {
        let (nanos, took) = client.join().expect("latency client");
        all.extend(nanos);
        longest = longest.max(took);
    }
    let per_second = all.len() as f64 / longest.as_secs_f64();
    Latencies {
        nanos: all,
        per_second,
        elapsed: longest,
    }
}

/// New connections per second (`concurrency` loops of connect, one byte each way, close) and
/// how many were made.
pub async fn connection_rate(
    path: Path,
    ping: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> (f64, u64) {
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..concurrency {
        loops.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < duration {
                let mut stream = open(path, ping).await.expect("connecting to the ping app");
                stream.write_all(b"?").await.expect("ping");
                let mut answer = [0u8; 2];
                let n = stream.read(&mut answer).await.expect("pong");
                assert_eq!(n, 1, "the ping app answers one byte");
                // The app closes first; wait for it so no connection outlives the count.
                let n = stream.read(&mut answer).await.unwrap_or(0);
                assert_eq!(n, 0, "the ping app closes after its byte");
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for task in loops {
        total += task.await.expect("connection loop");
    }
    (total as f64 / started.elapsed().as_secs_f64(), total)
}

/// Opens `count` connections through ztund to the echo app (each echoes one byte, so every hop
/// is established) and keeps them open until the returned value drops.
pub async fn open_idle(echo: SocketAddr, count: usize) -> Vec<TcpStream> {
    let per_task = count.div_ceil(32);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let n = per_task.min(count.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(n);
            for _ in 0..n {
                let mut stream = open(Path::Ztund, echo).await.expect("idle connection");
                stream.write_all(b"i").await.expect("idle ping");
                let mut back = [0u8; 1];
                stream.read_exact(&mut back).await.expect("idle echo");
                held.push(stream);
            }
            held
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await.expect("idle opener"));
    }
    all
}
