//! HARDENING T9, T10, T12: hostile hellos and records against the real HBONE TLS server config
//! (and, for ALPN, the real HBONE connection server): refused or ended cleanly, never a panic,
//! never a spin, never the wrong certificate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::tests::{Mesh, handshake};
use super::*;

/// Accepts one connection with `server` and reports how the TLS accept ended, and when.
async fn one_accept(
    server: Arc<ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        // Keep reading until the peer closes or errs: a KeyUpdate flood lands here.
        let mut buf = vec![0; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    (addr, task)
}

async fn ended_within(
    task: tokio::task::JoinHandle<Result<(), String>>,
    limit: Duration,
) -> Result<(), String> {
    tokio::time::timeout(limit, task)
        .await
        .expect("the server ended the connection in time (no hang, no spin)")
        .expect("the server task did not panic")
}

fn pair() -> (Mesh, WorkloadCertificate, WorkloadCertificate) {
    let mesh = Mesh::new("cluster.local");
    let (sleep, httpbin) = (mesh.cert("sleep"), mesh.cert("httpbin"));
    (mesh, sleep, httpbin)
}

// HARDENING T9
#[tokio::test]
async fn alpn_http11_or_junk_gets_no_application_protocol() {
    let (_mesh, sleep, httpbin) = pair();
    for offered in [
        vec![b"http/1.1".to_vec()],
        vec![b"\x00\xffjunk".to_vec(), vec![0x42; 255]],
    ] {
        let server = server_config(&httpbin).unwrap();
        let mut client =
            (*client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap()).clone();
        client.alpn_protocols = offered;
        let (server_side, client_side) = handshake(server, Arc::new(client)).await;
        let server_err = server_side.unwrap_err();
        assert!(
            server_err.contains("peer doesn't support any known protocol"),
            "{server_err}"
        );
        let client_err = client_side.unwrap_err();
        assert!(client_err.contains("NoApplicationProtocol"), "{client_err}");
    }
}

// HARDENING T9
#[tokio::test]
async fn without_alpn_the_hbone_server_refuses_even_a_correct_h2_preface() {
    use crate::hbone::server::{ConnectionInfo, accept_and_serve};
    let (_mesh, sleep, httpbin) = pair();
    let server = server_config(&httpbin).unwrap();
    let mut client = (*client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap()).clone();
    client.alpn_protocols.clear();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = Arc::new(AtomicBool::new(false));
    let flag = reached.clone();
    let served = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let info = ConnectionInfo {
            peer_addr: peer,
            local_addr: addr,
        };
        let (_drain_tx, drain) = tokio::sync::watch::channel(false);
        accept_and_serve(
            tcp,
            &TlsAcceptor::from(server),
            info,
            &crate::hbone::ServerBudget::new(crate::hbone::Limits::server()),
            drain,
            move |_| flag.store(true, Ordering::SeqCst),
        )
        .await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect(dummy_server_name(), tcp)
        .await
        .expect("TLS itself completes without ALPN");
    // A client preface, SETTINGS, then HEADERS would follow; the server must not read on.
    let _ = tls
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "no HTTP/2 byte came back: {rest:?}");
    let err = tokio::time::timeout(Duration::from_secs(2), served)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("none"),
        "names the missing ALPN: {err}"
    );
    assert!(!reached.load(Ordering::SeqCst), "no CONNECT was dispatched");
}

// HARDENING T10
#[tokio::test]
async fn sni_never_chooses_the_certificate() {
    let (mesh, sleep, httpbin) = pair();
    let _other = mesh.cert("kube-admin");
    for name in [
        "kube-admin.default.svc.cluster.local",
        "sleep.default.svc.cluster.local",
    ] {
        let server = server_config(&httpbin).unwrap();
        let mut client =
            (*client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap()).clone();
        client.enable_sni = true;
        let (addr, served) = one_accept_sni(server).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let tls = TlsConnector::from(Arc::new(client))
            .connect(name.clone(), tcp)
            .await
            .unwrap();
        let presented = peer_identity(tls.get_ref().1);
        assert_eq!(
            presented,
            Some(httpbin.id.clone()),
            "SNI {name:?} changed nothing"
        );
        drop(tls);
        let sni = served.await.unwrap();
        assert_eq!(
            sni.as_deref(),
            Some(name.to_str().as_ref()),
            "the SNI did arrive"
        );
    }
}

