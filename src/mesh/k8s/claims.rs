//! What an address may stand for (HARDENING Y8): no document may claim the unspecified address
//! (which stands for every address), loopback, multicast or broadcast, the node's own address,
//! or an address another document already holds. Identity comes from the peer's certificate
//! alone; a document that could claim these addresses could attach a workload's identity and
//! policy to traffic that is not that workload's.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::MeshError;
use super::fields::Field;
use super::workloads::{ParsedService, ParsedWorkload};
use crate::mesh::model::DocRef;

/// `ip` if a workload, VIP or endpoint may hold it; an error on `field` otherwise.
pub(crate) fn usable_address(field: &Field<'_>, ip: IpAddr) -> Result<IpAddr, MeshError> {
    let canonical = ip.to_canonical();
    let reason = if canonical.is_unspecified() {
        "the unspecified address stands for every address"
    } else if canonical.is_loopback() {
        "a loopback address is the node itself"
    } else if canonical.is_multicast() {
        "a multicast address is no single endpoint"
    } else if canonical == IpAddr::from([255, 255, 255, 255]) {
        "the broadcast address is no single endpoint"
    } else {
        // Held in canonical form: `::ffff:10.1.2.3` is 10.1.2.3 everywhere it is looked up.
        return Ok(canonical);
    };
    Err(field.error(format!("{ip} cannot be claimed: {reason}")))
}

/// Every address belongs to one workload: lookups by IP must not depend on document order.
pub(super) fn check_workload_addresses(
    workloads: &[ParsedWorkload],
) -> Result<HashMap<IpAddr, &DocRef>, MeshError> {
    let mut owners: HashMap<IpAddr, &DocRef> = HashMap::new();
    for parsed in workloads {
        for (ip, field) in &parsed.address_fields {
            if let Some(other) = owners.insert(*ip, &parsed.doc) {
                return Err(MeshError::Conflict {
                    doc: Box::new(parsed.doc.clone()),
                    field: field.clone(),
                    what: format!("address {ip}"),
                    other: Box::new((*other).clone()),
                });
            }
        }
    }
    Ok(owners)
}

/// A VIP names one service and is no workload's address; a hostname names one service per
/// namespace. The entries a single ServiceEntry makes from its hosts may share its addresses.
pub(super) fn check_service_claims(
    services: &[ParsedService],
    workload_owners: &HashMap<IpAddr, &DocRef>,
) -> Result<(), MeshError> {
    let mut vip_owners: HashMap<IpAddr, &DocRef> = HashMap::new();
    let mut host_owners: BTreeMap<(&str, &str), &DocRef> = BTreeMap::new();
    for parsed in services {
        let service = &parsed.service;
        for (vip, field) in &parsed.vip_fields {
            let conflict = |other: &DocRef, what: String| MeshError::Conflict {
                doc: Box::new(parsed.doc.clone()),
                field: field.clone(),
                what,
                other: Box::new((*other).clone()),
            };
            if let Some(owner) = workload_owners.get(vip) {
                return Err(conflict(
                    owner,
                    format!("address {vip} (as a workload address)"),
                ));
            }
            match vip_owners.get(vip) {
                Some(owner) if **owner != parsed.doc => {
                    return Err(conflict(owner, format!("VIP {vip}")));
                }
                _ => {
                    vip_owners.insert(*vip, &parsed.doc);
                }
            }
        }
        let key = (service.namespace.as_str(), service.hostname.as_str());
        if let Some(owner) = host_owners.insert(key, &parsed.doc) {
            return Err(MeshError::Conflict {
                doc: Box::new(parsed.doc.clone()),
                field: parsed.host_field.clone(),
                what: format!(
                    "hostname {} in namespace {}",
                    service.hostname, service.namespace
                ),
                other: Box::new((*owner).clone()),
            });
        }
    }
    Ok(())
}

/// A ServiceEntry address: one IP (a `/32` or `/128` is one IP too); wider ranges are refused.
pub(crate) fn entry_address(field: &Field<'_>) -> Result<IpAddr, MeshError> {
    let text = field.str()?;
    let (ip_text, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip_text
        .parse()
        .map_err(|_| field.error(format!("expected an IP address, got {text:?}")))?;
    let host_prefix = if ip.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => usable_address(field, ip),
        Some(p) if p == host_prefix => usable_address(field, ip),
        Some(_) => Err(field.error(format!(
            "CIDR range {text:?} is not supported; list single addresses"
        ))),
    }
}

/// A node's address (a pod's `status.hostIP`) is the node's, not a workload's; a ServiceEntry
/// endpoint is no workload's address (select workloads with `workloadSelector` instead).
pub(super) fn check_node_and_endpoint_claims(
    workloads: &[ParsedWorkload],
    services: &[ParsedService],
    workload_owners: &HashMap<IpAddr, &DocRef>,
) -> Result<(), MeshError> {
    let mut nodes: HashMap<IpAddr, (&DocRef, &str)> = HashMap::new();
    for parsed in workloads {
        for (ip, field) in &parsed.host_ip_fields {
            nodes.entry(*ip).or_insert((&parsed.doc, field.as_str()));
        }
    }
    let conflict = |doc: &DocRef, field: &str, what: String, other: &DocRef| MeshError::Conflict {
        doc: Box::new(doc.clone()),
        field: field.to_string(),
        what,
        other: Box::new(other.clone()),
    };
    for parsed in workloads {
        for (ip, field) in &parsed.address_fields {
            if let Some((pod, host_field)) = nodes.get(ip) {
                let what = format!("address {ip} (a node's address, as its {host_field})");
                return Err(conflict(&parsed.doc, field, what, pod));
            }
        }
    }
    for parsed in services {
        for (ip, field) in parsed.endpoint_fields.iter().chain(&parsed.vip_fields) {
            if let Some((pod, host_field)) = nodes.get(ip) {
                let what = format!("address {ip} (a node's address, as its {host_field})");
                return Err(conflict(&parsed.doc, field, what, pod));
            }
        }
        for (ip, field) in &parsed.endpoint_fields {
            if let Some(owner) = workload_owners.get(ip) {
                let what = format!(
                    "address {ip} (as a workload address; select mesh workloads with spec.workloadSelector)"
                );
                return Err(conflict(&parsed.doc, field, what, owner));
            }
        }
    }
    Ok(())
}
