//! PeerAuthentication: the effective inbound mTLS mode of a workload port (mesh < namespace <
//! workload, oldest first within a level, UNSET inherits), and the DENY policies istiod derives
//! from it for ztunnel (PROTOCOL.md §4.1). Knows nothing about YAML or connections.

use std::collections::BTreeMap;
use std::fmt;

use super::authorization::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use crate::mesh::Labels;

/// Name of the fixed policy that denies connections without a peer identity.
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";

/// Prefix istiod gives the policy converted from a PeerAuthentication with `portLevelMtls`.
pub const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// A mode as written in a PeerAuthentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MtlsMode {
    /// Inherit from the level above.
    #[default]
    Unset,
    Strict,
    Permissive,
    Disable,
}

impl MtlsMode {
    /// The mode in force at this level, if the document sets one.
    pub fn inbound(self) -> Option<InboundMode> {
        match self {
            MtlsMode::Unset => None,
            MtlsMode::Strict => Some(InboundMode::Strict),
            MtlsMode::Permissive => Some(InboundMode::Permissive),
            MtlsMode::Disable => Some(InboundMode::Disable),
        }
    }
}

/// The mode in force for an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InboundMode {
    /// Only mTLS (HBONE) connections; plaintext is refused.
    Strict,
    /// HBONE and plaintext both accepted.
    Permissive,
    /// Written as DISABLE; ambient cannot turn HBONE off, so it acts like PERMISSIVE.
    Disable,
}

impl InboundMode {
    /// Whether plaintext connections are refused.
    pub fn is_strict(self) -> bool {
        self == InboundMode::Strict
    }
}

impl fmt::Display for InboundMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InboundMode::Strict => "STRICT",
            InboundMode::Permissive => "PERMISSIVE",
            InboundMode::Disable => "DISABLE",
        })
    }
}

/// The inbound mode of one workload port and the PeerAuthentication (`ns/name`) that set it;
/// `None` when no document did (the PERMISSIVE default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMode {
    pub mode: InboundMode,
    pub decided_by: Option<String>,
}

/// A `creationTimestamp`, comparable: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CreationTime {
    pub seconds: i64,
    pub nanos: u32,
}

/// One PeerAuthentication document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// `matchLabels`; `None` (or empty) makes it a namespace policy, or the mesh policy in the
    /// root namespace.
    pub selector: Option<Labels>,
    pub mode: MtlsMode,
    /// By target port; only allowed with a selector.
    pub port_level: BTreeMap<u16, MtlsMode>,
    /// Missing counts as older than any time, as Kubernetes' zero time would.
    pub created: Option<CreationTime>,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether it applies to a single set of workloads rather than a namespace.
    pub fn has_selector(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Whether its selector picks a workload with these labels.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Ordering within a level: oldest first, then by name.
    pub(crate) fn age_key(&self) -> (Option<CreationTime>, &str) {
        (self.created, &self.name)
    }

    /// The `ns/name` of the DENY policy converted from this document.
    pub fn converted_key(&self) -> String {
        format!("{}/{CONVERTED_PREFIX}{}", self.namespace, self.name)
    }
}

/// The effective document at each level for one workload (each the oldest of its level).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Levels<'a> {
    pub mesh: Option<&'a PeerAuthentication>,
    pub namespace: Option<&'a PeerAuthentication>,
    pub workload: Option<&'a PeerAuthentication>,
}

