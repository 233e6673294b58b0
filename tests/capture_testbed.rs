//! The testbed itself, before any ztund: pods reach each other across nodes and on one node,
//! bytes arrive intact, and every namespace is gone after the guard drops.

mod testbed;

use std::path::Path;

use testbed::{Place, Testbed};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_across_nodes_and_on_one_node() {
    let bed = Testbed::new(2, 2);
    let remote = bed.echo_server(2, 1, 8080);
    let neighbour = bed.echo_server(1, 2, 8080);

    let across = bed
        .connect_from(1, 1, remote)
        .await
        .expect("pod 1/1 → pod 2/1");
    assert_eq!(across.local_addr().unwrap().ip(), bed.pod_ip(1, 1));
    Testbed::assert_echo(across, MIB).await;

    let same_node = bed
        .connect_from(1, 1, neighbour)
        .await
        .expect("pod 1/1 → pod 1/2");
    Testbed::assert_echo(same_node, MIB).await;

    // The app sees the client pod's own address: no NAT anywhere in the testbed.
    let whoami = bed.whoami_server(2, 2, 9000);
    let mut stream = bed.connect_from(1, 2, whoami).await.unwrap();
    let mut line = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut line)
        .await
        .unwrap();
    assert!(
        line.starts_with(&format!("{}:", bed.pod_ip(1, 2))),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_pods_and_a_closed_port_is_refused() {
    let bed = Testbed::new(2, 1);
    let app = bed.echo_server(2, 1, 8080);
    let from_node = bed
        .app_sockets(Place::Node(1))
        .connect(app, None)
        .await
        .unwrap();
    Testbed::assert_echo(from_node, 4096).await;
    let closed = std::net::SocketAddr::new(bed.pod_ip(2, 1), 8081);
    let err = bed.connect_from(1, 1, closed).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn dropping_the_testbed_deletes_every_namespace_also_on_panic() {
    let names: Vec<String>;
    {
        let bed = Testbed::new(1, 1);
        names = [Place::Switch, Place::Node(1), Place::Pod(1, 1)]
            .into_iter()
            .map(|p| bed.netns_name(p))
            .collect();
        for name in &names {
            assert!(
                Path::new("/var/run/netns").join(name).exists(),
                "{name} missing"
            );
        }
        assert!(
            bed.run_in(Place::Pod(1, 1), &["ip", "-brief", "addr"])
                .contains("10.201.1.2/32")
        );
    }
    for name in &names {
        assert!(
            !Path::new("/var/run/netns").join(name).exists(),
            "{name} left behind"
        );
    }

    let mut leaked = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = Testbed::new(1, 0);
        leaked.push(bed.netns_name(Place::Node(1)));
        panic!("test failure inside the testbed");
    }));
    assert!(outcome.is_err());
    assert!(!Path::new("/var/run/netns").join(&leaked[0]).exists());
}

#[test]
fn spawned_processes_run_inside_the_pod_and_die_with_the_guard() {
    let bed = Testbed::new(1, 1);
    let mut command = std::process::Command::new("ip");
    command
        .args(["-brief", "addr", "show", "eth0"])
        .stdout(std::process::Stdio::piped());
    let mut shown = bed.spawn_in(Place::Pod(1, 1), command);
    let output = shown.child().stdout.take().unwrap();
    let text = std::io::read_to_string(output).unwrap();
    assert!(text.contains("10.201.1.2/32"), "{text}");

    let mut sleeper = std::process::Command::new("sleep");
    sleeper.arg("30");
    let guard = bed.spawn_in(Place::Node(1), sleeper);
    let pid = guard.id();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(guard);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} still running"
    );
}
