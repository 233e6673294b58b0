//! The three decisions the data path asks for, as pure functions of (policies, facts): is this
//! inbound connection authorized, which mTLS mode guards this inbound port, and how does a client
//! reach this destination port.

use std::ops::ControlFlow;
use std::sync::Arc;

use super::authorization::{Action, ConnectionFacts};
use super::destination_rule::{DestinationRule, OutboundTls};
use super::peer_authentication::{EffectiveMode, PeerAuthentication};
use super::{Decision, PolicySet};
use crate::mesh::Workload;

/// The verdict on a connection to `workload` (§4.2): any matching DENY denies, naming the policy;
/// without ALLOW policies the connection is allowed; else one ALLOW must match. Dry-run policies
/// are only logged. PeerAuthentication STRICT is enforced here through its DENY policies.
pub fn authorize(policies: &PolicySet, workload: &Workload, conn: &ConnectionFacts) -> Decision {
    let facts = conn.facts();
    let mut allow_policies = false;
    let mut allowed = false;
    let verdict = policies.each_candidate(workload, |policy, because| {
        if policy.dry_run {
            if policy.matches_facts(&facts) {
                tracing::info!(
                    policy = %policy.key(),
                    action = %policy.action,
                    workload = %workload.uid,
                    "dry-run policy matched; not enforced"
                );
            }
            return ControlFlow::Continue(());
        }
        match policy.action {
            Action::Deny if policy.matches_facts(&facts) => {
                ControlFlow::Break(deny_reason(&policy.key(), because))
            }
            Action::Deny => ControlFlow::Continue(()),
            Action::Allow => {
                allow_policies = true;
                // Once allowed, only DENY policies can still change the verdict.
                if !allowed && policy.matches_facts(&facts) {
                    allowed = true;
                }
                ControlFlow::Continue(())
            }
        }
    });
    match verdict {
        ControlFlow::Break(reason) => Decision::Deny(reason),
        ControlFlow::Continue(()) if !allow_policies || allowed => Decision::Allow,
        ControlFlow::Continue(()) => Decision::Deny(format!(
            "allow policies exist, but none allowed (ALLOW policies: {})",
            allow_keys(policies, workload).join(", ")
        )),
    }
}

/// The enforced ALLOW policies of a workload, for the denial's log line (the deny path only).
fn allow_keys(policies: &PolicySet, workload: &Workload) -> Vec<String> {
    let mut keys = Vec::new();
    let _ = policies.each_candidate(workload, |policy, _| {
        if policy.action == Action::Allow && !policy.dry_run {
            keys.push(policy.key());
        }
        ControlFlow::<()>::Continue(())
    });
    keys.sort();
    keys.dedup();
    keys
}

fn deny_reason(key: &str, because: Option<&PeerAuthentication>) -> String {
    match because {
        Some(pa) => format!(
            "explicitly denied by: {key} (PeerAuthentication {} requires mTLS)",
            pa.key()
        ),
        None => format!("explicitly denied by: {key}"),
    }
}

/// The inbound mTLS mode of a workload's target port: workload > namespace > mesh, the oldest
/// document within a level, UNSET inheriting, PERMISSIVE when nothing says otherwise;
/// `portLevelMtls` of the workload's document decides its ports.
pub fn inbound_mtls_mode(policies: &PolicySet, workload: &Workload, port: u16) -> EffectiveMode {
    effective(policies.levels(workload).port(port))
}

/// The workload's mode for ports without a port-level setting.
pub fn workload_mtls_mode(policies: &PolicySet, workload: &Workload) -> EffectiveMode {
    effective(policies.levels(workload).base())
}

fn effective(
    (mode, decided_by): (super::InboundMode, Option<&PeerAuthentication>),
) -> EffectiveMode {
    EffectiveMode {
        mode,
        decided_by: decided_by.map(PeerAuthentication::key),
    }
}

/// How a client in `client_namespace` reaches `host` (a service of `service_namespace`) on the
/// service port `port`: the DestinationRule found by [`destination_rule_for`] decides, with its
/// `portLevelSettings` over its `trafficPolicy`; no rule means HBONE.
pub fn outbound_tls(
    policies: &PolicySet,
    client_namespace: &str,
    host: &str,
    service_namespace: &str,
    port: u16,
) -> OutboundTls {
    match destination_rule_for(policies, client_namespace, host, service_namespace) {
        Some(rule) => rule.outbound(port),
        None => OutboundTls::Hbone,
    }
}

/// The DestinationRule for a host: the client's namespace first, then the service's, then the
/// root namespace; within a namespace an exact host before the longest `*.` wildcard.
pub fn destination_rule_for<'a>(
    policies: &'a PolicySet,
    client_namespace: &str,
    host: &str,
    service_namespace: &str,
) -> Option<&'a Arc<DestinationRule>> {
    let index = &*policies.index;
    [
        client_namespace,
        service_namespace,
        index.root_namespace.as_str(),
    ]
    .into_iter()
    .find_map(|namespace| index.destination_rules.get(namespace)?.find(host))
}
