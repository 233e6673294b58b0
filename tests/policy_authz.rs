//! AuthorizationPolicy enforced end to end by two real daemons: DENY by principal, ALLOW by
//! namespace, by port, by `when`, DENY by ipBlocks. Every denial leaves the app untouched, gives
//! the HBONE client a 401 (a non-zero SOCKS5 reply) or closes the plaintext connection, and the
//! access log names the policy. A policy applied while connections are open closes the ones it
//! now denies, HBONE and plaintext alike, and no further byte reaches the app.
//! Every case runs twice, `<case>::ipv4` and `<case>::ipv6` (`on_both_families!`): the v6 world
//! has only v6 workload, service and client addresses.

mod policy_world;
mod support;
mod testbed;

use std::time::Duration;

use policy_world::*;

on_both_families!(
    deny_by_principal,
    allow_by_namespace_then_by_port_then_by_when,
    deny_by_ip_block_closes_that_plaintext_source_only,
    a_policy_applied_while_connections_are_open_closes_the_ones_it_denies,
);

fn ap(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n{spec}"
    )
}

async fn deny_by_principal(fam: Family) {
    let policy = ap(
        "deny-sleep",
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]\n",
    );
    let w = World::of_family(fam, &[&policy]).await;
    assert_mesh_denied(&w, fam.sleep(), 9000, "default/deny-sleep").await;
    assert_mesh_allowed(&w, fam.foo(), 9000).await;
}

async fn allow_by_namespace_then_by_port_then_by_when(fam: Family) {
    let by_namespace = ap(
        "from-foo",
        "  rules: [{from: [{source: {namespaces: [foo]}}]}]\n",
    );
    let w = World::of_family(fam, &[&by_namespace]).await;
    assert_mesh_allowed(&w, fam.foo(), 9000).await;
    assert_mesh_denied(&w, fam.sleep(), 9000, "default/from-foo").await;

    let by_port = ap(
        "port-9001",
        "  rules: [{to: [{operation: {ports: ['9001']}}]}]\n",
    );
    w.apply(&[&by_port]).await;
    assert_mesh_allowed(&w, fam.sleep(), 9001).await;
    assert_mesh_denied(&w, fam.sleep(), 9000, "default/port-9001").await;

    let by_when = ap(
        "when-foo",
        "  rules: [{when: [{key: source.principal, values: [cluster.local/ns/foo/sa/foo]}]}]\n",
    );
    w.apply(&[&by_when]).await;
    assert_mesh_allowed(&w, fam.foo(), 9001).await;
    assert_mesh_denied(&w, fam.sleep(), 9001, "default/when-foo").await;
}

async fn deny_by_ip_block_closes_that_plaintext_source_only(fam: Family) {
    let policy = ap(
        "no-foo-ip",
        &format!(
            "  action: DENY\n  rules: [{{from: [{{source: {{ipBlocks: ['{}']}}}}]}}]\n",
            fam.host_cidr(fam.foo())
        ),
    );
    let w = World::of_family(fam, &[&policy]).await;
    let mut denied = w.plaintext(fam.foo(), addr(fam.echo(), 9000)).await;
    assert!(!echoes(&mut denied).await, "the blocked address was served");
    assert_eq!(w.echo.accepted(), 0, "a denied client reached the app");
    let line = log_line(&w.node2, &["connection refused", "inbound_plaintext"]).await;
    assert!(
        line.contains("default/no-foo-ip") && line.contains(fam.foo()),
        "{line}"
    );
    let mut allowed = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(echoes(&mut allowed).await, "another address was refused");
}

async fn a_policy_applied_while_connections_are_open_closes_the_ones_it_denies(fam: Family) {
    let w = World::of_family(fam, &[]).await;
    let mut hbone_sleep = w
        .mesh_client(fam.sleep(), addr(fam.echo(), 9000))
        .await
        .expect("sleep");
    let mut hbone_foo = w
        .mesh_client(fam.foo(), addr(fam.echo(), 9000))
        .await
        .expect("foo");
    let mut plain = w.plaintext(fam.foo(), addr(fam.echo(), 9001)).await;
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
