//! The standalone redirection for IPv6 in real namespaces with real nftables (the testbed gives
//! every pod and node an IPv6 address): outbound v6 capture to 15001 with the original
//! destination (`IP6T_SO_ORIGINAL_DST`), inbound v6 plaintext on the transparent 15006
//! listener (ip6 TPROXY) and HBONE on 15008, an `IPV6_TRANSPARENT` spoofed source toward the app
//! with the replies routed back, the fail-closed drop with no listener, the host mode's v6 set,
//! and a namespace with IPv6 disabled taking the rules without an error.

mod testbed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use testbed::{Place, Testbed};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use ztund::capture::nft::{self, HostRedirection, RedirectPorts};
use ztund::net::{Netns, SocketFactory, original_destination};

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(3);

fn ztund_sockets(netns: Arc<Netns>) -> SocketFactory {
    SocketFactory::in_netns(netns)
}

/// A dual-stack transparent listener, as ztund binds in a pod with IPv6.
fn listen6(netns: &Arc<Netns>, port: u16) -> TcpListener {
    ztund_sockets(netns.clone())
        .listener(SocketAddr::from(([0u16; 8], port)), true)
        .unwrap_or_else(|e| panic!("listening on [::]:{port}: {e}"))
}

async fn accepted(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("a connection should land on the listener")
        .expect("accept")
}

async fn nothing_lands_on(listener: &TcpListener) {
    let outcome = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(
        outcome.is_err(),
        "no connection should have been redirected here"
    );
}

