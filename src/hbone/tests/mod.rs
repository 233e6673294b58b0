//! Loopback tests of the HBONE server, pool and stream with real TLS: a test world of one
//! HBONE server (recording what reached the caller), upstream apps, and dial functions.

mod hostile;
mod pool_expiry_tests;
mod pool_open_tests;
mod pool_tests;
mod server_tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use super::server::accept_and_serve;
use super::testing::TestPki;
use super::*;
use crate::proxy::copy::copy_tcp_h2;

pub(super) const CLIENT_ID: &str = "spiffe://cluster.local/ns/apps/sa/client";
pub(super) const SERVER_ID: &str = "spiffe://cluster.local/ns/apps/sa/server";

/// Each CONNECT the caller was handed: the client's identity and the authority.
pub(super) type Seen = Arc<Mutex<Vec<(Option<crate::identity::SpiffeId>, Authority)>>>;
pub(super) type OnConnect = Arc<dyn Fn(IncomingConnect) + Send + Sync>;
pub(super) type Dial =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<TlsStream<TcpStream>, HboneError>> + Send>;

/// An HBONE server on 127.0.0.1 that records what it saw.
pub(super) struct World {
    pub pki: Arc<TestPki>,
    pub addr: SocketAddr,
    /// TCP connections the server accepted.
    pub accepted: Arc<AtomicUsize>,
    /// `serve_connection` outcomes, as text, in completion order.
    pub served: Arc<Mutex<Vec<Result<(), String>>>>,
    /// Calls of `on_connect`.
    pub connects: Arc<AtomicUsize>,
    pub drain: watch::Sender<bool>,
    /// The server's shared budgets and limit counters.
    pub budget: Arc<ServerBudget>,
    task: JoinHandle<()>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl World {
    pub async fn start(settings: H2Settings, on_connect: OnConnect) -> World {
        let limits = Limits {
            h2: settings,
            ..Limits::server()
        };
        World::start_with(limits, on_connect).await
    }

    pub async fn start_with(limits: Limits, on_connect: OnConnect) -> World {
        let budget = ServerBudget::new(limits);
        let pki = Arc::new(TestPki::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(SERVER_ID));
        let accepted = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let connects = Arc::new(AtomicUsize::new(0));
        let (drain, drain_rx) = watch::channel(false);
        let task = {
            let budget = budget.clone();
            let (accepted, served, connects) = (accepted.clone(), served.clone(), connects.clone());
            tokio::spawn(async move {
                while let Ok((tcp, peer_addr)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let info = ConnectionInfo {
                        peer_addr,
                        local_addr: addr,
                    };
                    let (acceptor, budget, drain_rx) =
                        (acceptor.clone(), budget.clone(), drain_rx.clone());
                    let (served, connects, on_connect) =
                        (served.clone(), connects.clone(), on_connect.clone());
                    tokio::spawn(async move {
                        let callback = move |incoming: IncomingConnect| {
                            connects.fetch_add(1, Ordering::SeqCst);
                            on_connect(incoming);
                        };
                        let result =
                            accept_and_serve(tcp, &acceptor, info, &budget, drain_rx, callback)
                                .await;
                        served
                            .lock()
                            .expect("served")
                            .push(result.map_err(|e| e.to_string()));
                    });
                }
            })
        };
        World {
            pki,
            addr,
            accepted,
            served,
            connects,
            drain,
            budget,
            task,
        }
    }

    pub fn key(&self) -> PoolKey {
        PoolKey::new(
            CLIENT_ID.parse().expect("client id"),
            vec![SERVER_ID.parse().expect("server id")],
            self.addr,
            None,
        )
    }

    /// A dial function to this server with an HBONE client certificate.
    pub fn dial(&self) -> Dial {
        dial_to(self.addr, self.pki.client_config(CLIENT_ID))
    }

    /// A dial function that counts its calls and takes `delay` before connecting.
    pub fn counted_dial(&self, calls: Arc<AtomicUsize>, delay: Duration) -> Dial {
        let dial = self.dial();
        Box::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                dial().await
            })
        })
    }
}

pub(super) fn dial_to(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Dial {
    Box::new(move || {
        Box::pin(async move {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| HboneError::Dial { peer: addr, source })?;
            tcp.set_nodelay(true)
                .map_err(|source| HboneError::Dial { peer: addr, source })?;
            tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|source| HboneError::Tls { peer: addr, source })
        })
    })
}

/// How many streams each server-side connection (by client address) carried at once, at most.
#[derive(Default)]
pub(super) struct Concurrency {
    current: Mutex<HashMap<SocketAddr, (usize, usize)>>,
}

