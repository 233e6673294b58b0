//! The HBONE client: a pool of HTTP/2 connections, each carrying many CONNECT streams
//! (PROTOCOL.md §1.7). A connection is shared only by callers with an equal [`PoolKey`], holds
//! at most min(our limit, the peer's SETTINGS_MAX_CONCURRENT_STREAMS) streams, is dialled by one
//! caller at a time per key, and is closed when nobody used it for the idle timeout; a key keeps
//! only one idle connection that long, its spares close after a short grace. The caller's
//! dial function makes the socket and the TLS handshake (netns, identity checks); this module
//! knows nothing about either.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use h2::Reason;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

pub use super::pool_settings::{PoolKey, PoolSettings, PoolStats, SPARE_IDLE_TIMEOUT};

use super::dialled::{Dialled, connection_expiry};
use super::frames::FrameWatch;
use super::keepalive::keepalive;
use super::recv_window::ConnectionWindow;
use super::send_budget::{ConnectionLedger, SendBudget};
use super::{ALPN_H2, ConnectRequest, H2Stream, HboneError};
use crate::identity::SpiffeId;

/// The HBONE client pool. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    settings: PoolSettings,
    /// Bytes queued toward peers, shared with the node's HBONE server.
    send_budget: Arc<SendBudget>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    next_id: AtomicU64,
    dials: AtomicU64,
    dial_failures: AtomicU64,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
    streams_opened: AtomicU64,
    streams_refused: AtomicU64,
}

