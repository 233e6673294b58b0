//! The standalone redirection in real namespaces with real nftables: outbound capture to 15001
//! with the original destination, the mark that lets ztund's own sockets through, inbound
//! plaintext onto the transparent 15006 listener, spoofed-source delivery to the app with replies
//! coming back, clean removal, and the host-mode variant in a node namespace.

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

fn listen(netns: &Arc<Netns>, port: u16) -> TcpListener {
    ztund_sockets(netns.clone())
        .listener(SocketAddr::from(([0, 0, 0, 0], port)), true)
        .unwrap_or_else(|e| panic!("listening on {port}: {e}"))
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
async fn outbound_lands_on_15001_with_the_original_destination_and_the_mark_bypasses_it() {
    let bed = Testbed::new(2, 1);
    let app = bed.echo_server(2, 1, 8080);
    let client_ns = bed.netns(Place::Pod(1, 1));
    install(&client_ns);
    let outbound = listen(&client_ns, 15001);

    let _app_side = bed
        .connect_from(1, 1, app)
        .await
        .expect("connect is answered by 15001");
    let (captured, peer) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), app);
    assert_eq!(peer.ip(), bed.pod_ip(1, 1));

    // ztund's own socket (mark 0x539) goes straight to the destination.
    let direct = ztund_sockets(client_ns.clone())
        .connect(app, None)
        .await
        .unwrap();
    Testbed::assert_echo(direct, MIB).await;
    nothing_lands_on(&outbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_plaintext_lands_on_15006_and_the_app_sees_the_client_through_a_spoofed_source() {
    let bed = Testbed::new(2, 1);
    let server_ns = bed.netns(Place::Pod(2, 1));
    let app = bed.echo_server(2, 1, 8080);
    let whoami = bed.whoami_server(2, 1, 9000);
    install(&server_ns);
    let inbound = listen(&server_ns, 15006);
    let hbone = listen(&server_ns, 15008);
    let client_ip = bed.pod_ip(1, 1);

    // A plaintext client: its connection is held by ztund's transparent listener.
    let client = bed
        .connect_from(1, 1, app)
        .await
        .expect("connect is answered by 15006");
    let (captured, peer) = accepted(&inbound).await;
    assert_eq!(captured.local_addr().unwrap(), app);
    assert_eq!(original_destination(&captured).unwrap(), app);
    assert_eq!(peer.ip(), client_ip);

    // ztund forwards it to the app from the client's address; the replies come back.
    let upstream = ztund_sockets(server_ns.clone())
        .connect(app, Some(client_ip))
        .await
        .expect("spoofed-source connect to the app");
    assert_eq!(upstream.local_addr().unwrap().ip(), client_ip);
    let relay = tokio::spawn(async move {
        let (mut a, mut b) = (captured, upstream);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    Testbed::assert_echo(client, MIB).await;
    relay.abort();

    let mut seen = ztund_sockets(server_ns.clone())
        .connect(whoami, Some(client_ip))
        .await
        .unwrap();
    let mut line = String::new();
    seen.read_to_string(&mut line).await.unwrap();
    assert!(line.starts_with(&format!("{client_ip}:")), "app saw {line}");
    nothing_lands_on(&inbound).await;

    // HBONE reaches 15008 as it is.
    let hbone_addr = SocketAddr::new(bed.pod_ip(2, 1), 15008);
    let _c = bed.connect_from(1, 1, hbone_addr).await.unwrap();
    let (s, _) = accepted(&hbone).await;
    assert_eq!(s.local_addr().unwrap(), hbone_addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_removal_restores_direct_traffic() {
    let bed = Testbed::new(2, 1);
    let app = bed.echo_server(2, 1, 8080);
    let ns = bed.netns(Place::Pod(1, 1));
    assert!(!nft::redirection_installed(&ns).unwrap());
    install(&ns);
    install(&ns);
    assert!(nft::redirection_installed(&ns).unwrap());
    for family in ["-4", "-6"] {
        let rules = bed.run_in(
            Place::Pod(1, 1),
            &["ip", family, "rule", "show", "pref", "32764"],
        );
        assert_eq!(
            rules.lines().count(),
            1,
            "one {family} reply rule after two installs:\n{rules}"
        );
    }
    let tables = bed.run_in(Place::Pod(1, 1), &["nft", "list", "tables"]);
    assert_eq!(tables.matches("ztund").count(), 1, "{tables}");

    nft::remove_redirection(&ns).unwrap();
    nft::remove_redirection(&ns).expect("removing twice is fine");
    assert!(!nft::redirection_installed(&ns).unwrap());
    for family in ["-4", "-6"] {
        assert_eq!(
            bed.run_in(
                Place::Pod(1, 1),
                &["ip", family, "rule", "show", "pref", "32764"]
            ),
            ""
        );
        let routes = bed.try_run_in(
            Place::Pod(1, 1),
            &["ip", family, "route", "show", "table", "100"],
        );
        assert!(routes.unwrap_or_default().trim().is_empty());
    }

    let outbound = listen(&ns, 15001);
    let direct = bed.connect_from(1, 1, app).await.unwrap();
    Testbed::assert_echo(direct, MIB).await;
    nothing_lands_on(&outbound).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_captures_the_hosts_own_traffic_and_leaves_forwarded_traffic_alone() {
    let bed = Testbed::new(2, 1);
    let host = bed.netns(Place::Node(1));
    let remote = bed.echo_server(2, 1, 8080);
    // Only mesh destinations are redirected: `remote` is one, node 2's own address is not.
    nft::install_host_redirection(&host, &HostRedirection::default(), &[remote.ip()]).unwrap();
    let outside = bed.serve(
        Place::Node(2),
        SocketAddr::new(bed.node_ip(2), 8081),
        |mut stream, _| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        },
    );
    let outbound = listen(&host, 15001);
    let inbound = listen(&host, 15006);
    let ssh = bed
        .app_sockets(Place::Node(1))
        .listener(SocketAddr::new(bed.node_ip(1), 22), false)
        .unwrap();

    // A host process calling out lands on 15001.
    let _c = bed
        .app_sockets(Place::Node(1))
        .connect(remote, None)
        .await
        .unwrap();
    let (captured, _) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), remote);

    // A destination outside the mesh is not redirected.
    let plain = bed
        .app_sockets(Place::Node(1))
        .connect(outside, None)
        .await
        .unwrap();
    Testbed::assert_echo(plain, 64 * 1024).await;
    nothing_lands_on(&outbound).await;

    // ztund's own marked socket passes.
    let direct = ztund_sockets(host.clone())
        .connect(remote, None)
        .await
        .unwrap();
    Testbed::assert_echo(direct, 64 * 1024).await;

    // A peer calling a host service lands on 15006 with the service address as destination.
    let service = SocketAddr::new(bed.node_ip(1), 7000);
    let _c = bed.connect_from(2, 1, service).await.unwrap();
    let (captured, peer) = accepted(&inbound).await;
    assert_eq!(captured.local_addr().unwrap(), service);
    assert_eq!(peer.ip(), bed.pod_ip(2, 1));

    // The exempt port reaches the host's own listener.
    let _c = bed
        .connect_from(2, 1, SocketAddr::new(bed.node_ip(1), 22))
        .await
        .unwrap();
    accepted(&ssh).await;

    // Pod traffic routed through the host is not the host's: untouched.
    let through = bed.connect_from(1, 1, remote).await.unwrap();
    Testbed::assert_echo(through, MIB).await;
    nothing_lands_on(&outbound).await;
    nothing_lands_on(&inbound).await;

    nft::remove_redirection(&host).unwrap();
    assert!(!nft::redirection_installed(&host).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listeners_take_redirected_ipv4_with_v4_addresses() {
    let bed = Testbed::new(2, 1);
    let app = bed.echo_server(2, 1, 8080);
    let client_ns = bed.netns(Place::Pod(1, 1));
    let server_ns = bed.netns(Place::Pod(2, 1));
    install(&client_ns);
    install(&server_ns);
    let any6 = |port| SocketAddr::from(([0u16; 8], port));
    let outbound = ztund_sockets(client_ns.clone())
        .listener(any6(15001), true)
        .unwrap();
    let inbound = ztund_sockets(server_ns.clone())
        .listener(any6(15006), true)
        .unwrap();

    let _app_side = bed.connect_from(1, 1, app).await.unwrap();
    let (captured, _) = accepted(&outbound).await;
    assert_eq!(original_destination(&captured).unwrap(), app);

    // ztund's outbound connection (marked) meets the destination pod's inbound capture.
    let _upstream = ztund_sockets(client_ns.clone())
        .connect(app, None)
        .await
        .unwrap();
    let (captured, peer) = accepted(&inbound).await;
    assert_eq!(original_destination(&captured).unwrap(), app);
    assert_eq!(ztund::net::canonical(peer).ip(), bed.pod_ip(1, 1));
}
