//! One certificate per identity, fetched on demand from an `IdentitySource` or prefetched for
//! the identities of the node's workloads (`sync_local`), renewed in the background at half its
//! life (retrying with backoff, keeping the old certificate while it is valid). A failed first
//! issue holds further attempts for that identity off with the same backoff: callers get the
//! last error at once instead of each sending the CA another request. Knows nothing about TLS:
//! callers hold `Arc<WorkloadCertificate>`s, and a renewal only swaps what the next `fetch`
//! returns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{IdentityError, IdentitySource, SpiffeId, WorkloadCertificate};

/// Never renew more often than this, whatever a certificate's dates say.
const MIN_RENEWAL_GAP: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(150);

/// The node's certificates, one per workload identity.
#[derive(Debug)]
pub struct CertManager {
    source: Arc<dyn IdentitySource>,
    slots: Mutex<HashMap<SpiffeId, Arc<Slot>>>,
    /// Bumped whenever any identity gets a new certificate.
    changes: Arc<watch::Sender<u64>>,
}

/// One identity's certificate and the task that keeps it fresh.
#[derive(Debug)]
struct Slot {
    current: ArcSwapOption<WorkloadCertificate>,
    /// Serialises first issuance so concurrent fetches of one identity issue once.
    issuing: tokio::sync::Mutex<()>,
    /// The last failed first issue; no other is tried before its `retry_at`.
    failure: Mutex<Option<Failure>>,
    /// Issues (if need be, with backoff) and then renews; aborted by `forget`.
    renewal: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Failure {
    retry_at: Instant,
    /// The backoff after the next failure.
    next_gap: Duration,
    error: String,
}

impl Slot {
    /// How long until the next first issue may be tried, if a failure holds it off.
    fn backoff(&self) -> Option<(Duration, String)> {
        let failure = lock(&self.failure);
        let failure = failure.as_ref()?;
        let wait = failure.retry_at.checked_duration_since(Instant::now())?;
        Some((wait, failure.error.clone()))
    }
}

impl CertManager {
    /// A manager issuing from `source`; certificates are fetched lazily.
    pub fn new(source: Arc<dyn IdentitySource>) -> Arc<CertManager> {
        let (changes, _) = watch::channel(0);
        Arc::new(CertManager {
            source,
            slots: Mutex::new(HashMap::new()),
            changes: Arc::new(changes),
        })
    }

    /// The current certificate for `id`, issuing one (once, however many callers wait) if there
    /// is none or the one held has expired. While an earlier failure's backoff runs, fails at
    /// once with `IdentityError::BackingOff` (naming that failure).
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let slot = self.slot(id);
        if let Some(cert) = valid(&slot) {
            return Ok(cert);
        }
        let cert = first_issue(id, &slot, &*self.source, &self.changes).await?;
        self.start_keeper(id, &slot);
        Ok(cert)
    }

    /// Makes the held identities those of the workloads on this node: starts issuing (in the
    /// background, retried with backoff until it succeeds) for each wanted identity not held,
    /// and forgets every held identity that is not wanted (its last local workload left).
    /// Call it with the whole set after each change; needs a Tokio runtime.
    pub fn sync_local(&self, wanted: impl IntoIterator<Item = SpiffeId>) {
        let wanted: HashSet<SpiffeId> = wanted.into_iter().collect();
        let departed: Vec<SpiffeId> = self
            .lock_slots()
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in &departed {
            tracing::debug!(%id, "no local workload has this identity any more; dropping its certificate");
            self.forget(id);
        }
        for id in &wanted {
            let slot = self.slot(id);
            self.start_keeper(id, &slot);
        }
    }

