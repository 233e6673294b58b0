//! The held state across updates: a response's bad resources refused by name while its good
//! ones apply, removals, the last good version kept through a rejected update or malformed
//! protobuf, and workloads that share an address.

use prost_types::Any;

use super::tests::{ip, state_with};
use super::*;
use crate::proto::istio::workload as pb;
use crate::xds::convert::tests::*;

#[test]
fn a_response_with_bad_resources_applies_the_good_ones_and_names_each_bad_one() {
    let good = workload_resource(pb_workload("default", "good", [10, 0, 0, 1]), "1");
    let mut five = pb_workload("default", "five", [10, 0, 0, 2]);
    five.addresses = vec![vec![1, 2, 3, 4, 5]];
    let mut enumerated = pb_workload("default", "enum", [10, 0, 0, 3]);
    enumerated.tunnel_protocol = 42;
    let mut keyless = pb_workload("default", "keyless", [10, 0, 0, 4]);
    keyless
        .services
        .insert("no-slash".into(), Default::default());
    let mut huge = pb_workload("default", "huge", [10, 0, 0, 5]);
    huge.canonical_name = "x".repeat(convert::MAX_RESOURCE_BYTES);
    let mut wrong_type = workload_resource(pb_workload("default", "wrongtype", [10, 0, 0, 6]), "1");
    if let Some(body) = wrong_type.resource.as_mut() {
        body.type_url = type_url::AUTHORIZATION.into();
    }
    let undecodable = raw(
        &uid("default", "garbage"),
        "1",
        Any {
            type_url: type_url::ADDRESS.into(),
            value: vec![0x0a, 0xff],
        },
    );
    let service = service_resource(pb_service("default", "echo", [10, 96, 0, 1], 80, 8080), "1");

    let mut state = XdsState::new();
    let rejected = state.apply(
        type_url::ADDRESS,
        vec![
            good,
            workload_resource(five, "1"),
            workload_resource(enumerated, "1"),
            workload_resource(keyless, "1"),
            workload_resource(huge, "1"),
            wrong_type,
            undecodable,
            service,
        ],
        vec![],
    );
    let names: Vec<&str> = rejected.iter().map(|(name, _)| name.as_str()).collect();
    let expected: Vec<String> = ["five", "enum", "keyless", "huge", "wrongtype", "garbage"]
        .iter()
        .map(|n| uid("default", n))
        .collect();
    assert_eq!(names, expected);
    for (name, reason) in &rejected {
        assert!(reason.contains(name.as_str()), "{reason}");
    }
    assert!(
        rejected[0]
            .1
            .ends_with("addresses[0]: 5 bytes, expected 4 or 16")
    );
    assert!(
        rejected[1]
            .1
            .ends_with("tunnel_protocol: unknown enum value 42")
    );
    assert!(rejected[2].1.ends_with("key is not namespace/hostname"));
    assert!(rejected[3].1.contains("over the 4194304-byte cap"));
    assert!(rejected[4].1.contains("type_url"));
    assert!(rejected[5].1.contains("undecodable"));

    let versions = state.versions(type_url::ADDRESS);
    let mut held: Vec<&str> = versions.keys().map(String::as_str).collect();
    held.sort();
    assert_eq!(
        held,
        [
            "Kubernetes//Pod/default/good",
            "default/echo.default.svc.cluster.local"
        ],
        "rejected names are left out of the versions"
    );
    let snapshot = state.snapshot(None, ROOT);
    assert!(snapshot.workload_by_ip(ip("10.0.0.1")).is_some());
    let echo = snapshot
        .service_by_vip(ip("10.96.0.1"))
        .expect("service applied");
    assert_eq!(echo.port(80).map(|p| p.target_port), Some(8080));
}