impl Concurrency {
    fn enter(&self, peer: SocketAddr) {
        let mut map = self.current.lock().expect("concurrency");
        let (now, max) = map.entry(peer).or_default();
        *now += 1;
        *max = (*max).max(*now);
    }

    fn leave(&self, peer: SocketAddr) {
        let mut map = self.current.lock().expect("concurrency");
        if let Some((now, _)) = map.get_mut(&peer) {
            *now -= 1;
        }
    }

    /// The busiest connection's peak and the number of connections seen.
    pub fn peak(&self) -> (usize, usize) {
        let map = self.current.lock().expect("concurrency");
        (
            map.values().map(|(_, max)| *max).max().unwrap_or(0),
            map.len(),
        )
    }
}

/// What an inbound proxy does on the happy path: connect to the authority, then accept and copy.
/// Records each CONNECT's identity and authority.
pub(super) fn forward(seen: Seen, concurrency: Arc<Concurrency>) -> OnConnect {
    Arc::new(move |incoming: IncomingConnect| {
        seen.lock()
            .expect("seen")
            .push((incoming.peer_identity.clone(), incoming.authority.clone()));
        let concurrency = concurrency.clone();
        tokio::spawn(async move {
            let Authority::Addr(target) = incoming.authority else {
                incoming.refuse(Refusal::Unavailable(
                    "hostnames are not resolved here".into(),
                ));
                return;
            };
            let upstream = match TcpStream::connect(target).await {
                Ok(upstream) => upstream,
                Err(e) => {
                    incoming.refuse(Refusal::Unavailable(e.to_string()));
                    return;
                }
            };
            let peer = incoming.peer_addr;
            concurrency.enter(peer);
            if let Ok(stream) = incoming.accept() {
                let _ = copy_tcp_h2(upstream, stream).await;
            }
            concurrency.leave(peer);
        });
    })
}

/// An upstream app that echoes every connection until EOF, then half-closes.
pub(super) struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start(bind: &str) -> Echo {
        let listener = TcpListener::bind(bind).await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut read, mut write) = tcp.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        Echo {
            addr,
            accepted,
            task,
        }
    }
}

/// Deterministic pseudo-random bytes, so a shifted or dropped chunk cannot go unnoticed.
pub(super) fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Writes `data` then half-closes, while reading everything back; returns what came back.
pub(super) async fn round_trip(stream: H2Stream, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        write.write_all(&data).await?;
        write.shutdown().await?;
        Ok::<_, std::io::Error>(write)
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await?;
    writer.await.map_err(std::io::Error::other)??;
    Ok(back)
}

/// Waits up to `limit` for `done` to hold.
pub(super) async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

pub(super) fn small_pool() -> Pool {
    Pool::new(PoolSettings::default())
}

// HARDENING C3
#[test]
fn hosts_that_are_addresses_to_a_resolver_are_told_apart() {
    // Found by the hbone_authority fuzz target: `10.0.0.0x1` passed the all-digits rule.
    for host in [
        "127.1",
        "2130706433",
        "10.0.0.0x1",
        "0177.1",
        "localhost",
        "LocalHost",
        "app.localhost",
    ] {
        assert!(crate::hbone::is_address_in_disguise(host), "{host}");
    }
    for host in ["reviews.default.svc.cluster.local", "a1.example", "x-1"] {
        assert!(!crate::hbone::is_address_in_disguise(host), "{host}");
    }
}

#[test]
fn authorities_parse_like_the_server_must() {
    let cases: &[(&str, Option<Authority>)] = &[
        (
            "10.1.2.3:8080",
            Some(Authority::Addr("10.1.2.3:8080".parse().unwrap())),
        ),
        (
            "[fd00::3]:8080",
            Some(Authority::Addr("[fd00::3]:8080".parse().unwrap())),
        ),
        (
            "reviews.default.svc.cluster.local:9080",
            Some(Authority::Host(
                "reviews.default.svc.cluster.local".into(),
                9080,
            )),
        ),
        ("Reviews:80", Some(Authority::Host("reviews".into(), 80))),
        ("reviews", None),
        ("reviews:", None),
        ("reviews:http", None),
        ("reviews:0", None),
        (":80", None),
        ("fd00::3:8080", None),
        ("[fd00::3]", None),
        ("[fd00::zz]:80", None),
        ("bad host:80", None),
        ("a..b:80", None),
        ("10.1.2.3:70000", None),
    ];
    for (text, want) in cases {
        let got = Authority::parse(text).ok();
        assert_eq!(&got, want, "parsing {text:?}");
    }
}