/// The connections of one key, and the lock that makes dials for it take turns.
#[derive(Debug, Default)]
struct KeyEntry {
    connections: Mutex<Vec<Arc<PooledConnection>>>,
    dialling: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct PooledConnection {
    send: SendRequest<Bytes>,
    state: Arc<ConnectionState>,
    ledger: Arc<ConnectionLedger>,
}

/// What the pool, the connection's task and the streams' leases share.
#[derive(Debug)]
struct ConnectionState {
    id: u64,
    peer: SocketAddr,
    /// The SPIFFE id the server proved in the TLS handshake (one of the key's `expected`).
    /// Shared, so each connection's access-log line takes it without copying the id.
    peer_identity: Option<Arc<SpiffeId>>,
    /// The earlier of the two certificates' expiries: a connection whose handshake proved an
    /// identity that is no longer valid must not carry new streams (HARDENING F4), though the
    /// streams already on it run to their end.
    not_after: Option<SystemTime>,
    /// Streams checked out; raised only under the key's lock.
    active: AtomicUsize,
    last_used: Mutex<Instant>,
    closed: AtomicBool,
}

/// One stream's slot on a pooled connection; freed when the stream's halves are dropped.
#[derive(Debug)]
pub(crate) struct StreamLease {
    state: Arc<ConnectionState>,
}

impl StreamLease {
    /// The identity the connection's server proved.
    pub(crate) fn peer_identity(&self) -> Option<&Arc<SpiffeId>> {
        self.state.peer_identity.as_ref()
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        // Touch before release, so an idle check never sees "no streams" with a stale time.
        *lock(&self.state.last_used) = Instant::now();
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How one attempt at opening a stream failed.
enum Attempt {
    /// The stream never reached the peer (connection going away, REFUSED_STREAM): try again.
    Retry(HboneError),
    Fail(HboneError),
}

const MAX_ATTEMPTS: usize = 3;

impl Pool {
    /// A pool with a send budget of its own, as large as the server's default.
    pub fn new(settings: PoolSettings) -> Self {
        Pool::sharing(settings, SendBudget::for_limits(&super::Limits::server()))
    }

    /// A pool whose streams count in `send_budget`, the node's budget of bytes queued toward
    /// peers ([`super::ServerBudget::send`]).
    pub fn sharing(settings: PoolSettings, send_budget: Arc<SendBudget>) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                settings,
                send_budget,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                dials: AtomicU64::new(0),
                dial_failures: AtomicU64::new(0),
                connections_opened: AtomicU64::new(0),
                connections_closed: AtomicU64::new(0),
                streams_opened: AtomicU64::new(0),
                streams_refused: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream to `request`'s authority over a connection for `key`, dialling
    /// one with `dial` (TCP + TLS, the server's identity already checked) if none has room.
    /// Any status other than 200 is [`HboneError::Status`].
    pub async fn open<D: Dialled>(
        &self,
        key: &PoolKey,
        dial: impl FnOnce() -> BoxFuture<'static, Result<D, HboneError>>,
        request: ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let mut dial = Some(dial);
        let entry = self.inner.entry(key);
        let mut attempt = 0;
        let mut last_error = None;
        loop {
            attempt += 1;
            let http_request = request.to_http()?;
            let (connection, lease) = match self.inner.checkout(&entry) {
                Some(found) => found,
                None => {
                    let _turn = entry.dialling.lock().await;
                    match self.inner.checkout(&entry) {
                        Some(found) => found,
                        None => {
                            let Some(dial) = dial.take() else {
                                return Err(last_error.unwrap_or(HboneError::StreamLimit {
                                    peer: key.destination,
                                }));
                            };
                            // Boxed: the dial's TLS and HTTP/2 handshake state would
                            // otherwise sit inline in every caller's task for the tunnel's
                            // whole life, though only the first stream per connection runs it.
                            Box::pin(self.connect(key, &entry, dial)).await?
                        }
                    }
                }
            };
            match self.send(&connection, lease, http_request, &request).await {
                Ok(stream) => {
                    self.inner.streams_opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(stream);
                }
                Err(Attempt::Retry(e)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(peer = %key.destination, "retrying HBONE CONNECT: {e}");
                    last_error = Some(e);
                }
                Err(Attempt::Retry(e) | Attempt::Fail(e)) => return Err(e),
            }
        }
    }

    /// Lets go of every connection a removed pod dialled: no new stream goes over them, and
    /// each closes once its last stream is done (the pod's drain cuts those). Returns how many
    /// connections were released.
    pub fn release_pod(&self, uid: &str) -> usize {
        let mut keys = lock(&self.inner.keys);
        let mut released = 0;
        keys.retain(|key, entry| {
            if key.pod.as_deref() != Some(uid) {
                return true;
            }
            released += lock(&entry.connections).len();
            false
        });
        released
    }

    /// Live HTTP/2 connections (pooled, or draining their last streams).
    pub fn connection_count(&self) -> usize {
        let stats = self.stats();
        stats
            .connections_opened
            .saturating_sub(stats.connections_closed) as usize
    }

    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        PoolStats {
            dials: inner.dials.load(Ordering::Relaxed),
            dial_failures: inner.dial_failures.load(Ordering::Relaxed),
            connections_opened: inner.connections_opened.load(Ordering::Relaxed),
            connections_closed: inner.connections_closed.load(Ordering::Relaxed),
            streams_opened: inner.streams_opened.load(Ordering::Relaxed),
            streams_refused: inner.streams_refused.load(Ordering::Relaxed),
        }
    }

    /// Dials, runs the HTTP/2 handshake, waits for the peer's SETTINGS (so its stream limit
    /// is known before anyone shares the connection), then pools it with one slot taken.
    async fn connect<D: Dialled>(
        &self,
        key: &PoolKey,
        entry: &Arc<KeyEntry>,
        dial: impl FnOnce() -> BoxFuture<'static, Result<D, HboneError>>,
    ) -> Result<(Arc<PooledConnection>, Arc<StreamLease>), HboneError> {
        let inner = &self.inner;
        let h2 = &inner.settings.h2;
        let peer = key.destination;
        inner.dials.fetch_add(1, Ordering::Relaxed);
        let (tls, local_not_after) = dial()
            .await
            .inspect_err(|_| {
                inner.dial_failures.fetch_add(1, Ordering::Relaxed);
            })?
            .into_parts();
        let alpn = tls.get_ref().1.alpn_protocol();
        if alpn != Some(ALPN_H2) {
            inner.dial_failures.fetch_add(1, Ordering::Relaxed);
            let alpn = alpn.map_or_else(
                || "none".to_string(),
                |p| String::from_utf8_lossy(p).into_owned(),
            );
            return Err(HboneError::Alpn { peer, alpn });
        }
        let peer_identity = crate::tls::peer_identity(tls.get_ref().1).map(Arc::new);
        let not_after = connection_expiry(local_not_after, tls.get_ref().1);
        let ledger = ConnectionLedger::new(Arc::clone(&inner.send_budget));
        let (send, mut conn) = h2
            .client_builder()
            .handshake::<_, Bytes>(FrameWatch::client(tls, Arc::clone(&ledger)))
            .await
            .map_err(|source| HboneError::H2 { peer, source })?;

        let state = Arc::new(ConnectionState {
            id: inner.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            peer_identity,
            not_after,
            active: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
        });
        let (settled_tx, settled_rx) = oneshot::channel();
        let keepalive = keepalive(
            conn.ping_pong(),
            Duration::ZERO,
            h2.keepalive_interval,
            h2.keepalive_timeout,
            Some(settled_tx),
        );
        inner.connections_opened.fetch_add(1, Ordering::Relaxed);
        let window =
            ConnectionWindow::new(h2.connection_window, h2.stream_window, Arc::clone(&ledger));
        tokio::spawn(drive(
            conn,
            window,
            keepalive,
            Arc::clone(&state),
            Arc::downgrade(inner),
            key.clone(),
        ));
        match tokio::time::timeout(h2.keepalive_timeout, settled_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_closed)) => {
                return Err(HboneError::H2 {
                    peer,
                    source: h2::Error::from(Reason::CONNECT_ERROR),
                });
            }
            Err(_) => {
                return Err(HboneError::Timeout {
                    peer,
                    what: "the HTTP/2 SETTINGS",
                    after: h2.keepalive_timeout,
                });
            }
        }

