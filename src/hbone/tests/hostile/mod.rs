//! The HBONE server against a hostile client that writes HTTP/2 frames by hand over mutual TLS
//! with a valid client certificate (HARDENING.md §1 and §3): one test per row, each asserting
//! the row's outcome, that nothing reached the app (a counting listener), and, where it means
//! something, that the server's tasks are back to their baseline.

mod budget_rows;
mod connect_rows;
mod h2_rows;
mod pool_rows;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use super::*;
use crate::hbone::raw_client::{self, RawClient};

pub(super) const OTHER_ID: &str = "spiffe://cluster.local/ns/apps/sa/other";
pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) type Raw = RawClient<TlsStream<TcpStream>>;

/// What an app does with each connection it accepts.
#[derive(Clone, Copy)]
pub(super) enum Behaviour {
    /// Echo until EOF, then half-close.
    Echo,
    /// Write as fast as the connection takes, counting the bytes.
    Chatty,
    /// Hold the connection open and never read from it.
    Deaf,
}

/// An upstream app that counts the connections that reached it.
pub(super) struct App {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Bytes a `Chatty` app managed to write.
    pub written: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start(behaviour: Behaviour) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicUsize::new(0));
        let (counter, written_counter) = (accepted.clone(), written.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_app(tcp, behaviour, written_counter.clone()));
            }
        });
        App {
            addr,
            accepted,
            written,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve_app(mut tcp: TcpStream, behaviour: Behaviour, written: Arc<AtomicUsize>) {
    match behaviour {
        Behaviour::Echo => {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }
        Behaviour::Chatty => {
            let chunk = vec![7u8; 64 * 1024];
            while tcp.write_all(&chunk).await.is_ok() {
                written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        }
        Behaviour::Deaf => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(tcp);
        }
    }
}

/// The caller an inbound proxy is: `delay` (its authorization) and the dial, both abandoned
/// when the client resets the stream first, then 200 and the copy.
pub(super) fn cancellable_forward(delay: Duration, dials: Arc<AtomicUsize>) -> OnConnect {
    Arc::new(move |mut incoming: IncomingConnect| {
        let dials = dials.clone();
        tokio::spawn(async move {
            let Authority::Addr(target) = incoming.authority else {
                incoming.refuse(Refusal::Unavailable("no hostnames here".into()));
                return;
            };
            let set_up = async {
                tokio::time::sleep(delay).await;
                dials.fetch_add(1, Ordering::SeqCst);
                TcpStream::connect(target).await
            };
            let upstream = match incoming.unless_cancelled(set_up).await {
                None => return,
                Some(Ok(upstream)) => upstream,
                Some(Err(e)) => {
                    incoming.refuse(Refusal::Unavailable(e.to_string()));
                    return;
                }
            };
            if let Ok(stream) = incoming.accept() {
                let _ = copy_tcp_h2(upstream, stream).await;
            }
        });
    })
}

/// Keeps every CONNECT unanswered (each holds its stream open) until the world ends.
pub(super) fn hold_unanswered() -> (OnConnect, Arc<Mutex<Vec<IncomingConnect>>>) {
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let on_connect: OnConnect = Arc::new(move |incoming| keep.lock().unwrap().push(incoming));
    (on_connect, held)
}

/// Accepts every CONNECT and then never reads the tunnel.
pub(super) fn accept_never_read() -> (OnConnect, Arc<Mutex<Vec<H2Stream>>>) {
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let on_connect: OnConnect = Arc::new(move |incoming: IncomingConnect| {
        if let Ok(stream) = incoming.accept() {
            keep.lock().unwrap().push(stream);
        }
    });
    (on_connect, held)
}

/// Refuses every CONNECT with `refusal` after `delay`.
pub(super) fn refuse_after(delay: Duration, refusal: Refusal) -> OnConnect {
    Arc::new(move |incoming: IncomingConnect| {
        let refusal = refusal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            incoming.refuse(refusal);
        });
    })
}

impl World {
    /// A raw client with `id`'s certificate, preface and SETTINGS sent.
    pub async fn raw_as(&self, id: &str, settings: &[(u16, u32)]) -> Raw {
        let tls = raw_client::tls_connect(self.addr, self.pki.client_config(id))
            .await
            .expect("TLS to the HBONE server");
        RawClient::start(tls, settings)
            .await
            .expect("HTTP/2 preface")
    }

    pub async fn raw(&self) -> Raw {
        self.raw_as(CLIENT_ID, &[]).await
    }

    /// Waits for every served connection to have ended, then for the tasks to settle.
    pub async fn all_served(&self, connections: usize) -> bool {
        eventually(WAIT, || self.served.lock().unwrap().len() >= connections).await
    }
}

/// Tasks alive on this runtime.
pub(super) fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits for the runtime's alive tasks to come back to `baseline` (or below).
pub(super) async fn tasks_back_to(baseline: usize) -> bool {
    eventually(WAIT, || alive_tasks() <= baseline).await
}
