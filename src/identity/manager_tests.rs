//! Tests of the certificate cache: issue once, renew in the background, survive a failing CA.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;
use crate::identity::{BoxFuture, CertificateAuthority};

/// A CA that counts what it is asked, answers slowly, and can be told to fail.
#[derive(Debug)]
struct CountingSource {
    ca: CertificateAuthority,
    issued: AtomicUsize,
    attempts: AtomicUsize,
    failing: AtomicBool,
    _dir: tempfile::TempDir,
}

impl CountingSource {
    fn new(ttl: Duration) -> Arc<CountingSource> {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::init(dir.path(), "cluster.local").unwrap();
        let ca = CertificateAuthority::load(dir.path(), "cluster.local", ttl).unwrap();
        Arc::new(CountingSource {
            ca,
            issued: AtomicUsize::new(0),
            attempts: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            _dir: dir,
        })
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl IdentitySource for CountingSource {
    fn issue<'a>(
        &'a self,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            // Slow enough that concurrent fetches really overlap.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.failing.load(Ordering::SeqCst) {
                return Err(IdentityError::Signing {
                    id: id.to_string(),
                    reason: "CA unavailable (test)".into(),
                });
            }
            let cert = self.ca.issue_now(id)?;
            self.issued.fetch_add(1, Ordering::SeqCst);
            Ok(cert)
        })
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// Waits (bounded) until the manager reports a change after `since`.
async fn next_change(changes: &mut watch::Receiver<u64>, within: Duration) {
    tokio::time::timeout(within, changes.changed())
        .await
        .expect("a renewal within the deadline")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_identity_issue_once() {
    let source = CountingSource::new(Duration::from_secs(3600));
    let manager = CertManager::new(source.clone());
    let sleep = id("sleep");
    let fetches = (0..16).map(|_| manager.fetch(&sleep));
    let certs = futures::future::join_all(fetches).await;
    let certs: Vec<_> = certs.into_iter().map(Result::unwrap).collect();

    assert_eq!(source.issued(), 1);
    assert!(certs.iter().all(|cert| Arc::ptr_eq(cert, &certs[0])));
    assert_eq!(certs[0].id, sleep);

    let again = manager.fetch(&sleep).await.unwrap();
    assert!(Arc::ptr_eq(&again, &certs[0]), "served from the cache");
    assert_eq!(source.issued(), 1);
}

#[tokio::test]
async fn each_identity_has_its_own_certificate_and_forget_drops_one() {
    let source = CountingSource::new(Duration::from_secs(3600));
    let manager = CertManager::new(source.clone());
    let (sleep, httpbin) = (id("sleep"), id("httpbin"));
    let a = manager.fetch(&sleep).await.unwrap();
    let b = manager.fetch(&httpbin).await.unwrap();
    assert_eq!(
        (a.id.clone(), b.id.clone()),
        (sleep.clone(), httpbin.clone())
    );
    let ids: Vec<_> = manager.snapshot().iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids, vec![httpbin.clone(), sleep.clone()]);
    assert_eq!(manager.generation(), 2);

    manager.forget(&sleep);
    let ids: Vec<_> = manager.snapshot().iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids, vec![httpbin.clone()]);
    assert_eq!(
        a.id, sleep,
        "a forgotten certificate stays usable by its holders"
    );

    let fresh = manager.fetch(&sleep).await.unwrap();
    assert!(!Arc::ptr_eq(&fresh, &a));
    assert_eq!(source.issued(), 3);
}