        let connection = Arc::new(PooledConnection {
            send,
            state,
            ledger,
        });
        if inner.limit(&connection) == 0 {
            return Err(HboneError::StreamLimit { peer });
        }
        connection.state.active.fetch_add(1, Ordering::AcqRel);
        let lease = Arc::new(StreamLease {
            state: Arc::clone(&connection.state),
        });
        lock(&entry.connections).push(Arc::clone(&connection));
        tracing::debug!(%peer, id = connection.state.id, "HBONE connection pooled");
        Ok((connection, lease))
    }

    /// Sends the CONNECT on `connection` and waits for the answer.
    async fn send(
        &self,
        connection: &PooledConnection,
        lease: Arc<StreamLease>,
        http_request: Request<()>,
        request: &ConnectRequest,
    ) -> Result<H2Stream, Attempt> {
        let peer = connection.state.peer;
        let mut sender = connection.send.clone();
        let (response, mut send_stream) = match sender.send_request(http_request, false) {
            Ok(sent) => sent,
            Err(source) => {
                // The connection is going away or gone: nothing was sent on it.
                connection.state.closed.store(true, Ordering::Release);
                return Err(Attempt::Retry(HboneError::H2 { peer, source }));
            }
        };
        let id = send_stream.stream_id().as_u32();
        let first = request.first_data();
        if !first.is_empty() {
            // Queued beyond any capacity yet granted: HTTP/2 asks for it and sends the frame
            // as the window allows. A retry on another connection sends the same bytes again.
            connection.ledger.queue(id, first.len());
            if let Err(source) = send_stream.send_data(first.clone(), false) {
                connection.ledger.discard(id);
                return Err(Attempt::Retry(HboneError::H2 { peer, source }));
            }
        }
        // On any failure below the stream is dropped unfinished: HTTP/2 resets it and drops
        // what it still holds of the first bytes.
        let response = match response.await {
            Ok(response) => response,
            Err(source) => {
                connection.ledger.discard(id);
                // The peer never processed it: refused, or above a graceful GOAWAY's last
                // stream id (RFC 9113 §6.8), so another connection may carry it.
                let going_away = source.is_go_away()
                    && source.is_remote()
                    && source.reason() == Some(Reason::NO_ERROR);
                if going_away {
                    connection.state.closed.store(true, Ordering::Release);
                }
                let refused = going_away || source.reason() == Some(Reason::REFUSED_STREAM);
                let error = HboneError::H2 { peer, source };
                return Err(if refused {
                    Attempt::Retry(error)
                } else {
                    Attempt::Fail(error)
                });
            }
        };
        if response.status() != StatusCode::OK {
            connection.ledger.discard(id);
            self.inner.streams_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Attempt::Fail(HboneError::Status {
                peer,
                authority: request.authority().to_string(),
                status: response.status(),
            }));
        }
        Ok(H2Stream::new(
            send_stream,
            response.into_body(),
            Arc::clone(&connection.ledger),
            Some(lease),
        ))
    }
}

impl PoolInner {
    fn entry(&self, key: &PoolKey) -> Arc<KeyEntry> {
        let mut keys = lock(&self.keys);
        // Looked up first: the key is cloned (its `expected` list allocated) only for a new one.
        if let Some(entry) = keys.get(key) {
            return Arc::clone(entry);
        }
        Arc::clone(keys.entry(key.clone()).or_default())
    }

    /// How many streams `connection` may carry.
    fn limit(&self, connection: &PooledConnection) -> usize {
        let ours = self.settings.max_streams_per_connection as usize;
        ours.min(connection.send.current_max_send_streams())
    }

    /// Takes a slot on the first usable connection with room, dropping dead ones on the way.
    fn checkout(&self, entry: &KeyEntry) -> Option<(Arc<PooledConnection>, Arc<StreamLease>)> {
        let mut connections = lock(&entry.connections);
        connections.retain(|c| c.is_usable());
        let connection = connections
            .iter()
            .find(|c| c.state.active.load(Ordering::Acquire) < self.limit(c))?;
        connection.state.active.fetch_add(1, Ordering::AcqRel);
        *lock(&connection.state.last_used) = Instant::now();
        let lease = Arc::new(StreamLease {
            state: Arc::clone(&connection.state),
        });
        Some((Arc::clone(connection), lease))
    }