// HARDENING X6 (a removal of a name never held changes nothing)
#[test]
fn removals_drop_workloads_and_services_by_their_names() {
    let mut endpoint = pb_workload("default", "echo", [10, 0, 0, 1]);
    endpoint.services.insert(
        "default/echo.default.svc.cluster.local".into(),
        pb::PortList {
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
        },
    );
    let mut state = state_with(
        type_url::ADDRESS,
        vec![
            workload_resource(endpoint, "1"),
            workload_resource(pb_workload("default", "other", [10, 0, 0, 2]), "1"),
            service_resource(pb_service("default", "echo", [10, 96, 0, 1], 80, 80), "1"),
        ],
    );
    let snapshot = state.snapshot(None, ROOT);
    let service = snapshot.service_by_vip(ip("10.96.0.1")).expect("service");
    assert_eq!(snapshot.endpoints(service).len(), 1);
    assert!(state.take_changed());

    let rejected = state.apply(
        type_url::ADDRESS,
        vec![],
        vec![
            uid("default", "echo"),
            "default/echo.default.svc.cluster.local".into(),
            "never/held".into(),
        ],
    );
    assert!(rejected.is_empty());
    assert!(state.take_changed());
    let snapshot = state.snapshot(None, ROOT);
    assert!(snapshot.workload_by_ip(ip("10.0.0.1")).is_none());
    assert!(snapshot.service_by_vip(ip("10.96.0.1")).is_none());
    assert!(snapshot.workload_by_ip(ip("10.0.0.2")).is_some());
    assert_eq!(state.provenance().workloads.len(), 1);
    assert!(state.provenance().services.is_empty());
}

// HARDENING X2 (a policy with an unknown action is rejected and the held one stays)
#[test]
fn a_rejected_update_keeps_the_last_good_version() {
    let mut state = state_with(
        type_url::ADDRESS,
        vec![workload_resource(
            pb_workload("default", "w", [10, 0, 0, 1]),
            "v1",
        )],
    );
    state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(static_strict(), "v1")],
        vec![],
    );
    assert!(state.take_changed());

    let mut broken = pb_workload("default", "w", [10, 0, 0, 2]);
    broken.addresses.push(vec![9; 5]);
    let mut bad_policy = static_strict();
    bad_policy.action = 5;
    let rejected = state.apply(
        type_url::ADDRESS,
        vec![workload_resource(broken, "v2")],
        vec![],
    );
    assert_eq!(rejected.len(), 1);
    let rejected = state.apply(
        type_url::AUTHORIZATION,
        vec![authorization_resource(bad_policy, "v2")],
        vec![],
    );
    assert_eq!(rejected.len(), 1);
    assert!(!state.take_changed(), "nothing changed");

    let w = uid("default", "w");
    assert_eq!(state.versions(type_url::ADDRESS)[&w], "v1");
    let strict = "istio-system/istio_converted_static_strict";
    assert_eq!(state.versions(type_url::AUTHORIZATION)[strict], "v1");
    let snapshot = state.snapshot(None, ROOT);
    assert!(snapshot.workload_by_ip(ip("10.0.0.1")).is_some());
    assert!(snapshot.workload_by_ip(ip("10.0.0.2")).is_none());
    assert_eq!(snapshot.policies.authorizations().count(), 1);
}

// HARDENING X6 (an unknown type_url, with additions and removals, changes nothing)
#[test]
fn unsubscribed_types_are_ignored_and_resends_change_nothing() {
    let resource = workload_resource(pb_workload("default", "w", [10, 0, 0, 1]), "1");
    let mut state = state_with(type_url::ADDRESS, vec![resource.clone()]);
    assert!(state.take_changed());
    let unknown = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    assert!(
        state
            .apply(unknown, vec![resource.clone()], vec!["x".into()])
            .is_empty()
    );
    assert!(state.versions(unknown).is_empty());
    assert!(
        state
            .apply(type_url::ADDRESS, vec![resource], vec![])
            .is_empty()
    );
    assert!(
        !state.take_changed(),
        "the same value again is not a change"
    );
}

/// The bytes of a message holding `depth` nested groups of an unknown field (999): a decoder
/// that recursed without a limit would follow them all.
fn nested_groups(depth: usize) -> Vec<u8> {
    let start = [0xbb, 0x3e]; // (999 << 3) | 3, StartGroup
    let end = [0xbc, 0x3e]; // (999 << 3) | 4, EndGroup
    let mut bytes = Vec::new();
    (0..depth).for_each(|_| bytes.extend_from_slice(&start));
    (0..depth).for_each(|_| bytes.extend_from_slice(&end));
    bytes
}