fn install(netns: &Netns) {
    nft::install_pod_redirection(netns, &RedirectPorts::default()).expect("installing redirection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_outbound_lands_on_15001_with_the_original_destination_and_the_mark_bypasses_it() {
    let bed = Testbed::new(2, 1);
    let app = bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(bed.pod_ip6(2, 1), 8080),
        |mut stream, _| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        },
    );
    let client_ns = bed.netns(Place::Pod(1, 1));
    install(&client_ns);
    let outbound = listen6(&client_ns, 15001);

    let _app_side = bed
        .connect_from(1, 1, app)
        .await
        .expect("connect is answered by 15001");
    let (captured, peer) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), app);
    assert_eq!(peer.ip(), bed.pod_ip6(1, 1));

    let direct = ztund_sockets(client_ns.clone())
        .connect(app, None)
        .await
        .unwrap();
    Testbed::assert_echo(direct, MIB).await;
    nothing_lands_on(&outbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_inbound_is_tproxied_to_15006_and_15008_and_a_spoofed_v6_source_gets_its_replies() {
    let bed = Testbed::new(2, 1);
    let server_ns = bed.netns(Place::Pod(2, 1));
    let server6 = bed.pod_ip6(2, 1);
    let client6 = bed.pod_ip6(1, 1);
    let app = bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(server6, 8080),
        |mut stream, _| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        },
    );
    let whoami = bed.serve(
        Place::Pod(2, 1),
        SocketAddr::new(server6, 9000),
        |mut stream, peer| {
            Box::pin(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(format!("{peer}\n").as_bytes()).await;
                let _ = stream.shutdown().await;
            })
        },
    );
    install(&server_ns);

    // No listener yet: the tproxy finds no socket and the drop after it keeps the app closed.
    let fails_closed = tokio::time::timeout(Duration::from_secs(2), bed.connect_from(1, 1, app));
    assert!(
        !matches!(fails_closed.await, Ok(Ok(_))),
        "v6 plaintext reached the app with no ztund listening"
    );

    let inbound = listen6(&server_ns, 15006);
    let hbone = listen6(&server_ns, 15008);
    let client = bed
        .connect_from(1, 1, app)
        .await
        .expect("connect is answered by 15006");
    let (captured, peer) = accepted(&inbound).await;
    assert_eq!(captured.local_addr().unwrap(), app);
    assert_eq!(original_destination(&captured).unwrap(), app);
    assert_eq!(peer.ip(), client6);

    let upstream = ztund_sockets(server_ns.clone())
        .connect(app, Some(client6))
        .await
        .expect("spoofed-source v6 connect to the app");
    assert_eq!(upstream.local_addr().unwrap().ip(), client6);
    let relay = tokio::spawn(async move {
        let (mut a, mut b) = (captured, upstream);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    Testbed::assert_echo(client, MIB).await;
    relay.abort();

    let mut seen = ztund_sockets(server_ns.clone())
        .connect(whoami, Some(client6))
        .await
        .unwrap();
    let mut line = String::new();
    seen.read_to_string(&mut line).await.unwrap();
    assert!(line.starts_with(&format!("[{client6}]:")), "app saw {line}");
    nothing_lands_on(&inbound).await;

    let hbone_addr = SocketAddr::new(server6, 15008);
    let _c = bed.connect_from(1, 1, hbone_addr).await.unwrap();
    let (s, peer) = accepted(&hbone).await;
    assert_eq!(s.local_addr().unwrap(), hbone_addr);
    assert_eq!(peer.ip(), client6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_redirects_v6_mesh_destinations_from_their_own_set() {
    let bed = Testbed::new(2, 1);
    let host = bed.netns(Place::Node(1));
    let remote = SocketAddr::new(bed.pod_ip6(2, 1), 8080);
    let outside = SocketAddr::new(bed.node_ip6(2), 8081);
    for addr in [remote, outside] {
        let place = if addr == remote {
            Place::Pod(2, 1)
        } else {
            Place::Node(2)
        };
        bed.serve(place, addr, |mut stream, _| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        });
    }
    nft::install_host_redirection(&host, &HostRedirection::default(), &[remote.ip()]).unwrap();
    let set = bed.run_in(
        Place::Node(1),
        &["nft", "list", "set", "inet", "ztund", "mesh_destinations6"],
    );
    assert!(set.contains(&remote.ip().to_string()), "{set}");
    let outbound = listen6(&host, 15001);

    let _c = bed
        .app_sockets(Place::Node(1))
        .connect(remote, None)
        .await
        .unwrap();
    let (captured, _) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), remote);

    let plain = bed
        .app_sockets(Place::Node(1))
        .connect(outside, None)
        .await
        .unwrap();
    Testbed::assert_echo(plain, 64 * 1024).await;
    nothing_lands_on(&outbound).await;

    nft::remove_redirection(&host).unwrap();
    assert!(!nft::redirection_installed(&host).unwrap());
    assert!(
        bed.run_in(
            Place::Node(1),
            &["ip", "-6", "rule", "show", "pref", "32764"]
        )
        .trim()
        .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_with_ipv6_disabled_takes_the_rules_with_ipv4_routing_only() {
    let bed = Testbed::new(2, 1);
    bed.disable_ipv6(1, 1).expect("disabling IPv6");
    let ns = bed.netns(Place::Pod(1, 1));
    assert!(!ztund::net::ipv6_enabled(Some(&ns)));
    assert!(ztund::net::ipv6_enabled(Some(&bed.netns(Place::Pod(2, 1)))));
    install(&ns);
    install(&ns);
    assert!(nft::redirection_installed(&ns).unwrap());
    assert!(
        bed.run_in(
            Place::Pod(1, 1),
            &["ip", "-4", "rule", "show", "pref", "32764"]
        )
        .contains("lookup 100")
    );
    let app = bed.echo_server(2, 1, 8080);
    let outbound = ztund_sockets(ns.clone())
        .listener(SocketAddr::from(([0, 0, 0, 0], 15001)), true)
        .unwrap();
    let _c = bed.connect_from(1, 1, app).await.unwrap();
    let (captured, _) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), app);
    nft::remove_redirection(&ns).expect("removing with IPv6 disabled");
    assert!(!nft::redirection_installed(&ns).unwrap());
}
