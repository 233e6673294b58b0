//! One certificate per identity, fetched on demand from an `IdentitySource`, renewed in the
//! background at half its life (retrying with backoff, keeping the old certificate while it is
//! valid). Knows nothing about TLS: callers hold `Arc<WorkloadCertificate>`s, and a renewal only
//! swaps what the next `fetch` returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

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
    renewal: Mutex<Option<JoinHandle<()>>>,
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
    /// is none or the one held has expired.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let slot = self.slot(id);
        if let Some(cert) = valid(&slot) {
            return Ok(cert);
        }
        let _issuing = slot.issuing.lock().await;
        if let Some(cert) = valid(&slot) {
            return Ok(cert);
        }
        let cert = Arc::new(self.source.issue(id).await?);
        slot.current.store(Some(cert.clone()));
        self.changes.send_modify(|generation| *generation += 1);
        self.start_renewal(id, &slot);
        Ok(cert)
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
        // A panic while holding this lock cannot leave the map half-updated: keep going.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
                    renewal: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Starts the renewal task unless one runs or `id` was forgotten while it was being issued
    /// (checked under the map lock, so `forget` cannot miss a task).
    fn start_renewal(&self, id: &SpiffeId, slot: &Arc<Slot>) {
        let slots = self.lock_slots();
        if !slots.get(id).is_some_and(|held| Arc::ptr_eq(held, slot)) {
            return;
        }
        let mut renewal = slot
            .renewal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if renewal.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        *renewal = Some(tokio::spawn(renew(
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

fn stop_renewal(slot: &Slot) {
    let task = slot
        .renewal
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(task) = task {
        task.abort();
    }
}

fn valid(slot: &Slot) -> Option<Arc<WorkloadCertificate>> {
    slot.current
        .load_full()
        .filter(|cert| cert.not_after > SystemTime::now())
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
            match source.issue(&id).await {
                Ok(cert) => break Arc::new(cert),
                Err(err) => {
                    let delay = jitter(retry).min(until_expiry(&current));
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

/// A retry is never scheduled after the old certificate expires (but not sooner than the gap).
fn until_expiry(cert: &WorkloadCertificate) -> Duration {
    cert.not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .max(MIN_RENEWAL_GAP)
}

/// Spreads retries of many identities over ±50 %.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::random::<f64>() + 0.5)
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
