//! PeerAuthentication enforced end to end by two real daemons: plaintext refused under STRICT
//! (the app never sees it) and served under PERMISSIVE, mesh clients served under both; the
//! mesh-wide STRICT of the root namespace covers every namespace, a namespace PERMISSIVE
//! overrides it, a workload's `portLevelMtls` opens only its port; the guide's DestinationRule
//! ISTIO_MUTUAL reaches `example-service` over HBONE. Policies change by rewriting the mesh file.
//! Every case runs twice, `<case>::ipv4` and `<case>::ipv6` (`on_both_families!`): the v6 world
//! has only v6 workload, service and client addresses.

mod policy_world;
mod support;
mod testbed;

use policy_world::*;

on_both_families!(
    strict_refuses_plaintext_permissive_serves_it_and_mesh_clients_pass_both,
    the_mesh_wide_strict_covers_every_namespace_until_a_namespace_overrides_it,
    port_level_permissive_opens_only_that_port,
    a_port_exemption_keyed_by_the_service_port_leaves_the_target_port_strict,
    the_guides_destination_rule_reaches_example_service_over_hbone,
);

const PA_BAR_PERMISSIVE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: relaxed, namespace: bar}
spec: {mtls: {mode: PERMISSIVE}}
";

const PA_ECHO_PORT_9001: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-metrics, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
  portLevelMtls:
    9001: {mode: PERMISSIVE}
";

async fn strict_refuses_plaintext_permissive_serves_it_and_mesh_clients_pass_both(fam: Family) {
    let w = World::of_family(fam, &[PA_DEFAULT_STRICT]).await;

    let mut plain = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(!echoes(&mut plain).await, "plaintext served under STRICT");
    let line = log_line(&w.node2, &["connection refused", "inbound_plaintext"]).await;
    assert!(
        line.contains("istio_converted_static_strict") && line.contains("default/default"),
        "the refusal does not name the policy: {line}"
    );
    let mut mesh = w
        .mesh_client(fam.sleep(), addr(fam.echo(), 9000))
        .await
        .expect("a mesh client under STRICT");
    assert!(
        echoes(&mut mesh).await,
        "mesh client not served under STRICT"
    );
    assert_eq!(w.echo.accepted(), 1, "only the mesh client reached the app");

    w.apply(&[PA_DEFAULT_PERMISSIVE]).await;
    let mut plain = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(
        echoes(&mut plain).await,
        "plaintext refused under PERMISSIVE"
    );
    let mut mesh = w
        .mesh_client(fam.sleep(), addr(fam.echo(), 9000))
        .await
        .expect("a mesh client under PERMISSIVE");
    assert!(echoes(&mut mesh).await);
    assert_eq!(w.echo.accepted(), 3);
}

async fn the_mesh_wide_strict_covers_every_namespace_until_a_namespace_overrides_it(fam: Family) {
    let w = World::of_family(fam, &[PA_GLOBAL_STRICT]).await;
    for (target, app) in [
        (addr(fam.echo(), 9000), &w.echo),
        (addr(fam.bar(), 9000), &w.bar),
    ] {
        let mut plain = w.plaintext(fam.sleep(), target).await;
        assert!(!echoes(&mut plain).await, "plaintext to {target} served");
        assert_eq!(app.accepted(), 0, "plaintext reached the app at {target}");
        let mut mesh = w.mesh_client(fam.foo(), target).await.expect("mesh client");
        assert!(echoes(&mut mesh).await, "mesh client to {target} refused");
    }
    let bar = addr(fam.bar(), 9000).to_string();
    let line = log_line(&w.node2, &["connection refused", &bar]).await;
    assert!(line.contains("istio-system/global-mtls"), "{line}");

    w.apply(&[PA_GLOBAL_STRICT, PA_BAR_PERMISSIVE]).await;
    let mut plain = w.plaintext(fam.sleep(), addr(fam.bar(), 9000)).await;
    assert!(
        echoes(&mut plain).await,
        "bar's PERMISSIVE did not override"
    );
    let mut plain = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(
        !echoes(&mut plain).await,
        "default lost the mesh-wide STRICT"
    );
    assert_eq!(w.echo.accepted(), 1, "only the mesh client reached echo");
}

// HARDENING C10 (plaintext to a STRICT pod is exempt only on the exact port named)
async fn port_level_permissive_opens_only_that_port(fam: Family) {
    let w = World::of_family(fam, &[PA_GLOBAL_STRICT, PA_ECHO_PORT_9001]).await;
    let mut open = w.plaintext(fam.sleep(), addr(fam.echo(), 9001)).await;
    assert!(echoes(&mut open).await, "port 9001 is PERMISSIVE");
    let mut closed = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(!echoes(&mut closed).await, "port 9000 stays STRICT");
    assert_eq!(w.echo.accepted(), 0);
    assert_eq!(w.echo_9001.accepted(), 1);
    let echo = addr(fam.echo(), 9000).to_string();
    let line = log_line(&w.node2, &["connection refused", &echo]).await;
    assert!(line.contains("default/echo-metrics"), "{line}");
}

// HARDENING C10 (istio #54146): `portLevelMtls` is keyed by the workload's own (target) port.
// An exemption written with the service's port (80, which targets 9000) exempts nothing.
async fn a_port_exemption_keyed_by_the_service_port_leaves_the_target_port_strict(fam: Family) {
    let keyed_by_service_port = PA_ECHO_PORT_9001.replace("9001: {mode", "80: {mode");
    let w = World::of_family(fam, &[PA_GLOBAL_STRICT, &keyed_by_service_port]).await;
    let mut plain = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(
        !echoes(&mut plain).await,
        "the service port's exemption opened the target port"
    );
    assert_eq!(w.echo.accepted(), 0, "plaintext reached the app");

    let keyed_by_target_port = PA_ECHO_PORT_9001.replace("9001: {mode", "9000: {mode");
    w.apply(&[PA_GLOBAL_STRICT, &keyed_by_target_port]).await;
    let mut plain = w.plaintext(fam.sleep(), addr(fam.echo(), 9000)).await;
    assert!(echoes(&mut plain).await, "the target port's exemption");
    let mut other = w.plaintext(fam.sleep(), addr(fam.echo(), 9001)).await;
    assert!(!echoes(&mut other).await, "port 9001 stays STRICT");
    assert_eq!(w.echo_9001.accepted(), 0);
}

async fn the_guides_destination_rule_reaches_example_service_over_hbone(fam: Family) {
    let w = World::of_family(fam, &[PA_DEFAULT_STRICT, DR_EXAMPLE, PA_GLOBAL_STRICT]).await;
    let mut stream = w
        .mesh_client(fam.sleep(), fam.example_service())
        .await
        .expect("example-service through ztund");
    assert!(echoes(&mut stream).await);
    drop(stream);
    let out = log_line(&w.node1, &["connection complete", "\"outbound\""]).await;
    assert!(out.contains("\"path\":\"hbone\""), "{out}");
    assert!(out.contains(&addr(fam.echo(), 9000).to_string()), "{out}");
    let inbound = log_line(&w.node2, &["connection complete", "\"inbound\""]).await;
    assert!(
        inbound.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{inbound}"
    );
    assert_eq!(w.echo.accepted(), 1);
}
