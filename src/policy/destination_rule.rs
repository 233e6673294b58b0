//! DestinationRule: how a client reaches a destination host (HBONE, plaintext, or TLS it
//! originates), and the host index that finds the rule for a (namespace, host). Knows nothing
//! about YAML or sockets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use super::peer_authentication::CreationTime;

/// `spec.host` of a DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// A fully qualified name.
    Exact(String),
    /// `*.example.com` (stored as `.example.com`), or `*` alone (stored as the empty string).
    Wildcard(String),
    /// A short name (`reviews`) in the rule's namespace: matches `reviews.<ns>.svc.<domain>`.
    ShortName { prefix: String },
}

impl HostMatch {
    /// Reads a host as written in a rule of `namespace`.
    pub fn parse(host: &str, namespace: &str) -> HostMatch {
        if host == "*" {
            HostMatch::Wildcard(String::new())
        } else if let Some(suffix) = host.strip_prefix('*') {
            HostMatch::Wildcard(suffix.to_string())
        } else if !host.contains('.') {
            HostMatch::ShortName {
                prefix: format!("{host}.{namespace}.svc."),
            }
        } else {
            HostMatch::Exact(host.to_string())
        }
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(exact) => host == exact,
            HostMatch::Wildcard(suffix) => {
                host.ends_with(suffix.as_str()) && host.len() > suffix.len()
            }
            HostMatch::ShortName { prefix } => host.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Exact(host) => f.write_str(host),
            HostMatch::Wildcard(suffix) => write!(f, "*{suffix}"),
            HostMatch::ShortName { prefix } => write!(f, "{prefix}*"),
        }
    }
}

/// `tls.mode` of a DestinationRule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// A DestinationRule's `tls` block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `None` only when the block sets no mode; then it changes nothing.
    pub mode: Option<TlsMode>,
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub sni: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

/// One DestinationRule, reduced to what ztund acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    pub host: HostMatch,
    /// `trafficPolicy.tls`.
    pub tls: Option<TlsSettings>,
    /// `trafficPolicy.portLevelSettings[].tls` by service port; overrides `tls` for that port.
    pub port_tls: BTreeMap<u16, TlsSettings>,
    pub created: Option<CreationTime>,
}

impl DestinationRule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The TLS settings in force for a service port.
    pub fn tls_for(&self, port: u16) -> Option<&TlsSettings> {
        self.port_tls.get(&port).or(self.tls.as_ref())
    }

    /// What a client does for this port under this rule.
    pub fn outbound(&self, port: u16) -> OutboundTls {
        match self.tls_for(port) {
            Some(tls) => tls.outbound(),
            None => OutboundTls::Hbone,
        }
    }
}

impl TlsSettings {
    fn outbound(&self) -> OutboundTls {
        let mutual = match self.mode {
            None | Some(TlsMode::IstioMutual) => return OutboundTls::Hbone,
            Some(TlsMode::Disable) => return OutboundTls::Plain,
            Some(TlsMode::Simple) => false,
            Some(TlsMode::Mutual) => true,
        };
        OutboundTls::Originate(TlsOrigination {
            ca_certificates: self.ca_certificates.clone(),
            client_certificate: self.client_certificate.clone(),
            private_key: self.private_key.clone(),
            sni: self.sni.clone(),
            subject_alt_names: self.subject_alt_names.clone(),
            insecure_skip_verify: self.insecure_skip_verify,
            mutual,
        })
    }
}

/// How a client's connection to a destination port leaves the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundTls {
    /// The mesh default (ISTIO_MUTUAL, or no rule): HBONE to destinations with a ztund in front.
    Hbone,
    /// DISABLE: plain TCP.
    Plain,
    /// SIMPLE or MUTUAL: ztund originates TLS to the destination itself.
    Originate(TlsOrigination),
}

impl fmt::Display for OutboundTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboundTls::Hbone => f.write_str("HBONE (ISTIO_MUTUAL)"),
            OutboundTls::Plain => f.write_str("plaintext (DISABLE)"),
            OutboundTls::Originate(tls) if tls.mutual => f.write_str("TLS origination (MUTUAL)"),
            OutboundTls::Originate(_) => f.write_str("TLS origination (SIMPLE)"),
        }
    }
}

/// TLS that ztund originates towards a destination (paths are files on the node).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TlsOrigination {
    pub ca_certificates: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub sni: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
    /// MUTUAL: present `client_certificate`/`private_key`.
    pub mutual: bool,
}

/// The DestinationRules of one namespace, by host.
#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    exact: HashMap<String, Arc<DestinationRule>>,
    /// Longest suffix first, so the first hit is the most specific.
    wildcards: Vec<Arc<DestinationRule>>,
    short_names: Vec<Arc<DestinationRule>>,
}

impl HostIndex {
    /// Adds a rule; of two rules for the same host the oldest (then by name) wins.
    pub fn insert(&mut self, rule: Arc<DestinationRule>) {
        let list = match &rule.host {
            HostMatch::Exact(host) => {
                match self.exact.get(host) {
                    Some(existing) if older(existing, &rule) => warn_shadowed(&rule, existing),
                    Some(existing) => {
                        warn_shadowed(existing, &rule);
                        self.exact.insert(host.clone(), rule);
                    }
                    None => {
                        self.exact.insert(host.clone(), rule);
                    }
                }
                return;
            }
            HostMatch::Wildcard(_) => &mut self.wildcards,
            HostMatch::ShortName { .. } => &mut self.short_names,
        };
        if let Some(existing) = list.iter_mut().find(|r| r.host == rule.host) {
            if older(existing, &rule) {
                warn_shadowed(&rule, existing);
            } else {
                warn_shadowed(existing, &rule);
                *existing = rule;
            }
            return;
        }
        list.push(rule);
        self.wildcards.sort_by_key(|r| match &r.host {
            HostMatch::Wildcard(suffix) => std::cmp::Reverse(suffix.len()),
            _ => std::cmp::Reverse(0),
        });
    }

    /// The rule for a host: an exact (or short-name) rule, else the longest matching wildcard.
    pub fn find(&self, host: &str) -> Option<&Arc<DestinationRule>> {
        self.exact
            .get(host)
            .or_else(|| self.short_names.iter().find(|r| r.host.matches(host)))
            .or_else(|| self.wildcards.iter().find(|r| r.host.matches(host)))
    }

    pub fn rules(&self) -> impl Iterator<Item = &Arc<DestinationRule>> {
        self.exact
            .values()
            .chain(self.short_names.iter())
            .chain(self.wildcards.iter())
    }
}

fn older(a: &DestinationRule, b: &DestinationRule) -> bool {
    (a.created, &a.name) <= (b.created, &b.name)
}

fn warn_shadowed(ignored: &DestinationRule, winner: &DestinationRule) {
    tracing::warn!(
        ignored = %ignored.key(),
        winner = %winner.key(),
        host = %winner.host,
        "two DestinationRules for one host in one namespace; the oldest wins"
    );
}
