//! Table-driven tests of the policy engine, reading the YAML users write: authorization
//! verdicts, inbound mTLS precedence, outbound DestinationRule lookup, and reading errors.

mod authorize;
mod mtls;
mod outbound;
mod reading;

use std::net::IpAddr;

use serde::Deserialize;

use crate::identity::SpiffeId;
use crate::mesh::{DocRef, HealthStatus, RawDocument, TunnelProtocol, Workload};
use crate::policy::{ConnectionFacts, PolicyError, PolicySet};

pub(crate) const ROOT: &str = "istio-system";

/// Splits a multi-document YAML string the way the mesh-file reader does.
pub(crate) fn documents(yaml: &str) -> Vec<RawDocument> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde_norway::Value::deserialize(d).expect("test YAML parses"))
        .filter(|v| !v.is_null())
        .enumerate()
        .map(|(i, body)| {
            let text = |path: &[&str]| {
                let mut v = &body;
                for key in path {
                    v = &v[*key];
                }
                v.as_str().map(str::to_string)
            };
            RawDocument {
                doc: DocRef {
                    file: "mesh.yaml".to_string(),
                    index: i + 1,
                    kind: text(&["kind"]).unwrap_or_default(),
                    namespace: text(&["metadata", "namespace"]).unwrap_or_else(|| "default".into()),
                    name: text(&["metadata", "name"]).unwrap_or_default(),
                },
                api_version: text(&["apiVersion"]).unwrap_or_default(),
                body,
            }
        })
        .collect()
}

pub(crate) fn policies(yaml: &str) -> PolicySet {
    crate::mesh::k8s::security::policy_set(&documents(yaml), ROOT)
        .unwrap_or_else(|e| panic!("policies should load: {e}"))
}

pub(crate) fn load_error(yaml: &str) -> PolicyError {
    match crate::mesh::k8s::security::policy_set(&documents(yaml), ROOT) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(e) => e,
    }
}

/// A pod `ns/name` with service account `sa`, address `ip` and labels `k=v,…`.
pub(crate) fn workload(ns: &str, name: &str, sa: &str, ip: &str, labels: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.to_string(),
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        trust_domain: "cluster.local".to_string(),
        labels: labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vec![ip.parse().expect("test IP")],
        node: "node-1".to_string(),
        tunnel: TunnelProtocol::Hbone,
        status: HealthStatus::Healthy,
        netns: None,
        creation_timestamp: None,
        authorization_policies: Vec::new(),
        service_ports: Default::default(),
        identity_cache: Default::default(),
    }
}

/// A connection from `src` (identity `ns/sa` or plaintext) to `dst:port`.
pub(crate) fn conn(src: &str, id: Option<&str>, dst: &str, port: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_ip: src.parse::<IpAddr>().expect("test IP"),
        source_identity: id.map(|id| {
            let (ns, sa) = id.split_once('/').expect("ns/sa");
            SpiffeId::new("cluster.local", ns, sa).expect("test id")
        }),
        destination_ip: dst.parse().expect("test IP"),
        destination_port: port,
    }
}
