//! `ztund check`: the effective policy of every workload and service in a snapshot, as text a
//! person reads: inbound mTLS mode per target port and who decided it, the authorization
//! policies that apply, and each service's outbound TLS mode. Deterministic order. Reading the
//! files and the command line live elsewhere.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::mesh::{Snapshot, Workload};
use crate::policy::{self, EffectiveMode, OutboundTls, PolicySet};

/// The report for one snapshot.
pub fn report(snapshot: &Snapshot) -> String {
    let policies = &snapshot.policies;
    let mut out = String::new();
    let _ = writeln!(out, "root namespace: {}", policies.root_namespace());
    let mut workloads: Vec<_> = snapshot.workloads().iter().collect();
    workloads.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
    for workload in workloads {
        workload_section(&mut out, snapshot, workload);
    }
    let mut services: Vec<_> = snapshot.services().iter().collect();
    services.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.hostname).cmp(&(&b.namespace, &b.name, &b.hostname))
    });
    for service in services {
        let _ = writeln!(
            out,
            "\nservice {}/{} ({})",
            service.namespace, service.name, service.hostname
        );
        let _ = writeln!(
            out,
            "  outbound TLS from a client in {}:",
            service.namespace
        );
        let rule = policy::destination_rule_for(
            policies,
            &service.namespace,
            &service.hostname,
            &service.namespace,
        );
        let by = rule.map_or_else(
            || "no DestinationRule".to_string(),
            |r| format!("DestinationRule {}", r.key()),
        );
        let mut ports: Vec<u16> = service.ports.iter().map(|p| p.port).collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            let _ = writeln!(out, "    (no ports)");
        }
        for port in ports {
            let tls = policy::outbound_tls(
                policies,
                &service.namespace,
                &service.hostname,
                &service.namespace,
                port,
            );
            let _ = writeln!(out, "    port {port}: {tls}{} ({by})", origination(&tls));
        }
    }
    out
}

fn workload_section(out: &mut String, snapshot: &Snapshot, workload: &Workload) {
    let policies = &snapshot.policies;
    let _ = writeln!(
        out,
        "\nworkload {}/{} ({}) on node {:?}",
        workload.namespace,
        workload.name,
        workload.identity(),
        workload.node
    );
    let _ = writeln!(out, "  inbound mTLS:");
    // Target port → the service ports that lead to it.
    let mut targets: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for service in snapshot.services_of(workload) {
        for port in &service.ports {
            targets
                .entry(port.target_port)
                .or_default()
                .push(format!("{}:{}", service.hostname, port.port));
        }
    }
    for (port, via) in &mut targets {
        via.sort();
        via.dedup();
        let mode = policy::inbound_mtls_mode(policies, workload, *port);
        let _ = writeln!(
            out,
            "    port {port} (via {}): {}",
            via.join(", "),
            describe(&mode)
        );
    }
    let other = policy::workload_mtls_mode(policies, workload);
    let label = if targets.is_empty() {
        "all ports"
    } else {
        "other ports"
    };
    let _ = writeln!(out, "    {label}: {}", describe(&other));
    authorization_lines(out, policies, workload);
}

fn authorization_lines(out: &mut String, policies: &PolicySet, workload: &Workload) {
    let _ = writeln!(out, "  authorization:");
    let applicable = policies.applicable(workload);
    if applicable.is_empty() {
        let _ = writeln!(out, "    (no policies: every connection is allowed)");
        return;
    }
    for (policy, because) in &applicable {
        let mut line = format!("    {:<5} {}", policy.action.to_string(), policy.key());
        if let Some(pa) = because {
            let _ = write!(line, " (from PeerAuthentication {pa})");
        }
        if policy.rules.is_empty() {
            line.push_str(" [no rules: matches nothing]");
        }
        if policy.dry_run {
            line.push_str(" [dry-run: logged only]");
        }
        let _ = writeln!(out, "{line}");
        for part in &policy.not_enforced {
            let _ = writeln!(out, "          not enforced at L4: {part}");
        }
    }
}

/// What TLS origination will use, so a wrong path or name shows before traffic does.
fn origination(tls: &OutboundTls) -> String {
    let OutboundTls::Originate(tls) = tls else {
        return String::new();
    };
    let mut parts = Vec::new();
    let mut add = |name: &str, value: &Option<String>| {
        if let Some(value) = value {
            parts.push(format!("{name} {value}"));
        }
    };
    add("sni", &tls.sni);
    add("caCertificates", &tls.ca_certificates);
    add("clientCertificate", &tls.client_certificate);
    add("privateKey", &tls.private_key);
    if !tls.subject_alt_names.is_empty() {
        parts.push(format!(
            "subjectAltNames [{}]",
            tls.subject_alt_names.join(", ")
        ));
    }
    if tls.insecure_skip_verify {
        parts.push("insecureSkipVerify".to_string());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" [{}]", parts.join("; "))
    }
}

fn describe(mode: &EffectiveMode) -> String {
    match &mode.decided_by {
        Some(pa) => format!("{} (PeerAuthentication {pa})", mode.mode),
        None => format!("{} (default: no PeerAuthentication)", mode.mode),
    }
}

#[cfg(test)]
mod tests;