// HARDENING X1
#[test]
fn malformed_protobuf_is_rejected_by_name_and_the_held_version_keeps_serving() {
    let name = uid("default", "w");
    let mut state = state_with(
        type_url::ADDRESS,
        vec![workload_resource(
            pb_workload("default", "w", [10, 0, 0, 1]),
            "1",
        )],
    );
    let body = |value: Vec<u8>| {
        raw(
            &name,
            "2",
            Any {
                type_url: type_url::ADDRESS.into(),
                value,
            },
        )
    };
    let mut bad_utf8 = workload_resource(pb_workload("default", "w", [10, 0, 0, 2]), "2");
    if let Some(any) = bad_utf8.resource.as_mut() {
        let at = any
            .value
            .windows(1)
            .position(|w| w == b"w")
            .expect("the name's bytes");
        any.value[at] = 0xff;
    }
    let cases = [
        (body(vec![0x0a, 0xff]), "varint"),
        (body(vec![0x08, 0x01]), "wire type"),
        (bad_utf8, "UTF-8"),
        (body(nested_groups(101)), "recursion limit"),
    ];
    for (resource, what) in cases {
        let rejected = state.apply(type_url::ADDRESS, vec![resource], vec![]);
        assert_eq!(rejected.len(), 1, "{what}: {rejected:?}");
        let (rejected_name, reason) = &rejected[0];
        assert_eq!(rejected_name, &name);
        assert!(
            reason.contains("undecodable istio.workload.Address"),
            "{what}: {reason}"
        );
        assert!(
            reason.to_lowercase().contains(&what.to_lowercase()),
            "{what}: {reason}"
        );
        let snapshot = state.snapshot(None, ROOT);
        assert!(
            snapshot.workload_by_ip(ip("10.0.0.1")).is_some(),
            "{what}: the held version keeps serving"
        );
        assert_eq!(state.versions(type_url::ADDRESS)[&name], "1");
    }
    // Under prost's limit of 100 the same groups are skipped as unknown fields.
    let shallow = state.apply(type_url::ADDRESS, vec![body(nested_groups(90))], vec![]);
    assert!(
        shallow[0].1.ends_with("neither a workload nor a service"),
        "{shallow:?}"
    );
}

// HARDENING X5
#[test]
fn two_workloads_on_one_ip_resolve_the_same_in_any_order_and_a_moved_uid_leaves_no_stale_entry() {
    let at = |name: &str, ip: [u8; 4], version: &str| {
        workload_resource(pb_workload("default", name, ip), version)
    };
    let owner = |state: &XdsState, addr: &str| {
        state
            .snapshot(None, ROOT)
            .workload_by_ip(ip(addr))
            .map(|w| w.name.clone())
    };
    let one_response = state_with(
        type_url::ADDRESS,
        vec![at("a", [10, 0, 0, 7], "1"), at("b", [10, 0, 0, 7], "1")],
    );
    let reversed = state_with(
        type_url::ADDRESS,
        vec![at("b", [10, 0, 0, 7], "1"), at("a", [10, 0, 0, 7], "1")],
    );
    let mut apart = state_with(type_url::ADDRESS, vec![at("b", [10, 0, 0, 7], "1")]);
    apart.apply(type_url::ADDRESS, vec![at("a", [10, 0, 0, 7], "1")], vec![]);
    let winner = owner(&one_response, "10.0.0.7").expect("one of them");
    assert_eq!(owner(&reversed, "10.0.0.7").as_ref(), Some(&winner));
    assert_eq!(owner(&apart, "10.0.0.7").as_ref(), Some(&winner));
    // Both stay known by uid; removing the winner hands the IP to the other.
    let snapshot = apart.snapshot(None, ROOT);
    assert!(snapshot.workload_by_uid(&uid("default", "a")).is_some());
    assert!(snapshot.workload_by_uid(&uid("default", "b")).is_some());
    apart.apply(type_url::ADDRESS, vec![], vec![uid("default", &winner)]);
    let other = if winner == "a" { "b" } else { "a" };
    assert_eq!(owner(&apart, "10.0.0.7").as_deref(), Some(other));

    // A uid that moves to another IP is found only at the new one.
    let mut moving = state_with(type_url::ADDRESS, vec![at("m", [10, 0, 0, 8], "1")]);
    moving.apply(type_url::ADDRESS, vec![at("m", [10, 0, 0, 9], "2")], vec![]);
    assert_eq!(owner(&moving, "10.0.0.8"), None, "no stale entry");
    assert_eq!(owner(&moving, "10.0.0.9").as_deref(), Some("m"));
    // The same name twice in one response: one workload, indexed by one address only.
    let twice = state_with(
        type_url::ADDRESS,
        vec![at("d", [10, 0, 0, 10], "1"), at("d", [10, 0, 0, 11], "2")],
    );
    let snapshot = twice.snapshot(None, ROOT);
    assert_eq!(snapshot.workloads().len(), 1);
    let held =
        owner(&twice, "10.0.0.10").is_some() as u8 + owner(&twice, "10.0.0.11").is_some() as u8;
    assert_eq!(held, 1, "exactly one of the two addresses is indexed");
}
