//! Typed reading of one YAML document's fields: a cursor that knows its dotted path
//! (`spec.ports[1].targetPort`) so every type or range error names the field, plus the Kubernetes
//! name rules (DNS-1123 labels and subdomains, label keys and values). Knows nothing about kinds.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_norway::Value;

use super::MeshError;
use crate::mesh::model::DocRef;

/// A name that breaks a Kubernetes or Istio name rule. The message is the `reason` of the
/// field error that carries it, so it names the value and the rule, not the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    #[error("{name:?} is longer than {max} characters")]
    TooLong { name: String, max: usize },
    #[error(
        "{0:?} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
    )]
    NotDnsLabel(String),
    #[error(
        "{0:?} is not a DNS-1123 subdomain (dot-separated lowercase labels of letters, digits and '-')"
    )]
    NotDnsSubdomain(String),
    /// A Service name is a DNS-1035 label: a DNS-1123 label that starts with a letter.
    #[error("{0:?} must start with a letter to name a Service")]
    NotDns1035(String),
    #[error("label key prefix: {0}")]
    LabelKeyPrefix(Box<NameError>),
    #[error(
        "{0:?} is not a valid label key (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, after an optional DNS prefix and '/')"
    )]
    NotLabelKey(String),
    #[error(
        "{0:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
    )]
    NotLabelValue(String),
    /// A ServiceEntry host: DNS labels, optionally after a `*.` wildcard.
    #[error("{0:?} is not a host name (lowercase DNS labels, optionally after \"*.\")")]
    NotHost(String),
    #[error("expected a network namespace name (under {dir}) or an absolute path, got {text:?}")]
    NotNetns { dir: &'static str, text: String },
}

/// A position inside a document: its path and the value found there, if any. YAML `null` counts
/// as absent, as it does for Kubernetes.
#[derive(Clone)]
pub(crate) struct Field<'a> {
    doc: &'a DocRef,
    path: String,
    value: Option<&'a Value>,
}

impl<'a> Field<'a> {
    /// The whole document.
    pub(crate) fn root(doc: &'a DocRef, body: &'a Value) -> Field<'a> {
        Field {
            doc,
            path: String::new(),
            value: Some(body),
        }
    }

    /// The dotted path of this field, as a user would write it.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    fn child(&self, key: &str, value: Option<&'a Value>) -> Field<'a> {
        let path = if !is_plain_key(key) {
            format!("{}[{key:?}]", self.path)
        } else if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        Field {
            doc: self.doc,
            path,
            value,
        }
    }

    /// An error about this field.
    pub(crate) fn error(&self, reason: impl std::fmt::Display) -> MeshError {
        MeshError::Invalid {
            doc: Box::new(self.doc.clone()),
            field: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// True when the field is missing or `null`.
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self.value, None | Some(Value::Null))
    }

    /// A child of a mapping. Asking a non-mapping for a key is a type error on this field.
    pub(crate) fn get(&self, key: &str) -> Result<Field<'a>, MeshError> {
        let value = match self.value {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(map)) => map.get(key),
            Some(other) => {
                return Err(self.error(format!("expected a mapping, got {}", describe(other))));
            }
        };
        Ok(self.child(key, value))
    }

    /// Checks that a mapping (or absent field) has no key outside `known`, the schema of this
    /// field: a misspelt key read as absent would silently change what the document means.
    pub(crate) fn only(&self, known: &[&str]) -> Result<(), MeshError> {
        let Some(Value::Mapping(map)) = self.value else {
            return Ok(());
        };
        for key in map.keys() {
            let name = match key {
                Value::String(s) => s.as_str(),
                other => {
                    return Err(
                        self.error(format!("expected string keys, got {}", describe(other)))
                    );
                }
            };
            if !known.contains(&name) {
                return Err(self.child(name, None).error(format!(
                    "unknown field; expected one of {}",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// An optional string.
    pub(crate) fn opt_str(&self) -> Result<Option<&'a str>, MeshError> {
        match self.value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(format!("expected a string, got {}", describe(other)))),
        }
    }

    /// A required, non-empty string.
    pub(crate) fn str(&self) -> Result<&'a str, MeshError> {
        match self.opt_str()? {
            None => Err(self.error("required")),
            Some("") => Err(self.error("must not be empty")),
            Some(s) => Ok(s),
        }
    }

    /// An optional boolean.
    pub(crate) fn opt_bool(&self) -> Result<Option<bool>, MeshError> {
        match self.value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => {
                Err(self.error(format!("expected true or false, got {}", describe(other))))
            }
        }
    }

    /// An optional TCP port number.
    pub(crate) fn opt_port(&self) -> Result<Option<u16>, MeshError> {
        match self.value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                Some(port) if port > 0 => Ok(Some(port)),
                _ => Err(self.error(format!("expected a port number 1-65535, got {n}"))),
            },
            Some(other) => Err(self.error(format!(
                "expected a port number 1-65535, got {}",
                describe(other)
            ))),
        }
    }

    /// A required TCP port number.
    pub(crate) fn port(&self) -> Result<u16, MeshError> {
        self.opt_port()?.ok_or_else(|| self.error("required"))
    }

    /// A required IP address written as a string.
    pub(crate) fn ip(&self) -> Result<IpAddr, MeshError> {
        let text = self.str()?;
        text.parse()
            .map_err(|_| self.error(format!("expected an IP address, got {text:?}")))
    }

    /// The items of an optional list; absent is empty.
    pub(crate) fn list(&self) -> Result<Vec<Field<'a>>, MeshError> {
        match self.value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Sequence(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Field {
                    doc: self.doc,
                    path: format!("{}[{i}]", self.path),
                    value: Some(value),
                })
                .collect()),
            Some(other) => Err(self.error(format!("expected a list, got {}", describe(other)))),
        }
    }

    /// The entries of an optional mapping with string keys; absent is empty.
    pub(crate) fn entries(&self) -> Result<Vec<(&'a str, Field<'a>)>, MeshError> {
        match self.value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(key, value)| {
                    let Value::String(key) = key else {
                        return Err(
                            self.error(format!("expected string keys, got {}", describe(key)))
                        );
                    };
                    Ok((key.as_str(), self.child(key, Some(value))))
                })
                .collect(),
            Some(other) => Err(self.error(format!("expected a mapping, got {}", describe(other)))),
        }
    }

    /// A Kubernetes label map (`metadata.labels`, a selector): string keys and values, each
    /// checked against the label syntax.
    pub(crate) fn labels(&self) -> Result<BTreeMap<String, String>, MeshError> {
        let mut labels = BTreeMap::new();
        for (key, field) in self.entries()? {
            check_label_key(key).map_err(|reason| field.error(reason))?;
            let value = field.opt_str()?.unwrap_or_default();
            check_label_value(value).map_err(|reason| field.error(reason))?;
            labels.insert(key.to_string(), value.to_string());
        }
        Ok(labels)
    }

    /// A map of annotations: string keys, string values, no syntax rules on the values.
    pub(crate) fn annotations(&self) -> Result<BTreeMap<String, String>, MeshError> {
        let mut annotations = BTreeMap::new();
        for (key, field) in self.entries()? {
            let value = field.opt_str()?.unwrap_or_default();
            annotations.insert(key.to_string(), value.to_string());
        }
        Ok(annotations)
    }
}

