//! AuthorizationPolicy → `Authorization`, the way istiod converts it for ztunnel (PROTOCOL.md
//! §4.1): each rule one Rule; its `to` entries one Clause, its `from` entries another, each `when`
//! its own. HTTP attributes cannot be seen at L4: a rule using them is dropped from an ALLOW policy
//! and keeps only its L4 part in a DENY policy (more restrictive), as istiod converts them for
//! ztunnel. One difference, on purpose: an entry made only of HTTP attributes (`to: [{operation:
//! {methods: [GET]}}]`, a `when` on `request.headers`) becomes an empty match in istiod's
//! conversion, which ztunnel skips, so such a DENY rule never matches there (it fails open). Here
//! the ignored entry matches anything, so the DENY rule denies on the rest of its conditions.
//! Policies with `targetRef(s)` belong to waypoints and are skipped.

use super::node::Node;
use super::{Meta, SecurityDocument, selector};
use crate::policy::{
    Action, Authorization, Cidr, Clause, Match, PolicyError, Rule, Scope, ServiceAccountMatch,
    StringMatch,
};

const OPERATION_L4: &[&str] = &["ports", "notPorts"];
const OPERATION_L7: &[&str] = &[
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
const SOURCE_L4: &[&str] = &[
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
];
/// `remoteIpBlocks` is the client address from X-Forwarded-For or PROXY: not known at L4.
const SOURCE_L7: &[&str] = &[
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

pub(super) fn read(
    spec: &Node<'_>,
    meta: Meta,
    root_namespace: &str,
) -> Result<SecurityDocument, PolicyError> {
    spec.mapping(&[
        "selector",
        "action",
        "rules",
        "provider",
        "targetRef",
        "targetRefs",
    ])?;
    for key in ["targetRef", "targetRefs"] {
        if let Some(target) = spec.field(key).optional() {
            tracing::warn!(
                doc = %target.doc,
                field = %target.path,
                "policy targets a waypoint or gateway; Istio does not send it to ztunnel, so it is skipped"
            );
            return Ok(SecurityDocument::Skipped);
        }
    }
    let action_node = spec.field("action");
    let action = match action_node.optional() {
        None => Action::Allow,
        Some(node) => match node.str()? {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            unsupported @ ("AUDIT" | "CUSTOM") => {
                return Err(node.invalid(format!(
                    "{unsupported} is not supported at L4: ztund enforces only ALLOW and DENY"
                )));
            }
            other => {
                return Err(
                    node.invalid(format!("unknown action {other:?}; expected ALLOW or DENY"))
                );
            }
        },
    };
    let selector = selector(spec)?;
    let scope = match (&selector, meta.namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let mut rules = Vec::new();
    let mut not_enforced = Vec::new();
    for rule in spec.field("rules").list()? {
        if let Some(rule) = read_rule(&rule, action, &meta.namespace, &mut not_enforced)? {
            rules.push(rule);
        }
    }
    let policy = Authorization {
        name: meta.name,
        namespace: meta.namespace,
        scope,
        action,
        rules,
        dry_run: meta.dry_run,
        not_enforced,
    };
    Ok(SecurityDocument::AuthorizationPolicy { policy, selector })
}

/// One rule; `None` when an ALLOW rule must be dropped for its HTTP attributes. What was not
/// enforced, and how the rule was applied instead, is added to `not_enforced`.
fn read_rule(
    rule: &Node<'_>,
    action: Action,
    namespace: &str,
    not_enforced: &mut Vec<String>,
) -> Result<Option<Rule>, PolicyError> {
    rule.mapping(&["from", "to", "when"])?;
    let mut http = Vec::new();
    let mut clauses = Vec::new();
    let sections: [(&str, &str, &[&str], &[&str]); 2] = [
        ("to", "operation", OPERATION_L4, OPERATION_L7),
        ("from", "source", SOURCE_L4, SOURCE_L7),
    ];
    for (section, inner, l4, l7) in sections {
        let entries = rule.field(section).list()?;
        if entries.is_empty() {
            continue;
        }
        let mut matches = Vec::new();
        // An entry with only HTTP attributes matches anything once they are ignored, and so
        // does the whole clause (its entries are ORed).
        let mut matches_anything = false;
        for entry in entries {
            entry.mapping(&[inner])?;
            let body = entry.field(inner);
            let body = body.optional().ok_or_else(|| {
                body.invalid(format!("missing: each `{section}` entry needs a {inner}"))
            })?;
            let known: Vec<&str> = l4.iter().chain(l7).copied().collect();
            body.mapping(&known)?;
            let found = present(&body, l7)?;
            let m = if section == "to" {
                operation(&body)?
            } else {
                source(&body, namespace)?
            };
            if m.is_empty() {
                if found.is_empty() {
                    return Err(body.invalid(format!(
                        "empty {inner}: set at least one of {}",
                        l4.join(", ")
                    )));
                }
                matches_anything = true;
            }
            http.extend(found.into_iter().map(|f| format!("{}.{f}", body.path)));
            matches.push(m);
        }
        if !matches_anything {
            clauses.push(Clause { matches });
        }
    }
    for condition in rule.field("when").list()? {
        match when(&condition)? {
            Some(m) => clauses.push(Clause { matches: vec![m] }),
            None => http.push(format!(
                "{} ({})",
                condition.path,
                condition.field("key").str()?
            )),
        }
    }
    if http.is_empty() {
        return Ok(Some(Rule { clauses }));
    }
    let applied = match action {
        Action::Allow => "ALLOW rule dropped: it allows nothing",
        Action::Deny => "DENY rule enforced on its L4 part only: it denies more",
    };
    not_enforced.push(format!("{}: {} ({applied})", rule.path, http.join(", ")));
    match action {
        Action::Allow => {
            tracing::warn!(
                doc = %rule.doc,
                field = %rule.path,
                http = %http.join(", "),
                "rule uses HTTP attributes ztund cannot see; dropped from this ALLOW policy (it allows nothing)"
            );
            Ok(None)
        }
        Action::Deny => {
            tracing::warn!(
                doc = %rule.doc,
                field = %rule.path,
                http = %http.join(", "),
                "rule uses HTTP attributes ztund cannot see; this DENY rule is enforced on its L4 part only (more restrictive)"
            );
            Ok(Some(Rule { clauses }))
        }
    }
}

/// Which of `fields` are set to a non-empty list.
fn present(body: &Node<'_>, fields: &[&str]) -> Result<Vec<String>, PolicyError> {
    let mut found = Vec::new();
    for field in fields {
        if !body.field(field).strings()?.is_empty() {
            found.push(field.to_string());
        }
    }
    Ok(found)
}

fn operation(op: &Node<'_>) -> Result<Match, PolicyError> {
    Ok(Match {
        destination_ports: ports(&op.field("ports"))?,
        not_destination_ports: ports(&op.field("notPorts"))?,
        ..Match::default()
    })
}

fn source(src: &Node<'_>, namespace: &str) -> Result<Match, PolicyError> {
    Ok(Match {
        principals: patterns(&src.field("principals"))?,
        not_principals: patterns(&src.field("notPrincipals"))?,
        namespaces: patterns(&src.field("namespaces"))?,
        not_namespaces: patterns(&src.field("notNamespaces"))?,
        source_ips: cidrs(&src.field("ipBlocks"))?,
        not_source_ips: cidrs(&src.field("notIpBlocks"))?,
        service_accounts: service_accounts(&src.field("serviceAccounts"), namespace)?,
        not_service_accounts: service_accounts(&src.field("notServiceAccounts"), namespace)?,
        ..Match::default()
    })
}

/// A `when` condition as one match; `None` for keys only HTTP knows.
fn when(condition: &Node<'_>) -> Result<Option<Match>, PolicyError> {
    condition.mapping(&["key", "values", "notValues"])?;
    let key_node = condition.field("key");
    let key = key_node
        .optional()
        .ok_or_else(|| key_node.invalid("missing: each condition needs a key"))?
        .str()?;
    let (values, not_values) = (condition.field("values"), condition.field("notValues"));
    if values.list()?.is_empty() && not_values.list()?.is_empty() {
        return Err(condition.invalid("needs values or notValues"));
    }
    let mut m = Match::default();
    match key {
        "source.ip" => {
            m.source_ips = cidrs(&values)?;
            m.not_source_ips = cidrs(&not_values)?;
        }
        "destination.ip" => {
            m.destination_ips = cidrs(&values)?;
            m.not_destination_ips = cidrs(&not_values)?;
        }
        "source.namespace" => {
            m.namespaces = patterns(&values)?;
            m.not_namespaces = patterns(&not_values)?;
        }
        "source.principal" => {
            m.principals = patterns(&values)?;
            m.not_principals = patterns(&not_values)?;
        }
        "destination.port" => {
            m.destination_ports = ports(&values)?;
            m.not_destination_ports = ports(&not_values)?;
        }
        _ => {
            values.strings()?;
            not_values.strings()?;
            return Ok(None);
        }
    }
    Ok(Some(m))
}

fn patterns(list: &Node<'_>) -> Result<Vec<StringMatch>, PolicyError> {
    Ok(list
        .strings()?
        .iter()
        .map(|v| StringMatch::from_pattern(v))
        .collect())
}

fn ports(list: &Node<'_>) -> Result<Vec<u16>, PolicyError> {
    list.list()?.iter().map(Node::port).collect()
}

fn cidrs(list: &Node<'_>) -> Result<Vec<Cidr>, PolicyError> {
    list.list()?
        .iter()
        .map(|item| {
            let text = item.str()?;
            text.parse::<Cidr>()
                .map_err(|e| item.invalid(e.to_string()))
        })
        .collect()
}

/// `sa` (in the policy's namespace) or `ns/sa`.
fn service_accounts(
    list: &Node<'_>,
    namespace: &str,
) -> Result<Vec<ServiceAccountMatch>, PolicyError> {
    list.list()?
        .iter()
        .map(|item| {
            let text = item.str()?;
            let (ns, sa) = text.split_once('/').unwrap_or((namespace, text));
            if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                return Err(item.invalid(format!(
                    "{text:?} is not a service account (`name` or `namespace/name`)"
                )));
            }
            Ok(ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            })
        })
        .collect()
}
