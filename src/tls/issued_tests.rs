//! HARDENING X7: what a CA hands back is checked before ztund uses it, whatever the source;
//! a bad answer is refused, the old certificate stays, and the next try backs off.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::forge::{Forge, id, uri_san};
use super::svid::{SvidError, check_issued};
use super::*;
use crate::identity::{BoxFuture, CertManager, IdentityError, IdentitySource};

fn check(asked: &SpiffeId, cert: &WorkloadCertificate) -> Result<(), SvidError> {
    check_issued(asked, cert, &backend().signature_verification_algorithms)
}

fn copy(cert: &WorkloadCertificate) -> WorkloadCertificate {
    WorkloadCertificate {
        id: cert.id.clone(),
        chain: cert.chain.clone(),
        key: cert.key.clone_key(),
        roots: cert.roots.clone(),
        not_before: cert.not_before,
        not_after: cert.not_after,
    }
}

// HARDENING X7
#[test]
fn every_way_a_ca_answer_can_be_wrong_is_refused() {
    let forge = Forge::root("mesh root");
    let asked = id("sleep");
    let good = forge.svid("sleep");
    assert_eq!(check(&asked, &good), Ok(()));

    // Another SAN than the one asked for (the certificate claims to be for what we asked).
    let other = forge.leaf(&asked, |p| {
        p.subject_alt_names = vec![uri_san("spiffe://cluster.local/ns/kube-system/sa/admin")]
    });
    assert!(
        matches!(check(&asked, &other), Err(SvidError::WrongIdentity { .. })),
        "{:?}",
        check(&asked, &other)
    );
    // Two SANs, one of them ours.
    let two = forge.leaf(&asked, |p| {
        p.subject_alt_names
            .push(uri_san("spiffe://cluster.local/ns/a/sa/b"))
    });
    assert!(matches!(
        check(&asked, &two),
        Err(SvidError::SeveralUriSans { count: 2, .. })
    ));

    // An empty chain.
    let empty = WorkloadCertificate {
        chain: Vec::new(),
        ..copy(&good)
    };
    assert_eq!(check(&asked, &empty), Err(SvidError::EmptyChain));

    // A chain that does not verify against the bundle that came with it.
    let stranger = Forge::root("someone else");
    let unverifiable = WorkloadCertificate {
        roots: vec![forge.root_der()],
        ..stranger.svid("sleep")
    };
    assert!(matches!(
        check(&asked, &unverifiable),
        Err(SvidError::Unverifiable { .. })
    ));
    // An intermediate missing from the chain.
    let intermediate = forge.intermediate("sub-ca", |_| {});
    let mut missing = intermediate.svid("sleep");
    missing.chain.truncate(1);
    assert!(matches!(
        check(&asked, &missing),
        Err(SvidError::Unverifiable { .. })
    ));

    // A leaf whose key is not the one we hold (the CSR's).
    let other_key = KeyPair::generate().unwrap();
    let swapped = WorkloadCertificate {
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(other_key.serialize_der())),
        ..copy(&good)
    };
    assert_eq!(check(&asked, &swapped), Err(SvidError::KeyMismatch));

    // An expired leaf.
    let now = time::OffsetDateTime::now_utc();
    let expired = forge.leaf(&asked, |p| {
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now - time::Duration::seconds(1);
    });
    let err = check(&asked, &expired).unwrap_err();
    assert!(err.to_string().contains("Expired"), "{err}");

    // Garbage among the roots; no roots.
    let garbage = WorkloadCertificate {
        roots: vec![
            forge.root_der(),
            CertificateDer::from(b"not a certificate".to_vec()),
        ],
        ..copy(&good)
    };
    assert!(matches!(
        check(&asked, &garbage),
        Err(SvidError::BadRoot { index: 1, .. })
    ));
    let rootless = WorkloadCertificate {
        roots: Vec::new(),
        ..copy(&good)
    };
    assert_eq!(check(&asked, &rootless), Err(SvidError::NoRoots));

    // A CA certificate handed out as the leaf.
    let ca_leaf = forge.leaf(&asked, |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    });
    assert_eq!(check(&asked, &ca_leaf), Err(SvidError::IsCa));
}

/// A CA answering with `good` until told to answer with `bad`.
struct Scripted {
    good: WorkloadCertificate,
    bad: WorkloadCertificate,
    serve_bad: AtomicBool,
    attempts: AtomicUsize,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl IdentitySource for Scripted {
    fn issue<'a>(
        &'a self,
        _id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let mut cert = if self.serve_bad.load(Ordering::SeqCst) {
                copy(&self.bad)
            } else {
                copy(&self.good)
            };
            // Due for renewal 1.5 s after issue, expired 4 s after.
            cert.not_before = SystemTime::now() - Duration::from_secs(1);
            cert.not_after = SystemTime::now() + Duration::from_secs(4);
            Ok(cert)
        })
    }
}

// HARDENING X7
#[tokio::test]
async fn a_bad_answer_is_refused_the_old_certificate_kept_and_retries_back_off() {
    let forge = Forge::root("mesh root");
    let asked = id("sleep");
    let good = forge.svid("sleep");
    let bad = forge.leaf(&asked, |p| {
        p.subject_alt_names = vec![uri_san("spiffe://cluster.local/ns/default/sa/impostor")]
    });
    let source = Arc::new(Scripted {
        good,
        bad,
        serve_bad: AtomicBool::new(true),
        attempts: AtomicUsize::new(0),
    });
    let manager = CertManager::new(source.clone());

    // First issue refused with the reason; the next fetch backs off instead of asking again.
    let err = manager.fetch(&asked).await.unwrap_err();
    assert!(
        matches!(
            &err,
            IdentityError::Refused {
                source: SvidError::WrongIdentity { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("impostor"), "{err}");
    let err = manager.fetch(&asked).await.unwrap_err();
    assert!(matches!(err, IdentityError::BackingOff { .. }), "{err}");
    assert_eq!(source.attempts.load(Ordering::SeqCst), 1);

    // A good answer after the backoff; then the CA turns bad at renewal time.
    source.serve_bad.store(false, Ordering::SeqCst);
    let held = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(cert) = manager.fetch(&asked).await {
                return cert;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("issued after the backoff");
    source.serve_bad.store(true, Ordering::SeqCst);
    let before = source.attempts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let attempts = source.attempts.load(Ordering::SeqCst) - before;
    assert!(attempts >= 1, "the renewal was tried");
    assert!(attempts <= 3, "retries back off: {attempts} in 2.5 s");
    let still = manager.fetch(&asked).await.unwrap();
    assert!(
        Arc::ptr_eq(&held, &still),
        "the refused answer never replaced the held certificate"
    );
}