    /// Those of `wanted` that have no valid certificate yet (for readiness).
    pub fn pending<'a>(&self, wanted: impl IntoIterator<Item = &'a SpiffeId>) -> Vec<SpiffeId> {
        let slots = self.lock_slots();
        wanted
            .into_iter()
            .filter(|id| slots.get(*id).and_then(|slot| valid(slot)).is_none())
            .cloned()
            .collect()
    }

    /// Each held certificate's identity and expiry, sorted by identity (for metrics).
    pub fn expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        self.snapshot()
            .iter()
            .map(|cert| (cert.id.clone(), cert.not_after))
            .collect()
    }

    /// Drops `id`'s certificate and stops renewing it; connections holding it are unaffected.
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(slot) = self.lock_slots().remove(id) {
            stop_renewal(&slot);
        }
    }

    /// Every certificate held now, for the admin dump.
    pub fn snapshot(&self) -> Vec<Arc<WorkloadCertificate>> {
        let mut certs: Vec<_> = self
            .lock_slots()
            .values()
            .filter_map(|slot| slot.current.load_full())
            .collect();
        certs.sort_by(|a, b| a.id.cmp(&b.id));
        certs
    }

    /// A receiver whose value changes whenever any certificate is issued or renewed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many certificates have been issued or renewed so far.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    fn lock_slots(&self) -> MutexGuard<'_, HashMap<SpiffeId, Arc<Slot>>> {
        lock(&self.slots)
    }

    fn slot(&self, id: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.lock_slots();
        // The hot path (a cached identity) must not allocate a key.
        if let Some(slot) = slots.get(id) {
            return slot.clone();
        }
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    current: ArcSwapOption::empty(),
                    issuing: tokio::sync::Mutex::new(()),
                    failure: Mutex::new(None),
                    renewal: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Starts the task keeping `id` issued and renewed unless one runs or `id` was forgotten
    /// meanwhile (checked under the map lock, so `forget` cannot miss a task).
    fn start_keeper(&self, id: &SpiffeId, slot: &Arc<Slot>) {
        let slots = self.lock_slots();
        if !slots.get(id).is_some_and(|held| Arc::ptr_eq(held, slot)) {
            return;
        }
        let mut renewal = lock(&slot.renewal);
        if renewal.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        *renewal = Some(tokio::spawn(keep(
            id.clone(),
            Arc::downgrade(slot),
            self.source.clone(),
            self.changes.clone(),
        )));
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for slot in self.lock_slots().values() {
            stop_renewal(slot);
        }
    }
}

/// A panic while a slot's lock is held cannot leave its value half-updated: keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn stop_renewal(slot: &Slot) {
    let task = lock(&slot.renewal).take();
    if let Some(task) = task {
        task.abort();
    }
}

fn valid(slot: &Slot) -> Option<Arc<WorkloadCertificate>> {
    slot.current
        .load_full()
        .filter(|cert| cert.not_after > SystemTime::now())
}

/// Issues `id` once, unless another caller does so meanwhile or a failure's backoff runs; a
/// failure starts (or doubles) that backoff.
async fn first_issue(
    id: &SpiffeId,
    slot: &Slot,
    source: &dyn IdentitySource,
    changes: &watch::Sender<u64>,
) -> Result<Arc<WorkloadCertificate>, IdentityError> {
    let _issuing = slot.issuing.lock().await;
    if let Some(cert) = valid(slot) {
        return Ok(cert);
    }
    if let Some((retry_in, last)) = slot.backoff() {
        return Err(IdentityError::BackingOff {
            id: id.to_string(),
            retry_in,
            last,
        });
    }
    match issue_checked(source, id).await {
        Ok(cert) => {
            let cert = Arc::new(cert);
            slot.current.store(Some(cert.clone()));
            *lock(&slot.failure) = None;
            changes.send_modify(|generation| *generation += 1);
            Ok(cert)
        }
        Err(err) => {
            let mut failure = lock(&slot.failure);
            let gap = failure.as_ref().map_or(FIRST_RETRY, |last| last.next_gap);
            let delay = jitter(gap);
            tracing::warn!(%id, error = %err, retry_in = ?delay, "certificate could not be issued");
            *failure = Some(Failure {
                retry_at: Instant::now() + delay,
                next_gap: (gap * 2).min(MAX_RETRY),
                error: err.to_string(),
            });
            Err(err)
        }
    }
}

