//! Tests of the Istio CA client against an in-process fake CA: a real tonic
//! `IstioCertificateService` over TLS on 127.0.0.1 that signs the CSRs with an rcgen CA.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, Certificate, CertificateSigningRequestParams, IsCa, KeyUsagePurpose, SanType,
};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use super::*;
use crate::identity::CertManager;
use crate::proto::istio::v1::auth::IstioCertificateResponse;
use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};

const SERVER_NAME: &str = "istiod.istio-system.svc";

/// How the fake answers.
#[derive(Debug, Clone)]
enum Mode {
    /// Signs the CSR; the last chain element holds two roots.
    Good,
    /// Signs, but for this URI instead of the one requested.
    OtherIdentity(String),
    /// Signs a different key than the CSR's.
    OtherKey,
    Refuse(tonic::Code),
}

/// What one request carried.
#[derive(Debug, Clone)]
struct Seen {
    csr: String,
    validity_duration: i64,
    metadata: Option<Struct>,
    token: Option<String>,
    cluster_id: Option<String>,
}

struct FakeCa {
    signer: KeyPair,
    intermediate: Certificate,
    root_pem: String,
    other_root_pem: String,
    mode: Mutex<Mode>,
    delay: Duration,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl FakeCa {
    fn new(delay: Duration) -> Arc<FakeCa> {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("fake mesh root").self_signed(&root_key).unwrap();
        let signer = KeyPair::generate().unwrap();
        let intermediate = ca_params("fake istiod intermediate")
            .signed_by(&signer, &root, &root_key)
            .unwrap();
        let other_key = KeyPair::generate().unwrap();
        let other_root = ca_params("fake old root").self_signed(&other_key).unwrap();
        Arc::new(FakeCa {
            signer,
            intermediate,
            root_pem: root.pem(),
            other_root_pem: other_root.pem(),
            mode: Mutex::new(Mode::Good),
            delay,
            seen: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn sign(&self, csr: &str, mode: &Mode) -> Result<Vec<String>, tonic::Status> {
        let bad = |e: rcgen::Error| tonic::Status::invalid_argument(e.to_string());
        let mut csr = CertificateSigningRequestParams::from_pem(csr).map_err(bad)?;
        let asked = csr
            .params
            .subject_alt_names
            .iter()
            .find_map(|san| match san {
                SanType::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .ok_or_else(|| tonic::Status::invalid_argument("no URI SAN"))?;
        let uri = match mode {
            Mode::OtherIdentity(uri) => uri.clone(),
            _ => asked,
        };
        let params = &mut csr.params;
        params.subject_alt_names.clear();
        params.custom_extensions = vec![uri_san(&uri)];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        // As istiod signs a workload's CSR (ztund refuses leaves without these).
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = if matches!(mode, Mode::OtherKey) {
            let other = KeyPair::generate().map_err(bad)?;
            csr.params
                .signed_by(&other, &self.intermediate, &self.signer)
        } else {
            csr.signed_by(&self.intermediate, &self.signer)
        }
        .map_err(bad)?;
        Ok(vec![
            leaf.pem(),
            self.intermediate.pem(),
            format!("{}{}", self.root_pem, self.other_root_pem),
        ])
    }
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);

        let token = crate::grpc::bearer_token(&request).map(str::to_string);
        let cluster_id = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = request.into_inner();
        self.seen.lock().unwrap().push(Seen {
            csr: body.csr.clone(),
            validity_duration: body.validity_duration,
            metadata: body.metadata.clone(),
            token,
            cluster_id,
        });
        let mode = self.mode.lock().unwrap().clone();
        if let Mode::Refuse(code) = mode {
            return Err(tonic::Status::new(
                code,
                "caller is not a trusted node (fake)",
            ));
        }
        let cert_chain = self.sign(&body.csr, &mode)?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain,
        }))
    }
}

/// Serves `fake` over TLS on 127.0.0.1; the client trusts the server's own root.
struct Running {
    target: Target,
    auth: CallAuth,
    token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn serve(fake: Arc<FakeCa>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let root = ca_params("fake istiod serving root")
        .self_signed(&root_key)
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])
        .unwrap()
        .signed_by(&key, &root, &root_key)
        .unwrap();
    let root_cert = dir.path().join("root-cert.pem");
    std::fs::write(&root_cert, root.pem()).unwrap();
    let token_file = dir.path().join("istio-token");
    std::fs::write(&token_file, "node-token\n").unwrap();

    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = incoming.local_addr().unwrap().port();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(leaf.pem(), key.serialize_pem()));
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(IstioCertificateServiceServer::from_arc(fake))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    Running {
        target: Target {
            address: format!("https://127.0.0.1:{port}"),
            root_cert,
            server_name: Some(SERVER_NAME.into()),
        },
        auth: CallAuth {
            token_file: Some(token_file.clone()),
            cluster_id: "Kubernetes".into(),
        },
        token_file,
        _dir: dir,
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn der_of(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Checks a CSR the way istiod would see it: empty subject, P-256 key, ECDSA-SHA256, and
/// exactly one extension, a critical SubjectAltName holding the one URI `uri`.
fn assert_csr(pem: &str, uri: &str) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(pem.label, "CERTIFICATE REQUEST");
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .unwrap();
    csr.verify_signature().unwrap();
    let info = &csr.certification_request_info;
    assert_eq!(info.subject.iter().count(), 0, "empty subject");
    assert_eq!(
        csr.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
    let spki = &info.subject_pki.algorithm;
    assert_eq!(
        spki.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let curve = spki.parameters.as_ref().unwrap().as_oid().unwrap();
    assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);

    let extensions: Vec<_> = info
        .attributes()
        .iter()
        .flat_map(|attribute| match attribute.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(request) => request.extensions.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(extensions.len(), 1, "exactly one extension: {extensions:?}");
    assert!(extensions[0].critical, "the SubjectAltName is critical");
    let ParsedExtension::SubjectAlternativeName(san) = extensions[0].parsed_extension() else {
        panic!("not a SubjectAltName: {:?}", extensions[0]);
    };
    assert_eq!(
        san.general_names,
        vec![x509_parser::extensions::GeneralName::URI(uri)]
    );
}

#[tokio::test]
async fn a_csr_comes_back_as_a_certificate_with_the_whole_bundle_as_roots() {
    let fake = FakeCa::new(Duration::ZERO);
    let running = serve(fake.clone()).await;
    let ca = IstioCa::new(
        running.target.clone(),
        running.auth.clone(),
        Duration::from_secs(3600),
        true,
    );
    let sleep = id("sleep");
    let cert = ca.issue(&sleep).await.unwrap();

    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_csr(&seen[0].csr, "spiffe://cluster.local/ns/default/sa/sleep");
    assert_eq!(seen[0].validity_duration, 3600);
    assert_eq!(seen[0].metadata, Some(impersonation(&sleep)));
    let field = &seen[0].metadata.as_ref().unwrap().fields[IMPERSONATED_IDENTITY];
    assert_eq!(
        field.kind,
        Some(Kind::StringValue(
            "spiffe://cluster.local/ns/default/sa/sleep".into()
        ))
    );
    assert_eq!(seen[0].token.as_deref(), Some("node-token"));
    assert_eq!(seen[0].cluster_id.as_deref(), Some("Kubernetes"));

    assert_eq!(cert.id, sleep);
    assert_eq!(cert.chain.len(), 2, "leaf and intermediate");
    assert_eq!(cert.chain[1], fake.intermediate.der().clone());
    let mut roots = der_of(&fake.root_pem);
    roots.extend(der_of(&fake.other_root_pem));
    assert_eq!(cert.roots, roots, "every certificate of the last element");
    assert!(cert.chain.iter().all(|c| !cert.roots.contains(c)));
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(life, Duration::from_secs(3660));
    let PrivateKeyDer::Pkcs8(key) = &cert.key else {
        panic!("PKCS#8 key expected");
    };
    let key = KeyPair::try_from(key.secret_pkcs8_der()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
    assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());

    // A workload's own proxy does not impersonate; the token is read again for each call.
    std::fs::write(&running.token_file, "rotated-token").unwrap();
    let own = IstioCa::new(
        running.target.clone(),
        running.auth.clone(),
        Duration::from_secs(600),
        false,
    );
    own.issue(&sleep).await.unwrap();
    let seen = fake.seen();
    assert_eq!(seen[1].metadata, None);
    assert_eq!(seen[1].validity_duration, 600);
    assert_eq!(seen[1].token.as_deref(), Some("rotated-token"));
}

#[tokio::test]
async fn a_leaf_for_another_identity_or_key_is_refused() {
    let fake = FakeCa::new(Duration::ZERO);
    let running = serve(fake.clone()).await;
    let ca = IstioCa::new(
        running.target,
        running.auth,
        Duration::from_secs(3600),
        true,
    );
    let other = "spiffe://cluster.local/ns/default/sa/admin";
    fake.set_mode(Mode::OtherIdentity(other.into()));
    let err = ca.issue(&id("sleep")).await.unwrap_err();
    assert!(matches!(err, IdentityError::WrongIdentity { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(other) && text.contains("sa/sleep") && text.contains("refused"),
        "{text}"
    );

    fake.set_mode(Mode::OtherKey);
    let err = ca.issue(&id("sleep")).await.unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err}");
}

#[tokio::test]
async fn a_grpc_status_is_reported_with_its_code_and_message() {
    let fake = FakeCa::new(Duration::ZERO);
    let running = serve(fake.clone()).await;
    let ca = IstioCa::new(
        running.target,
        running.auth,
        Duration::from_secs(3600),
        true,
    );
    fake.set_mode(Mode::Refuse(tonic::Code::Unauthenticated));
    let err = ca.issue(&id("sleep")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            IdentityError::CaStatus {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("Unauthenticated") && text.contains("not a trusted node"),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_chains_are_refused_by_name() {
    let sleep = id("sleep");
    let (key, _) = csr(&sleep).unwrap();
    let err = certificate(&sleep, &key, &[]).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = certificate(&sleep, &key, &["x".into()]).unwrap_err();
    assert!(err.to_string().contains("one element"), "{err}");
    let err = certificate(&sleep, &key, &["x".into(), "y".into()]).unwrap_err();
    assert!(err.to_string().contains("cert_chain[0]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_local_identities_are_fetched_eight_at_a_time_and_departed_ones_forgotten() {
    let fake = FakeCa::new(Duration::from_millis(150));
    let running = serve(fake.clone()).await;
    let ca = IstioCa::new(
        running.target,
        running.auth,
        Duration::from_secs(3600),
        true,
    );
    let manager = CertManager::new(Arc::new(ca));
    let wanted: Vec<SpiffeId> = (0..20).map(|n| id(&format!("sa-{n:02}"))).collect();

    manager.sync_local(wanted.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while !manager.pending(&wanted).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending: {:?}",
            manager.pending(&wanted)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.seen().len(), 20, "one request per identity");
    assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), MAX_IN_FLIGHT);

    let staying = &wanted[..5];
    manager.sync_local(staying.to_vec());
    let held: Vec<_> = manager.expiries().into_iter().map(|(id, _)| id).collect();
    assert_eq!(held, staying.to_vec());
    assert_eq!(manager.pending(&wanted).len(), 15);
    assert_eq!(
        fake.seen().len(),
        20,
        "the staying ones are not fetched again"
    );
}