async fn one_accept_sni(
    server: Arc<ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Option<String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = TlsAcceptor::from(server).accept(tcp).await.ok()?;
        tls.get_ref().1.server_name().map(str::to_string)
    });
    (addr, task)
}

/// A TLS 1.3 ClientHello naming `sni` (any bytes), in records of at most `record` bytes.
fn client_hello(sni: &[u8], record: usize) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut put_ext = |kind: u16, body: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    };
    let mut names = vec![0u8];
    names.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    names.extend_from_slice(sni);
    let mut server_name = (names.len() as u16).to_be_bytes().to_vec();
    server_name.extend(names);
    put_ext(0x0000, &server_name);
    put_ext(0x002b, &[2, 0x03, 0x04]); // supported_versions: TLS 1.3
    put_ext(0x000a, &[0, 2, 0x00, 0x1d]); // supported_groups: x25519
    put_ext(0x000d, &[0, 2, 0x04, 0x03]); // signature_algorithms: ecdsa_secp256r1_sha256
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32];
    share.extend([9u8; 32]);
    put_ext(0x0033, &share); // key_share

    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend([1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend(body);

    let mut out = Vec::new();
    for chunk in message.chunks(record) {
        out.extend([0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

// HARDENING T10
#[tokio::test]
async fn a_64_kib_or_ip_literal_sni_ends_cleanly() {
    let (_mesh, _sleep, httpbin) = pair();
    for (sni, record) in [
        (vec![b'a'; 65_000], 16_384),
        (b"10.0.0.1".to_vec(), 16_384),
        (b"10.0.0.1".to_vec(), 7),
    ] {
        let (addr, served) = one_accept(server_config(&httpbin).unwrap()).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&client_hello(&sni, record)).await.unwrap();
        // Whatever the server answers, it ends this connection: no client Finished ever comes.
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read_to_end(&mut answer)).await;
        drop(tcp);
        let outcome = ended_within(served, Duration::from_secs(2)).await;
        assert!(outcome.is_err(), "SNI of {} bytes: {outcome:?}", sni.len());
    }
}

// HARDENING T10
#[tokio::test]
async fn a_client_hello_fragmented_into_tiny_records_still_works() {
    let (_mesh, sleep, httpbin) = pair();
    let server = server_config(&httpbin).unwrap();
    let mut client = (*client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap()).clone();
    client.max_fragment_size = Some(32);
    let (server_side, client_side) = handshake(server, Arc::new(client)).await;
    assert_eq!(server_side.unwrap().peer, Some(sleep.id.clone()));
    assert_eq!(client_side.unwrap().peer, Some(httpbin.id.clone()));
}

// HARDENING T12
#[tokio::test]
async fn close_notify_right_after_the_client_hello_ends_the_connection() {
    let (_mesh, sleep, httpbin) = pair();
    let client = client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap();
    let mut hello = Vec::new();
    let mut conn = rustls::ClientConnection::new(client, dummy_server_name()).unwrap();
    conn.write_tls(&mut hello).unwrap();

    let (addr, served) = one_accept(server_config(&httpbin).unwrap()).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00])
        .await
        .unwrap();
    let started = Instant::now();
    let outcome = ended_within(served, Duration::from_secs(2)).await;
    assert!(
        outcome.is_err(),
        "the handshake never completed: {outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

// HARDENING T12
#[tokio::test]
async fn a_key_update_flood_is_cut_off() {
    let (_mesh, sleep, httpbin) = pair();
    let client = client_config(&sleep, std::slice::from_ref(&httpbin.id)).unwrap();
    let (addr, served) = one_accept(server_config(&httpbin).unwrap()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(client)
        .connect(dummy_server_name(), tcp)
        .await
        .unwrap();
    for _ in 0..1000 {
        if tls.get_mut().1.refresh_traffic_keys().is_err() {
            break;
        }
        if tls.flush().await.is_err() {
            break;
        }
    }
    let outcome = ended_within(served, Duration::from_secs(2)).await;
    let err = outcome.expect_err("the server gives up on the flood");
    assert!(err.contains("TooManyKeyUpdateRequests"), "{err}");
}
