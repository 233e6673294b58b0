//! A cursor into one YAML document that remembers its field path, so every error names the
//! document and the field (`spec.rules[0].from[1].source.ipBlocks[2]`), and unknown fields are
//! refused in one place: a misspelt field dropped in silence could weaken a policy (`mTLS:` for
//! `mtls:` leaves the mode unset). Lists and strings are capped here too (HARDENING Y7). Knows
//! nothing about what the fields mean.

use serde_norway::Value;

use crate::mesh::{DocRef, Labels};
use crate::policy::PolicyError;

/// What an absent field reads as.
static ABSENT: Value = Value::Null;

/// The most items a list in a security document may hold (rules, principals, ipBlocks...).
/// Generous for hand-written policy, far below what would make every connection's check slow.
pub const MAX_LIST_ITEMS: usize = 1024;

/// The longest string a security document may hold. A SPIFFE id is at most 2048 bytes (SPIFFE
/// ID spec §2.3), and no name, CIDR or port comes near it.
pub const MAX_STRING_BYTES: usize = 2048;

/// A value in a document and the path that leads to it.
#[derive(Debug, Clone)]
pub(crate) struct Node<'a> {
    pub doc: &'a DocRef,
    pub value: &'a Value,
    pub path: String,
}

impl<'a> Node<'a> {
    pub fn root(doc: &'a DocRef, value: &'a Value) -> Node<'a> {
        Node {
            doc,
            value,
            path: String::new(),
        }
    }

    /// A field of this mapping; reads as absent if missing (or if this is not a mapping).
    pub fn field(&self, key: &str) -> Node<'a> {
        let value = self
            .value
            .as_mapping()
            .and_then(|m| m.get(key))
            .unwrap_or(&ABSENT);
        let path = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        Node {
            doc: self.doc,
            value,
            path,
        }
    }

    /// The node if it is present and not `null`.
    pub fn optional(&self) -> Option<Node<'a>> {
        (!self.value.is_null()).then(|| self.clone())
    }

    /// An error about this field.
    pub fn invalid(&self, reason: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            doc: self.doc.clone(),
            field: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Checks this is a mapping (or absent) whose keys are all in `known` (Istio's schema for
    /// this field); any other key is an error naming it.
    pub fn mapping(&self, known: &[&str]) -> Result<(), PolicyError> {
        let mapping = match self.value {
            Value::Null => return Ok(()),
            Value::Mapping(mapping) => mapping,
            other => return Err(self.invalid(format!("must be a mapping, found {}", kind(other)))),
        };
        for key in mapping.keys() {
            let name = match key {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            if !known.contains(&name.as_str()) {
                let field = if self.path.is_empty() {
                    name
                } else {
                    format!("{}.{name}", self.path)
                };
                return Err(PolicyError::Invalid {
                    doc: self.doc.clone(),
                    field,
                    reason: format!("unknown field; expected one of {}", known.join(", ")),
                });
            }
        }
        Ok(())
    }

    /// The entries of a mapping, each with its key.
    pub fn entries(&self) -> Result<Vec<(&'a Value, Node<'a>)>, PolicyError> {
        let mapping = match self.value {
            Value::Null => return Ok(Vec::new()),
            Value::Mapping(mapping) => mapping,
            other => return Err(self.invalid(format!("must be a mapping, found {}", kind(other)))),
        };
        Ok(mapping
            .iter()
            .map(|(key, value)| {
                let name = match key {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => format!("{other:?}"),
                };
                let node = Node {
                    doc: self.doc,
                    value,
                    path: format!("{}.{name}", self.path),
                };
                (key, node)
            })
            .collect())
    }

    /// The items of a list (none if absent).
    pub fn list(&self) -> Result<Vec<Node<'a>>, PolicyError> {
        match self.value {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) if items.len() > MAX_LIST_ITEMS => Err(self.invalid(format!(
                "{} items, over the cap of {MAX_LIST_ITEMS} (MAX_LIST_ITEMS)",
                items.len()
            ))),
            Value::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Node {
                    doc: self.doc,
                    value,
                    path: format!("{}[{i}]", self.path),
                })
                .collect()),
            other => Err(self.invalid(format!("must be a list, found {}", kind(other)))),
        }
    }

    pub fn str(&self) -> Result<&'a str, PolicyError> {
        match self.value {
            Value::String(s) if s.len() > MAX_STRING_BYTES => Err(self.invalid(format!(
                "{} bytes long, over the cap of {MAX_STRING_BYTES} (MAX_STRING_BYTES)",
                s.len()
            ))),
            Value::String(s) => Ok(s),
            other => Err(self.invalid(format!("must be a string, found {}", kind(other)))),
        }
    }

    pub fn string(&self) -> Result<String, PolicyError> {
        self.str().map(str::to_string)
    }

    /// A list of strings (none if absent).
    pub fn strings(&self) -> Result<Vec<String>, PolicyError> {
        self.list()?.iter().map(Node::string).collect()
    }

    pub fn bool(&self) -> Result<bool, PolicyError> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            other => Err(self.invalid(format!("must be true or false, found {}", kind(other)))),
        }
    }

    /// A mapping of label names to string values.
    pub fn labels(&self) -> Result<Labels, PolicyError> {
        let mut labels = Labels::new();
        for (key, value) in self.entries()? {
            let Value::String(key) = key else {
                return Err(value.invalid("label names must be strings"));
            };
            let Value::String(text) = value.value else {
                return Err(value.invalid(format!(
                    "label values must be strings (quote it), found {}",
                    kind(value.value)
                )));
            };
            labels.insert(key.clone(), text.clone());
        }
        Ok(labels)
    }

    /// A port number, 1–65535, written as a number or a string of digits.
    pub fn port(&self) -> Result<u16, PolicyError> {
        port_of(self.value).ok_or_else(|| {
            self.invalid(format!(
                "{} is not a port number (1-65535)",
                show(self.value)
            ))
        })
    }

    /// The key of this entry read as a port number.
    pub fn port_key(&self, key: &Value) -> Result<u16, PolicyError> {
        port_of(key)
            .ok_or_else(|| self.invalid(format!("{} is not a port number (1-65535)", show(key))))
    }
}

fn port_of(value: &Value) -> Option<u16> {
    let number = match value {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()?
        }
        _ => return None,
    };
    u16::try_from(number).ok().filter(|p| *p != 0)
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