    /// Drops the connection from its key if it has had no streams for the idle timeout, or for
    /// the spare timeout while the key has another connection. Returns whether it did.
    fn evict_if_idle(&self, key: &PoolKey, state: &ConnectionState) -> bool {
        let Some(entry) = lock(&self.keys).get(key).cloned() else {
            return true;
        };
        let mut connections = lock(&entry.connections);
        if state.active.load(Ordering::Acquire) > 0 {
            return false;
        }
        let idle_for = lock(&state.last_used).elapsed();
        // Checked under the key's lock, one connection at a time: of a key's idle connections
        // the last to look finds no other and stays.
        let spare = connections
            .iter()
            .any(|c| c.state.id != state.id && !c.state.closed.load(Ordering::Acquire));
        let evict = idle_for >= self.settings.idle_timeout
            || (spare && idle_for >= self.settings.spare_idle_timeout);
        if evict {
            connections.retain(|c| c.state.id != state.id);
        }
        evict
    }

    /// Forgets a closed connection, and its key once nothing else refers to it.
    fn remove(&self, key: &PoolKey, id: u64) {
        let mut keys = lock(&self.keys);
        let Some(entry) = keys.get(key) else {
            return;
        };
        let empty = {
            let mut connections = lock(&entry.connections);
            connections.retain(|c| c.state.id != id);
            connections.is_empty()
        };
        // Only the map holds the entry: no caller is waiting to dial or check out.
        if empty && Arc::strong_count(entry) == 1 {
            keys.remove(key);
        }
    }
}

impl PooledConnection {
    /// Not closed, both certificates still valid, and HTTP/2 still lets new streams open (no
    /// GOAWAY received).
    fn is_usable(&self) -> bool {
        if self.state.closed.load(Ordering::Acquire) {
            return false;
        }
        if self
            .state
            .not_after
            .is_some_and(|expiry| SystemTime::now() >= expiry)
        {
            tracing::debug!(peer = %self.state.peer, id = self.state.id, "a certificate of this HBONE connection expired; no new streams on it");
            self.state.closed.store(true, Ordering::Release);
            return false;
        }
        let mut probe = self.send.clone();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match probe.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                self.state.closed.store(true, Ordering::Release);
                false
            }
            // Only a pending stream of this very handle makes it wait; a fresh clone has none.
            Poll::Pending => true,
        }
    }
}

/// Runs one client connection: HTTP/2 I/O, the keepalive, and the idle timer. Ends when the
/// connection closes or a PING goes unanswered.
async fn drive<IO>(
    mut conn: h2::client::Connection<FrameWatch<tokio_rustls::client::TlsStream<IO>>, Bytes>,
    mut window: ConnectionWindow,
    keepalive: impl std::future::Future<Output = ()>,
    state: Arc<ConnectionState>,
    pool: Weak<PoolInner>,
    key: PoolKey,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = match pool.upgrade() {
        Some(inner) => (
            inner.settings.idle_timeout,
            inner.settings.spare_idle_timeout,
        ),
        None => return,
    };
    let idle = idle_watch(&state, &pool, &key, timeouts);
    tokio::pin!(keepalive, idle);
    let peer = state.peer;
    let mut evicted = false;
    loop {
        tokio::select! {
            result = poll_fn(|cx| {
                if let Some(target) = window.adjust() {
                    conn.set_target_window_size(target);
                }
                conn.poll_unpin(cx)
            }) => {
                if let Err(e) = result {
                    tracing::debug!(%peer, "HBONE connection ended: {e}");
                }
                break;
            }
            () = &mut keepalive => {
                tracing::warn!(%peer, "HBONE connection did not answer a PING; closing it");
                break;
            }
            // The pool has let go of it; HTTP/2 closes once the last stream is done.
            () = &mut idle, if !evicted => evicted = true,
        }
    }
    state.closed.store(true, Ordering::Release);
    if let Some(inner) = pool.upgrade() {
        inner.remove(&key, state.id);
        inner.connections_closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Completes once the connection has been idle long enough to leave the pool: the spare
/// timeout if its key has another connection by then, else the idle timeout.
async fn idle_watch(
    state: &ConnectionState,
    pool: &Weak<PoolInner>,
    key: &PoolKey,
    settings: (Duration, Duration),
) {
    let (idle_timeout, spare_idle_timeout) = settings;
    loop {
        let since = *lock(&state.last_used);
        let (spare_at, idle_at) = (since + spare_idle_timeout, since + idle_timeout);
        let wake = if Instant::now() < spare_at {
            spare_at.min(idle_at)
        } else {
            idle_at
        };
        tokio::time::sleep_until(wake.into()).await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        if inner.evict_if_idle(key, state) {
            tracing::debug!(peer = %state.peer, id = state.id, "closing idle HBONE connection");
            return;
        }
        if state.active.load(Ordering::Acquire) > 0 {
            // Busy: look again one spare timeout from now.
            *lock(&state.last_used) = Instant::now();
        }
    }
}

/// Locks a mutex; a panic elsewhere while holding it leaves plain data still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