/// Issues `id` and checks the answer before anything uses it (HARDENING X7): whatever the
/// source, a certificate for another identity, with a broken or unverifiable chain, a key that
/// is not ours or already expired counts as a failed issue, so the old certificate stays and
/// the next try backs off.
async fn issue_checked(
    source: &dyn IdentitySource,
    id: &SpiffeId,
) -> Result<WorkloadCertificate, IdentityError> {
    let cert = source.issue(id).await?;
    check_issued(id, &cert)?;
    Ok(cert)
}

/// The check every issued certificate passes before use (`tls::svid::check_issued`).
pub(crate) fn check_issued(id: &SpiffeId, cert: &WorkloadCertificate) -> Result<(), IdentityError> {
    let algorithms = crate::tls::backend().signature_verification_algorithms;
    crate::tls::svid::check_issued(id, cert, &algorithms).map_err(|source| IdentityError::Refused {
        id: id.to_string(),
        source,
    })
}

/// Issues `id` if it has no valid certificate (retrying after each backoff), then renews it.
async fn keep(
    id: SpiffeId,
    slot: Weak<Slot>,
    source: Arc<dyn IdentitySource>,
    changes: Arc<watch::Sender<u64>>,
) {
    loop {
        let Some(held) = slot.upgrade() else {
            return;
        };
        if valid(&held).is_some() {
            break;
        }
        let wait = match first_issue(&id, &held, &*source, &changes).await {
            Ok(_) => break,
            Err(_) => held.backoff().map_or(MIN_RENEWAL_GAP, |(wait, _)| wait),
        };
        drop(held);
        tokio::time::sleep(wait.max(MIN_RENEWAL_GAP)).await;
    }
    renew(id, slot, source, changes).await;
}

/// Renews `id` at each certificate's refresh time for as long as the slot exists.
async fn renew(
    id: SpiffeId,
    slot: Weak<Slot>,
    source: Arc<dyn IdentitySource>,
    changes: Arc<watch::Sender<u64>>,
) {
    loop {
        let Some(current) = slot.upgrade().and_then(|slot| slot.current.load_full()) else {
            return;
        };
        tokio::time::sleep(until_due(&current)).await;

        let mut retry = FIRST_RETRY;
        let fresh = loop {
            match issue_checked(&*source, &id).await {
                Ok(cert) => break Arc::new(cert),
                Err(err) => {
                    // Before expiry, one retry lands just before it; after it the backoff
                    // keeps growing to its cap, so a CA outage is not met with a request per
                    // identity per second from every node (HARDENING F2).
                    let delay = match until_expiry(&current) {
                        Some(left) => jitter(retry).min(left.max(MIN_RENEWAL_GAP)),
                        None => jitter(retry),
                    };
                    tracing::warn!(%id, error = %err, retry_in = ?delay, "certificate renewal failed; keeping the current certificate");
                    tokio::time::sleep(delay).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        };
        let Some(slot) = slot.upgrade() else {
            return;
        };
        tracing::debug!(%id, not_after = ?fresh.not_after, "certificate renewed");
        slot.current.store(Some(fresh));
        changes.send_modify(|generation| *generation += 1);
    }
}

/// Half-way through the certificate's life; at once if it claims to start in the future (the
/// CA's clock is ahead and peers may refuse it).
fn until_due(cert: &WorkloadCertificate) -> Duration {
    let now = SystemTime::now();
    let wait = if cert.not_before > now {
        Duration::ZERO
    } else {
        cert.refresh_at().duration_since(now).unwrap_or_default()
    };
    wait.max(MIN_RENEWAL_GAP)
}

/// How long the old certificate is still valid, `None` once it has expired: a retry is never
/// scheduled after the expiry (but not sooner than the gap).
fn until_expiry(cert: &WorkloadCertificate) -> Option<Duration> {
    cert.not_after
        .duration_since(SystemTime::now())
        .ok()
        .filter(|left| !left.is_zero())
}

/// Spreads retries of many identities over ±50 %.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::random::<f64>() + 0.5)
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
