//! AuthorizationPolicy enforced end to end by two real daemons: DENY by principal, ALLOW by
//! namespace, by port, by `when`, DENY by ipBlocks. Every denial leaves the app untouched, gives
//! the HBONE client a 401 (a non-zero SOCKS5 reply) or closes the plaintext connection, and the
//! access log names the policy. A policy applied while connections are open closes the ones it
//! now denies, HBONE and plaintext alike, and no further byte reaches the app.

mod policy_world;
mod support;
mod testbed;

use std::time::Duration;

use policy_world::*;

fn ap(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n{spec}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_principal() {
    let policy = ap(
        "deny-sleep",
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n",
    );
    let w = World::new(&[&policy]).await;
    assert_mesh_denied(&w, SLEEP, 9000, "default/deny-sleep").await;
    assert_mesh_allowed(&w, FOO, 9000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_by_namespace_then_by_port_then_by_when() {
    let by_namespace = ap(
        "from-foo",
        "  rules: [{from: [{source: {namespaces: [foo]}}]}]\n",
    );
    let w = World::new(&[&by_namespace]).await;
    assert_mesh_allowed(&w, FOO, 9000).await;
    assert_mesh_denied(&w, SLEEP, 9000, "default/from-foo").await;

    let by_port = ap(
        "port-9001",
        "  rules: [{to: [{operation: {ports: ['9001']}}]}]\n",
    );
    w.apply(&[&by_port]).await;
    assert_mesh_allowed(&w, SLEEP, 9001).await;
    assert_mesh_denied(&w, SLEEP, 9000, "default/port-9001").await;

    let by_when = ap(
        "when-foo",
        "  rules: [{when: [{key: source.principal, values: [cluster.local/ns/foo/sa/foo]}]}]\n",
    );
    w.apply(&[&by_when]).await;
    assert_mesh_allowed(&w, FOO, 9001).await;
    assert_mesh_denied(&w, SLEEP, 9001, "default/when-foo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_ip_block_closes_that_plaintext_source_only() {
    let policy = ap(
        "no-foo-ip",
        "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.200.0.11/32]}}]}]\n",
    );
    let w = World::new(&[&policy]).await;
    let mut denied = w.plaintext(FOO, addr(ECHO, 9000)).await;
    assert!(!echoes(&mut denied).await, "the blocked address was served");
    assert_eq!(w.echo.accepted(), 0, "a denied client reached the app");
    let line = log_line(&w.node2, &["connection refused", "inbound_plaintext"]).await;
    assert!(
        line.contains("default/no-foo-ip") && line.contains("10.200.0.11"),
        "{line}"
    );
    let mut allowed = w.plaintext(SLEEP, addr(ECHO, 9000)).await;
    assert!(echoes(&mut allowed).await, "another address was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_while_connections_are_open_closes_the_ones_it_denies() {
    let w = World::new(&[]).await;
    let mut hbone_sleep = w.mesh_client(SLEEP, addr(ECHO, 9000)).await.expect("sleep");
    let mut hbone_foo = w.mesh_client(FOO, addr(ECHO, 9000)).await.expect("foo");
    let mut plain = w.plaintext(FOO, addr(ECHO, 9001)).await;
    for stream in [&mut hbone_sleep, &mut hbone_foo, &mut plain] {
        assert!(echoes(stream).await);
    }
    // The close lines name each client's own address and port.
    let sleep_src = format!("\"src.addr\":\"{}\"", hbone_sleep.local_addr().unwrap());
    let plain_src = format!("\"src.addr\":\"{}\"", plain.local_addr().unwrap());
    let deny_sleep = ap(
        "deny-sleep",
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n",
    );
    let deny_plain = ap(
        "deny-plaintext-9001",
        "  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}], to: [{operation: {ports: ['9001']}}]}]\n",
    );
    w.apply(&[&deny_sleep, &deny_plain]).await;

    assert!(
        is_closed(&mut hbone_sleep).await,
        "the denied HBONE stream stayed open"
    );
    assert!(
        is_closed(&mut plain).await,
        "the denied plaintext connection stayed open"
    );
    let line = log_line(
        &w.node2,
        &[
            "connection closed by policy",
            "default/deny-sleep",
            &sleep_src,
        ],
    )
    .await;
    assert!(
        line.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{line}"
    );
    log_line(
        &w.node2,
        &[
            "connection closed by policy",
            "default/deny-plaintext-9001",
            &plain_src,
        ],
    )
    .await;

    // Nothing written after the close reaches the app; the allowed stream still works.
    let bytes = (w.echo.bytes(), w.echo_9001.bytes());
    use tokio::io::AsyncWriteExt;
    let _ = hbone_sleep.write_all(b"after").await;
    let _ = plain.write_all(b"after").await;
    assert!(echoes(&mut hbone_foo).await, "an allowed stream was closed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        (w.echo.bytes() - 4, w.echo_9001.bytes()),
        bytes,
        "bytes reached the app after the close"
    );
    let metrics = w.bed.run_in(
        testbed::Place::Node(2),
        &["curl", "-s", "http://127.0.0.1:15020/metrics"],
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("policy") && l.contains("deny-sleep")),
        "no policy denial metric:\n{metrics}"
    );
}
