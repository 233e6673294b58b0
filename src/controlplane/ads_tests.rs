//! The Delta xDS protocol of one stream, without a network: what is sent for a subscription,
//! a reconnect's `initial_resource_versions`, a change, an ACK, a NACK, an unknown type.

use std::collections::HashMap;

use prost_types::Any;

use super::*;
use crate::proto::envoy::service::discovery::v3::Resource;
use crate::proto::google::rpc::Status as RpcStatus;
use crate::proto::type_url;

fn resources(authz: &[(&str, &str)]) -> Resources {
    let mut r = Resources::default();
    for t in super::super::translate::TYPES {
        r.by_type.insert(t, Default::default());
    }
    let named = r.by_type.get_mut(type_url::AUTHORIZATION).unwrap();
    for (name, version) in authz {
        named.insert(
            name.to_string(),
            Resource {
                name: name.to_string(),
                version: version.to_string(),
                resource: Some(Any::default()),
                ..Resource::default()
            },
        );
    }
    r
}

fn subscribe(initial: &[(&str, &str)]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url::AUTHORIZATION.into(),
        initial_resource_versions: initial
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn a_wildcard_subscription_gets_everything_then_only_changes() {
    let mut session = Session::new("node1".into());
    let v1 = resources(&[("ns/a", "1"), ("ns/b", "1")]);
    let first = session.on_request(subscribe(&[]), &v1);
    assert_eq!(first.len(), 1);
    assert_eq!(names(&first[0]), ["ns/a", "ns/b"]);
    let ack = DeltaDiscoveryRequest {
        type_url: type_url::AUTHORIZATION.into(),
        response_nonce: first[0].nonce.clone(),
        ..Default::default()
    };
    assert!(
        session.on_request(ack, &v1).is_empty(),
        "an ACK is not answered"
    );

    let v2 = resources(&[("ns/a", "2"), ("ns/c", "1")]);
    let pushed = session.on_change(&v2);
    assert_eq!(pushed.len(), 1);
    assert_eq!(names(&pushed[0]), ["ns/a", "ns/c"]);
    assert_eq!(pushed[0].removed_resources, ["ns/b"]);
    assert!(
        session.on_change(&v2).is_empty(),
        "nothing new, nothing sent"
    );
}

#[test]
fn a_reconnect_gets_only_what_it_does_not_hold() {
    let mut session = Session::new("node1".into());
    let now = resources(&[("ns/a", "1"), ("ns/b", "2")]);
    let first = session.on_request(
        subscribe(&[("ns/a", "1"), ("ns/b", "1"), ("ns/gone", "1")]),
        &now,
    );
    assert_eq!(names(&first[0]), ["ns/b"]);
    assert_eq!(first[0].removed_resources, ["ns/gone"]);
    // Everything held already: the subscription is still answered, empty, so the node can ACK.
    let mut session = Session::new("node1".into());
    let first = session.on_request(subscribe(&[("ns/a", "1"), ("ns/b", "2")]), &now);
    assert_eq!(first.len(), 1);
    assert!(first[0].resources.is_empty() && first[0].removed_resources.is_empty());
}

#[test]
fn a_nack_is_not_answered_with_the_same_version() {
    let mut session = Session::new("node1".into());
    let v1 = resources(&[("ns/a", "1")]);
    let first = session.on_request(subscribe(&[]), &v1);
    let nack = DeltaDiscoveryRequest {
        type_url: type_url::AUTHORIZATION.into(),
        response_nonce: first[0].nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "ns/a: bad".into(),
            details: vec![],
        }),
        ..Default::default()
    };
    assert!(session.on_request(nack, &v1).is_empty());
    assert!(session.on_change(&v1).is_empty());
    let fixed = resources(&[("ns/a", "2")]);
    assert_eq!(names(&session.on_change(&fixed)[0]), ["ns/a"]);
}

#[test]
fn unknown_types_get_nothing_and_named_subscriptions_get_their_names() {
    let mut session = Session::new("node1".into());
    let v1 = resources(&[("ns/a", "1"), ("ns/b", "1")]);
    let unknown = DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    assert!(session.on_request(unknown, &v1).is_empty());
    let named = DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["ns/b".into()],
        ..subscribe(&[])
    };
    assert_eq!(names(&session.on_request(named, &v1)[0]), ["ns/b"]);
    assert!(
        session
            .on_change(&resources(&[("ns/a", "2"), ("ns/b", "1")]))
            .is_empty()
    );
}
