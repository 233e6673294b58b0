//! HARDENING.md §8 `xds_resources`: bytes as one xDS resource (`istio.workload.Address`,
//! `istio.security.Authorization` or ztund's DestinationRule) through ztund's conversion. The
//! input is `[kind, flags, protobuf...]`; flag bit 0 names the resource after its content so the
//! name check passes, bit 1 sends a wrong type_url. A converted resource carries no enum value
//! ztund does not know, and the name it is stored under is the one its content implies; a
//! rejected one names itself in the error (the NACK text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost_types::Any;
use ztund::proto::istio::security as pb_sec;
use ztund::proto::istio::workload as pb;
use ztund::proto::type_url;
use ztund::proto::ztund::config::v1 as pb_ztund;
use ztund::xds::RawResource;
use ztund::xds::convert::{self, Address};

fuzz_target!(|data: &[u8]| {
    let [kind, flags, body @ ..] = data else {
        return;
    };
    let by_content = flags & 1 != 0;
    let url = |right: &str| match flags & 2 {
        0 => right.to_string(),
        _ => "type.googleapis.com/istio.workload.Workload".to_string(),
    };
    match kind % 3 {
        0 => address(body, by_content, url(type_url::ADDRESS)),
        1 => authorization(body, by_content, url(type_url::AUTHORIZATION)),
        _ => destination_rule(body, by_content, url(type_url::DESTINATION_RULE)),
    }
});

fn raw(name: String, type_url: String, body: &[u8]) -> RawResource {
    RawResource {
        name,
        version: "1".into(),
        resource: Some(Any {
            type_url,
            value: body.to_vec(),
        }),
    }
}

fn rejected_names_itself(error: &convert::ConvertError, name: &str) {
    assert_eq!(error.resource().name, name);
    assert!(
        error.to_string().contains(name),
        "{error} does not name {name:?}"
    );
}

fn address(body: &[u8], by_content: bool, type_url: String) {
    let decoded = pb::Address::decode(body).ok();
    let name = match decoded.as_ref().and_then(|a| a.r#type.as_ref()) {
        Some(pb::address::Type::Workload(w)) if by_content => w.uid.clone(),
        Some(pb::address::Type::Service(s)) if by_content => {
            format!("{}/{}", s.namespace, s.hostname)
        }
        _ => "fuzzed".to_string(),
    };
    let resource = raw(name.clone(), type_url, body);
    let converted = match convert::address(&resource) {
        Ok(converted) => converted,
        Err(e) => return rejected_names_itself(&e, &name),
    };
    let decoded = decoded.expect("converted, so it decodes");
    match (converted, decoded.r#type) {
        (Address::Workload(w), Some(pb::address::Type::Workload(pw))) => {
            assert_eq!(w.uid, name, "stored under another name than its uid");
            let tunnel = pb::TunnelProtocol::try_from(pw.tunnel_protocol);
            assert!(
                matches!(
                    tunnel,
                    Ok(pb::TunnelProtocol::Hbone | pb::TunnelProtocol::None)
                ),
                "accepted tunnel_protocol {}",
                pw.tunnel_protocol
            );
            assert!(
                pb::WorkloadStatus::try_from(pw.status).is_ok(),
                "accepted status {}",
                pw.status
            );
            assert_eq!(
                w.addresses.len(),
                pw.addresses.len(),
                "addresses dropped or added"
            );
            let id =
                ztund::identity::SpiffeId::new(&w.trust_domain, &w.namespace, &w.service_account);
            assert!(
                id.is_ok(),
                "{} accepted with an invalid identity: {id:?}",
                w.uid
            );
        }
        (Address::Service(s), Some(pb::address::Type::Service(ps))) => {
            assert_eq!(ztund::mesh::service_key(&s), name);
            assert!(s.vips.len() <= ps.addresses.len());
            assert_eq!(s.ports.len(), ps.ports.len());
            assert!(
                s.ports.iter().all(|p| p.target_port != 0),
                "a target port 0"
            );
        }
        (converted, decoded) => panic!("{converted:?} converted from {decoded:?}"),
    }
}

fn authorization(body: &[u8], by_content: bool, type_url: String) {
    let decoded = pb_sec::Authorization::decode(body).ok();
    let name = match &decoded {
        Some(a) if by_content => format!("{}/{}", a.namespace, a.name),
        _ => "fuzzed".to_string(),
    };
    let resource = raw(name.clone(), type_url, body);
    let converted = match convert::authorization(&resource) {
        Ok(converted) => converted,
        Err(e) => return rejected_names_itself(&e, &name),
    };
    let decoded = decoded.expect("converted, so it decodes");
    assert_eq!(converted.key(), name);
    assert!(
        pb_sec::Scope::try_from(decoded.scope).is_ok(),
        "accepted scope {}",
        decoded.scope
    );
    assert!(
        pb_sec::Action::try_from(decoded.action).is_ok(),
        "accepted action {}",
        decoded.action
    );
    assert_eq!(
        converted.rules.len(),
        decoded.rules.len(),
        "rules dropped or added"
    );
    for (rule, pb_rule) in converted.rules.iter().zip(&decoded.rules) {
        assert_eq!(
            rule.clauses.len(),
            pb_rule.clauses.len(),
            "clauses dropped or added"
        );
        for (clause, pb_clause) in rule.clauses.iter().zip(&pb_rule.clauses) {
            assert_eq!(
                clause.matches.len(),
                pb_clause.matches.len(),
                "matches dropped"
            );
            for (m, pm) in clause.matches.iter().zip(&pb_clause.matches) {
                // A dropped entry would widen (not_*) or narrow a policy without a word.
                assert_eq!(m.principals.len(), pm.principals.len());
                assert_eq!(m.not_principals.len(), pm.not_principals.len());
                assert_eq!(m.namespaces.len(), pm.namespaces.len());
                assert_eq!(m.not_namespaces.len(), pm.not_namespaces.len());
                assert_eq!(m.source_ips.len(), pm.source_ips.len());
                assert_eq!(m.not_source_ips.len(), pm.not_source_ips.len());
                assert_eq!(m.destination_ips.len(), pm.destination_ips.len());
                assert_eq!(m.not_destination_ips.len(), pm.not_destination_ips.len());
                assert_eq!(m.destination_ports.len(), pm.destination_ports.len());
                assert_eq!(
                    m.not_destination_ports.len(),
                    pm.not_destination_ports.len()
                );
            }
        }
    }
}

fn destination_rule(body: &[u8], by_content: bool, type_url: String) {
    let decoded = pb_ztund::DestinationRule::decode(body).ok();
    let name = match &decoded {
        Some(d) if by_content => format!("{}/{}", d.namespace, d.name),
        _ => "fuzzed".to_string(),
    };
    let resource = raw(name.clone(), type_url, body);
    match convert::destination_rule(&resource) {
        Ok(rule) => {
            assert_eq!(format!("{}/{}", rule.namespace, rule.name), name);
            assert!(!rule.namespace.is_empty());
        }
        Err(e) => rejected_names_itself(&e, &name),
    }
}
