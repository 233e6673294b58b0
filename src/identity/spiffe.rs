//! SPIFFE workload identities of the one shape Istio uses:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! Anything else is an error; this module knows nothing about certificates.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a string is not a SPIFFE id ztund accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{value:?} does not start with spiffe://")]
    MissingScheme { value: String },
    #[error(
        "{value:?} must have exactly the segments <trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    WrongShape { value: String },
    #[error("{value:?} has an empty {part}")]
    EmptyPart { value: String, part: &'static str },
    #[error("{value:?} has an invalid character in {part}")]
    InvalidCharacter { value: String, part: &'static str },
    /// `.` or `..` as a namespace or service account: a path a normaliser would rewrite.
    #[error("{value:?} has a dot segment as its {part}")]
    DotSegment { value: String, part: &'static str },
    #[error("SPIFFE id of {len} bytes is longer than {max} ({what})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

/// SPIFFE-ID §2.3: an id is at most 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;
/// SPIFFE-ID §2.1: a trust domain is at most 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A workload identity: trust domain, namespace and service account. Shared, not copied: every
/// stream of an HBONE connection and every open connection's policy facts carry its peer's id,
/// so a clone is a reference count, not three strings.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeId")
            .field("trust_domain", &self.0.trust_domain)
            .field("namespace", &self.0.namespace)
            .field("service_account", &self.0.service_account)
            .finish()
    }
}

impl SpiffeId {
    /// Builds an id from its parts, checking each the way parsing would.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The id without its scheme (`td/ns/x/sa/y`): what Istio authorization compares principals with.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    /// Strict: exactly `spiffe://<td>/ns/<ns>/sa/<sa>` in the allowed characters, so no query,
    /// fragment, port, userinfo or %-encoding can appear, and no empty or dot segment.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.len() > MAX_ID_LEN {
            // Not echoed: the point of the cap is not to copy a hostile string around.
            return Err(SpiffeIdError::TooLong {
                what: "the whole id",
                len: value.len(),
                max: MAX_ID_LEN,
            });
        }
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::MissingScheme {
                value: value.to_string(),
            })?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, ns_key, ns, sa_key, sa] = parts.as_slice() else {
            return Err(SpiffeIdError::WrongShape {
                value: value.to_string(),
            });
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(SpiffeIdError::WrongShape {
                value: value.to_string(),
            });
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TooLong {
                what: "the trust domain",
                len: td.len(),
                max: MAX_TRUST_DOMAIN_LEN,
            });
        }
        for (part, text, allowed) in [
            (
                "trust domain",
                *td,
                is_trust_domain_char as fn(char) -> bool,
            ),
            ("namespace", *ns, is_path_char),
            ("service account", *sa, is_path_char),
        ] {
            if text.is_empty() {
                return Err(SpiffeIdError::EmptyPart {
                    value: value.to_string(),
                    part,
                });
            }
            if !text.chars().all(allowed) {
                return Err(SpiffeIdError::InvalidCharacter {
                    value: value.to_string(),
                    part,
                });
            }
            // A trust domain of dots names nothing either (found by the spiffe_id fuzz target).
            if matches!(text, "." | "..") {
                return Err(SpiffeIdError::DotSegment {
                    value: value.to_string(),
                    part,
                });
            }
        }
        Ok(SpiffeId(Arc::new(Parts {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })))
    }
}

/// The SPIFFE spec allows lowercase letters, digits, `-`, `.` and `_` in a trust domain.
fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
}

/// Path segments may also hold uppercase letters (Kubernetes names do not, but SPIFFE allows them).
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_istio_shape() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn new_round_trips_through_display() {
        let id = SpiffeId::new("example.org", "prod", "api").unwrap();
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn refuses_everything_else() {
        let bad = [
            ("", "scheme"),
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local/ns/a", "shape"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "shape"),
            ("spiffe://cluster.local/sa/a/ns/b", "shape"),
            ("spiffe://cluster.local/ns//sa/b", "empty"),
            ("spiffe:///ns/a/sa/b", "empty"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "char"),
            ("spiffe://cluster.local/ns/a b/sa/b", "char"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "char"),
            // HARDENING T4: the catalog's hostile ids.
            ("spiffe://cluster.local/ns/a/sa/b/c", "shape"),
            ("spiffe:///ns//sa/", "empty"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "char"),
            ("spiffe://cluster.local:8443/ns/a/sa/b", "char"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "char"),
            ("spiffe://cluster.local/ns/a%2Fb/sa/c", "char"),
            ("spiffe://cluster.local/ns/a/sa/%62", "char"),
            ("spiffe://cluster.local/ns/../sa/b", "dot"),
            ("spiffe://cluster.local/ns/a/sa/.", "dot"),
            ("spiffe://../ns/a/sa/b", "dot"),
            ("spiffe://./ns/a/sa/b", "dot"),
            ("spiffe://cluster.local/ns/a/../sa/b", "shape"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local/ns/a/sa/b/", "shape"),
        ];
        for (value, kind) in bad {
            let err = value.parse::<SpiffeId>().unwrap_err();
            let matches = match kind {
                "scheme" => matches!(err, SpiffeIdError::MissingScheme { .. }),
                "shape" => matches!(err, SpiffeIdError::WrongShape { .. }),
                "empty" => matches!(err, SpiffeIdError::EmptyPart { .. }),
                "dot" => matches!(err, SpiffeIdError::DotSegment { .. }),
                _ => matches!(err, SpiffeIdError::InvalidCharacter { .. }),
            };
            assert!(matches, "{value:?} gave {err:?}, expected {kind}");
            assert!(err.to_string().contains(value) || value.is_empty());
        }
    }

    // HARDENING T4: ids over the SPIFFE length caps are refused without echoing them.
    #[test]
    fn refuses_ids_and_trust_domains_over_the_length_caps() {
        let long_sa = "a".repeat(MAX_ID_LEN);
        let err = format!("spiffe://cluster.local/ns/a/sa/{long_sa}")
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(
            matches!(
                err,
                SpiffeIdError::TooLong {
                    max: MAX_ID_LEN,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().len() < 200, "the id is not echoed: {err}");

        let long_td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        let err = format!("spiffe://{long_td}/ns/a/sa/b")
            .parse::<SpiffeId>()
            .unwrap_err();
        assert!(
            matches!(
                err,
                SpiffeIdError::TooLong {
                    what: "the trust domain",
                    ..
                }
            ),
            "{err:?}"
        );
        // At the caps exactly: accepted.
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        let prefix = format!("spiffe://{td}/ns/a/sa/");
        let sa = "b".repeat(MAX_ID_LEN - prefix.len());
        let id: SpiffeId = format!("{prefix}{sa}").parse().unwrap();
        assert_eq!(id.to_string().len(), MAX_ID_LEN);
    }
}
