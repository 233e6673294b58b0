//! A pooled connection outlives neither certificate its handshake proved: once ours (or the
//! peer's) expires, new streams go over a fresh connection, while the long streams already on
//! the old one run on undisturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::hbone::WithCertExpiry;

type ExpiringDial =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<WithCertExpiry<TcpStream>, HboneError>> + Send>;

/// A dial presenting a client certificate that expires at `not_after`, and saying so.
fn expiring_dial(world: &World, not_after: SystemTime, calls: Arc<AtomicUsize>) -> ExpiringDial {
    let dial = dial_to(
        world.addr,
        world.pki.client_config_until(CLIENT_ID, not_after),
    );
    Box::new(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            Ok(WithCertExpiry {
                tls: dial().await?,
                local_not_after: not_after,
            })
        })
    })
}

async fn ping(stream: &mut H2Stream, message: &[u8]) {
    stream.write_all(message).await.expect("write");
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, message);
}

// HARDENING F4
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_stream_goes_over_a_connection_whose_certificate_expired() {
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let pool = small_pool();
    let target = || ConnectRequest::new(echo.addr.to_string());
    let dials = Arc::new(AtomicUsize::new(0));
    // Whole seconds: X.509 times have no finer grain.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 3);

    // A long stream on a connection whose client certificate is about to expire.
    let mut long = pool
        .open(
            &world.key(),
            expiring_dial(&world, expiry, dials.clone()),
            target(),
        )
        .await
        .expect("open before expiry");
    ping(&mut long, b"before").await;
    // While the certificate is valid the connection is shared.
    let mut shared = pool
        .open(
            &world.key(),
            expiring_dial(&world, expiry, dials.clone()),
            target(),
        )
        .await
        .expect("second stream");
    ping(&mut shared, b"shared").await;
    drop(shared);
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "the valid connection was not shared"
    );

    // Rotation: past the expiry, a new stream (with a renewed certificate) must dial afresh.
    let wait = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    let renewed = SystemTime::now() + Duration::from_secs(3600);
    let fresh = pool
        .open(
            &world.key(),
            expiring_dial(&world, renewed, dials.clone()),
            target(),
        )
        .await
        .expect("open after expiry");
    assert_eq!(
        dials.load(Ordering::SeqCst),
        2,
        "a new stream went over the connection whose certificate expired"
    );
    assert_eq!(world.accepted.load(Ordering::SeqCst), 2);

    // The long stream on the old connection is untouched: 1 MiB each way, byte-exact.
    let data = pattern(1 << 20);
    let back = round_trip(long, data.clone()).await.expect("long stream");
    assert!(back == data, "the long stream's bytes changed");
    let back = round_trip(fresh, data.clone()).await.expect("fresh stream");
    assert!(back == data);
    // Its last stream done, the expired connection closes; the fresh one stays pooled.
    assert!(
        eventually(Duration::from_secs(5), || pool.connection_count() == 1).await,
        "the expired connection did not close after its last stream: {:?}",
        pool.stats()
    );
}

// HARDENING F4, the server's side: a client whose certificate has expired opens no new stream
// on the connection it proved itself with, while its open stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_takes_no_new_stream_once_the_clients_certificate_expired() {
    let echo = Echo::start("127.0.0.1:0").await;
    let world = World::start(
        H2Settings::server(),
        forward(Arc::default(), Arc::default()),
    )
    .await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 3);
    let dial = dial_to(world.addr, world.pki.client_config_until(CLIENT_ID, expiry));
    let tls = dial().await.expect("dial");
    let (mut send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(connection);
    let connect = || {
        http::Request::builder()
            .method("CONNECT")
            .uri(echo.addr.to_string())
            .body(())
            .unwrap()
    };
    let (response, mut long) = send.send_request(connect(), false).expect("first CONNECT");
    let response = response.await.expect("an answer");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    let wait = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    let refused = match send.clone().ready().await {
        Err(_) => true,
        Ok(mut ready) => match ready.send_request(connect(), false) {
            Err(_) => true,
            Ok((answer, _)) => answer.await.is_err(),
        },
    };
    assert!(
        refused,
        "a new stream was taken after the client's certificate expired"
    );

    // The stream opened while the certificate was valid still carries bytes both ways.
    long.send_data(bytes::Bytes::from_static(b"after"), false)
        .expect("send on the open stream");
    let mut back = Vec::new();
    while back.len() < 5 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("echo in time")
            .expect("the stream is open")
            .expect("a chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, b"after");
}