/// Which PeerAuthentication-derived policy a workload references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enforcement<'a> {
    /// Not STRICT anywhere: nothing to enforce.
    None,
    /// The static STRICT policy, because of this document.
    StaticStrict(&'a PeerAuthentication),
    /// The policy converted from this workload document (port exceptions).
    Converted(&'a PeerAuthentication),
}

impl<'a> Levels<'a> {
    /// The mode above the workload level: mesh, overridden by namespace unless UNSET.
    pub fn inherited(&self) -> (InboundMode, Option<&'a PeerAuthentication>) {
        let mut result = (InboundMode::Permissive, None);
        for pa in [self.mesh, self.namespace].into_iter().flatten() {
            if let Some(mode) = pa.mode.inbound() {
                result = (mode, Some(pa));
            }
        }
        result
    }

    /// The workload's mode for ports without a port-level setting.
    pub fn base(&self) -> (InboundMode, Option<&'a PeerAuthentication>) {
        match self.workload {
            Some(pa) => match pa.mode.inbound() {
                Some(mode) => (mode, Some(pa)),
                None => self.inherited(),
            },
            None => self.inherited(),
        }
    }

    /// The mode of one target port.
    pub fn port(&self, port: u16) -> (InboundMode, Option<&'a PeerAuthentication>) {
        if let Some(pa) = self.workload
            && let Some(mode) = pa.port_level.get(&port).and_then(|m| m.inbound())
        {
            return (mode, Some(pa));
        }
        self.base()
    }

    /// What the workload references on the wire, per §4.1.
    pub fn enforcement(&self) -> Enforcement<'a> {
        let (base, decided_by) = self.base();
        if let Some(pa) = self.workload
            && port_exceptions(pa, base.is_strict()).next().is_some()
        {
            return Enforcement::Converted(pa);
        }
        match decided_by {
            Some(pa) if base.is_strict() => Enforcement::StaticStrict(pa),
            _ => Enforcement::None,
        }
    }
}

/// The ports whose mode differs from a STRICT (or non-STRICT) base.
fn port_exceptions(pa: &PeerAuthentication, base_strict: bool) -> impl Iterator<Item = u16> + '_ {
    pa.port_level.iter().filter_map(move |(port, mode)| {
        let strict = mode.inbound()?.is_strict();
        (strict != base_strict).then_some(*port)
    })
}

fn no_principal() -> Match {
    Match {
        not_principals: vec![StringMatch::Presence],
        ..Match::default()
    }
}

/// The static STRICT policy: DENY any connection without a peer principal.
pub fn static_strict_policy(root_namespace: &str) -> Authorization {
    Authorization {
        name: STATIC_STRICT_POLICY.to_string(),
        namespace: root_namespace.to_string(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![no_principal()],
            }],
        }],
        dry_run: false,
        not_enforced: Vec::new(),
    }
}

/// The DENY policy for a workload PeerAuthentication with port exceptions, given the mode its
/// workloads inherit from namespace and mesh; `None` when it has none (the static policy or
/// nothing applies then). DISABLE ports are exempt like PERMISSIVE ones.
pub fn convert(pa: &PeerAuthentication, inherited: InboundMode) -> Option<Authorization> {
    if !pa.has_selector() {
        return None;
    }
    let base = pa.mode.inbound().unwrap_or(inherited);
    let exceptions: Vec<u16> = port_exceptions(pa, base.is_strict()).collect();
    if exceptions.is_empty() {
        return None;
    }
    let rules = if base.is_strict() {
        // One rule, all clauses ANDed: no principal, and the port is none of the exempt ones.
        let mut clauses = vec![Clause {
            matches: vec![no_principal()],
        }];
        clauses.extend(exceptions.iter().map(|port| Clause {
            matches: vec![Match {
                not_destination_ports: vec![*port],
                ..Match::default()
            }],
        }));
        vec![Rule { clauses }]
    } else {
        // One rule per strict port: no principal on that port.
        exceptions
            .iter()
            .map(|port| Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![*port],
                        ..no_principal()
                    }],
                }],
            })
            .collect()
    };
    Some(Authorization {
        name: format!("{CONVERTED_PREFIX}{}", pa.name),
        namespace: pa.namespace.clone(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules,
        dry_run: false,
        not_enforced: Vec::new(),
    })
}

/// Parses an RFC 3339 time as Kubernetes writes it (`2024-05-01T10:00:00Z`, optional fraction
/// and offset); `None` if it is not one.
pub fn parse_creation_time(text: &str) -> Option<CreationTime> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' {
        return None;
    }
    if !matches!(bytes[10], b'T' | b't' | b' ') || bytes[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        let padded: String = fraction[..len]
            .chars()
            .chain("000000000".chars())
            .take(9)
            .collect();
        nanos = padded.parse().ok()?;
        rest = &fraction[len..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let hours = rest.get(1..3)?;
            let minutes = rest.get(4..6)?;
            if !(hours.bytes().chain(minutes.bytes())).all(|b| b.is_ascii_digit()) {
                return None;
            }
            sign * (hours.parse::<i64>().ok()? * 3600 + minutes.parse::<i64>().ok()? * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(CreationTime { seconds, nanos })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}