/// Keys that read well after a dot; anything else is written `["key"]`.
fn is_plain_key(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A short description of a YAML value for "expected X, got Y".
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// RFC 1123 label: what Kubernetes requires of namespaces, service names and port names.
pub(crate) fn check_dns_label(name: &str) -> Result<(), NameError> {
    if name.len() > 63 {
        return Err(NameError::TooLong {
            name: name.to_string(),
            max: 63,
        });
    }
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if valid {
        Ok(())
    } else {
        Err(NameError::NotDnsLabel(name.to_string()))
    }
}

/// RFC 1123 subdomain: what Kubernetes requires of most object names and of service accounts.
pub(crate) fn check_dns_subdomain(name: &str) -> Result<(), NameError> {
    if name.len() > 253 {
        return Err(NameError::TooLong {
            name: name.to_string(),
            max: 253,
        });
    }
    if name.split('.').all(|label| check_dns_label(label).is_ok()) {
        Ok(())
    } else {
        Err(NameError::NotDnsSubdomain(name.to_string()))
    }
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name.
fn check_label_key(key: &str) -> Result<(), NameError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_dns_subdomain(prefix)
            .map_err(|reason| NameError::LabelKeyPrefix(Box::new(reason)))?;
    }
    if name.is_empty() || !is_label_text(name) {
        return Err(NameError::NotLabelKey(key.to_string()));
    }
    Ok(())
}

/// A Kubernetes label value: empty, or up to 63 characters of label text.
fn check_label_value(value: &str) -> Result<(), NameError> {
    if value.is_empty() || is_label_text(value) {
        Ok(())
    } else {
        Err(NameError::NotLabelValue(value.to_string()))
    }
}

fn is_label_text(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() <= 63
        && !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// An IANA service name, what Kubernetes allows as a container port name: up to 15 lowercase
/// letters, digits and '-', with at least one letter and no leading, trailing or double '-'.
pub(crate) fn is_port_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_rules() {
        assert!(check_dns_label("echo-1").is_ok());
        assert!(check_dns_label("Echo").is_err());
        assert!(check_dns_label("-echo").is_err());
        assert!(check_dns_label(&"a".repeat(64)).is_err());
        assert!(check_dns_subdomain("sleep.v1").is_ok());
        assert!(check_dns_subdomain("sleep..v1").is_err());
        assert!(check_label_key("istio.io/dataplane-mode").is_ok());
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("Bad Prefix/app").is_err());
        assert!(check_label_key("app/").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_3").is_ok());
        assert!(check_label_value("v1 2").is_err());
        assert!(is_port_name("http-web"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("http--web"));
        assert!(!is_port_name("a-very-long-port-name"));
    }

    #[test]
    fn paths_read_like_the_document() {
        let doc = DocRef {
            file: "m.yaml".into(),
            index: 1,
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web".into(),
        };
        let body: Value =
            serde_norway::from_str("spec: {ports: [{port: 80}, {port: 81, targetPort: abc}]}\nmetadata: {labels: {a.b/c: 'x y'}}")
                .unwrap();
        let root = Field::root(&doc, &body);
        let spec = root.get("spec").unwrap();
        let ports = spec.get("ports").unwrap();
        let items = ports.list().unwrap();
        let target = items[1].get("targetPort").unwrap();
        assert_eq!(target.path(), "spec.ports[1].targetPort");
        let err = target.port().unwrap_err().to_string();
        assert_eq!(
            err,
            "m.yaml document 1 (Service default/web): field `spec.ports[1].targetPort`: expected a port number 1-65535, got \"abc\""
        );
        let metadata = root.get("metadata").unwrap();
        let labels = metadata.get("labels").unwrap();
        let err = labels.labels().unwrap_err().to_string();
        assert!(err.contains("`metadata.labels[\"a.b/c\"]`"), "{err}");
    }
}
