//! HARDENING.md §8 `yaml_policy`: bytes as a mesh file (Kubernetes YAML: pods, services,
//! AuthorizationPolicies, PeerAuthentications, DestinationRules) through ztund's reader, the
//! same call the daemon makes for the file ([`snapshot_from_text`]). Time and memory stay
//! bounded (libFuzzer's `-timeout` and `-rss_limit_mb`), and a mesh that is accepted is one
//! whose every workload is found by each of its addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztund::mesh::{MeshSettings, snapshot_from_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(snapshot) = snapshot_from_text("fuzz.yaml", text, &MeshSettings::default()) else {
        return;
    };
    for workload in snapshot.workloads() {
        for ip in &workload.addresses {
            let found = snapshot
                .workload_by_ip(*ip)
                .expect("every address is indexed");
            assert!(found.addresses.contains(ip));
        }
        // Reading validated every part of the identity (model.rs relies on it).
        let id = ztund::identity::SpiffeId::new(
            &workload.trust_domain,
            &workload.namespace,
            &workload.service_account,
        );
        assert!(
            id.is_ok(),
            "{} accepted with an invalid identity: {id:?}",
            workload.uid
        );
    }
    for service in snapshot.services() {
        for vip in &service.vips {
            assert!(
                snapshot.service_by_vip(*vip).is_some(),
                "{vip} is not indexed"
            );
        }
    }
});