#[tokio::test]
async fn a_failed_first_issue_holds_further_attempts_off_for_its_backoff() {
    let source = CountingSource::new(Duration::from_secs(3600));
    source.failing.store(true, Ordering::SeqCst);
    let manager = CertManager::new(source.clone());
    let sleep = id("sleep");

    // Callers queued behind the failing attempt get its error, not one CA request each.
    let fetches = (0..8).map(|_| manager.fetch(&sleep));
    let results = futures::future::join_all(fetches).await;
    assert!(results.iter().all(Result::is_err));
    assert_eq!(source.attempts.load(Ordering::SeqCst), 1);
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("CA unavailable"), "{err}");
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(
        err.contains("next in") && err.contains("CA unavailable"),
        "{err}"
    );
    assert!(manager.snapshot().is_empty());

    // The CA is back, but the backoff (1 s ± 50 %) still runs: no request yet.
    source.failing.store(false, Ordering::SeqCst);
    let err = manager.fetch(&sleep).await.unwrap_err();
    assert!(matches!(err, IdentityError::BackingOff { .. }), "{err}");
    assert_eq!(source.attempts.load(Ordering::SeqCst), 1);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    manager.fetch(&sleep).await.unwrap();
    assert_eq!(source.issued(), 1);
    assert_eq!(source.attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn sync_local_prefetches_retries_and_forgets() {
    let source = CountingSource::new(Duration::from_secs(3600));
    source.failing.store(true, Ordering::SeqCst);
    let manager = CertManager::new(source.clone());
    let mut changes = manager.subscribe();
    let (sleep, httpbin) = (id("sleep"), id("httpbin"));
    let wanted = [sleep.clone(), httpbin.clone()];

    manager.sync_local(wanted.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(source.attempts.load(Ordering::SeqCst), 2, "one try each");
    assert_eq!(manager.pending(&wanted), wanted.to_vec());
    manager.sync_local(wanted.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        source.attempts.load(Ordering::SeqCst),
        2,
        "a repeated sync does not retry before the backoff ends"
    );

    // The background retry after the backoff issues both, without anyone fetching.
    // (Two issues may reach a watcher as one change: wait for the state, not for a count.)
    source.failing.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while !manager.pending(&wanted).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the background retry did not issue both"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
    }
    assert_eq!(source.issued(), 2);
    let expiries = manager.expiries();
    assert_eq!(expiries.len(), 2);
    assert_eq!(expiries[1].0, sleep);
    assert!(expiries[1].1 > SystemTime::now() + Duration::from_secs(3000));

    manager.sync_local([httpbin.clone()]);
    let held: Vec<_> = manager.expiries().into_iter().map(|(id, _)| id).collect();
    assert_eq!(held, vec![httpbin.clone()]);
    assert_eq!(manager.pending(&wanted), vec![sleep.clone()]);
    assert_eq!(source.issued(), 2, "nothing re-issued for a held identity");
}

#[tokio::test]
async fn short_lived_certificates_are_renewed_in_the_background() {
    let source = CountingSource::new(Duration::from_secs(4));
    let manager = CertManager::new(source.clone());
    let mut changes = manager.subscribe();
    let sleep = id("sleep");
    let old = manager.fetch(&sleep).await.unwrap();
    let old_leaf = old.chain[0].clone();
    changes.borrow_and_update();

    next_change(&mut changes, Duration::from_secs(6)).await;
    let new = manager.fetch(&sleep).await.unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    assert_ne!(new.chain[0], old_leaf, "a different certificate");
    assert!(new.not_after > old.not_after);
    assert_eq!(old.chain[0], old_leaf, "the old Arc is untouched");
    assert!(
        old.not_after > SystemTime::now(),
        "and still valid for who holds it"
    );
    assert_eq!(source.issued(), 2);
}

#[tokio::test]
async fn a_failing_renewal_keeps_the_old_certificate_and_retries() {
    // 8 s: backdated 2 s, due ~3 s after issue, expiring ~8 s after: room for a loaded machine.
    let source = CountingSource::new(Duration::from_secs(8));
    let manager = CertManager::new(source.clone());
    let mut changes = manager.subscribe();
    let sleep = id("sleep");
    let old = manager.fetch(&sleep).await.unwrap();
    changes.borrow_and_update();
    source.failing.store(true, Ordering::SeqCst);

    // Past the refresh time the renewal fails; fetch keeps serving the still valid old cert.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert!(
        source.attempts.load(Ordering::SeqCst) >= 2,
        "a renewal was attempted"
    );
    let during = manager.fetch(&sleep).await.unwrap();
    assert!(Arc::ptr_eq(&during, &old));

    source.failing.store(false, Ordering::SeqCst);
    next_change(&mut changes, Duration::from_secs(8)).await;
    let renewed = manager.fetch(&sleep).await.unwrap();
    assert!(!Arc::ptr_eq(&renewed, &old));
}

#[tokio::test]
async fn forgotten_identities_are_no_longer_renewed() {
    let source = CountingSource::new(Duration::from_secs(2));
    let manager = CertManager::new(source.clone());
    manager.fetch(&id("sleep")).await.unwrap();
    manager.forget(&id("sleep"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(source.attempts.load(Ordering::SeqCst), 1);
    assert!(manager.snapshot().is_empty());
}

// HARDENING F2
#[tokio::test]
async fn a_ca_down_near_expiry_fails_closed_after_it_and_keeps_backing_off() {
    // 4 s: refresh due ~1.5 s after issue, expiry 3–4 s after.
    let source = CountingSource::new(Duration::from_secs(4));
    let manager = CertManager::new(source.clone());
    let sleep = id("sleep");
    let old = manager.fetch(&sleep).await.unwrap();
    source.failing.store(true, Ordering::SeqCst);
    let attempts = || source.attempts.load(Ordering::SeqCst);

    // Half a second before expiry: the renewal was tried from half-life on, and the old,
    // still valid certificate is what callers get.
    let left = old.not_after.duration_since(SystemTime::now()).unwrap();
    tokio::time::sleep(left.saturating_sub(Duration::from_millis(500))).await;
    assert!(attempts() >= 2, "no renewal attempt before expiry");
    assert!(Arc::ptr_eq(&manager.fetch(&sleep).await.unwrap(), &old));

    // Past expiry: no certificate at all (so no handshake, never plaintext), and readiness
    // names the identity.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(old.not_after <= SystemTime::now());
    let refused = manager.fetch(&sleep).await;
    assert!(refused.is_err(), "an expired certificate was handed out");
    assert_eq!(manager.pending([&sleep]), vec![sleep.clone()]);

    // The renewal keeps doubling its backoff after expiry instead of asking every second
    // (1 s, 2 s, then 4 s ±50 %, 8 s ±50 %: at most two attempts in the next 4 s).
    let at_expiry = attempts();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = attempts() - at_expiry;
    assert!(
        during <= 2,
        "{during} CA requests in 4 s of outage after expiry: the backoff collapsed"
    );

    // The CA is back: the next fetch (after the failed fetch's own short backoff) issues anew.
    source.failing.store(false, Ordering::SeqCst);
    let fresh = manager.fetch(&sleep).await.expect("a fresh certificate");
    assert!(fresh.not_after > SystemTime::now());
    assert!(manager.pending([&sleep]).is_empty());
}
