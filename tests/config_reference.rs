//! README's "Configuration reference" lists exactly the keys the daemon config accepts.
//!
//! The keys come from the `Config` type itself, not from a list kept by hand: every struct in
//! the config denies unknown fields, and serde's refusal of an unknown field names the fields
//! it expected. So the test feeds `Config` a probe (`{zz_probe: 0}`) at each place, reads the
//! expected fields from the refusal and descends into each; `missing field mode` marks the
//! tagged `ca` (its variants come from an unknown `mode`, each variant's fields from a probe
//! inside it); anything else is a leaf, and a string probe there names an enum's values. A key
//! added to the config without a README row, or a row left behind by a removed key, fails.

use std::collections::{BTreeMap, BTreeSet};

use serde_norway::{Mapping, Value};
use ztund::config::Config;

const PROBE: &str = "zz_probe";

/// One step down into the config: a key, and for a tagged enum the tag it is given.
#[derive(Debug, Clone)]
struct Step {
    key: String,
    tag: Option<(String, String)>,
}

/// What the config holds at one key path.
#[derive(Debug, Default)]
struct Key {
    /// A unit enum's (or a tagged enum's tag's) values.
    values: Vec<String>,
}

/// A YAML document that puts `leaf` at `steps`.
fn document(steps: &[Step], leaf: Value) -> Value {
    let mut value = leaf;
    for step in steps.iter().rev() {
        let mut map = Mapping::new();
        if let Some((tag, variant)) = &step.tag {
            map.insert(tag.as_str().into(), variant.as_str().into());
        }
        map.insert(step.key.as_str().into(), value);
        value = Value::Mapping(map);
    }
    value
}

/// The map `{zz_probe: {zz_probe: 0}}`, plus the tag when the place is a tagged variant: no
/// leaf type accepts it, every struct refuses its key.
fn probe_map(tag: Option<&(String, String)>) -> Value {
    let mut inner = Mapping::new();
    inner.insert(PROBE.into(), 0.into());
    let mut map = Mapping::new();
    if let Some((tag, variant)) = tag {
        map.insert(tag.as_str().into(), variant.as_str().into());
    }
    map.insert(PROBE.into(), Value::Mapping(inner));
    Value::Mapping(map)
}

/// Serde's message for `document`, which must be refused.
fn refusal(document: Value) -> String {
    match serde_path_to_error::deserialize::<_, Config>(document.clone()) {
        Ok(_) => panic!("the probe {document:?} was accepted"),
        Err(e) => e.inner().to_string(),
    }
}

/// The backquoted names after `expected` in a serde refusal.
fn expected_names(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected") else {
        return Vec::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// What the place at `steps` (whose own step may carry a tag) holds, into `keys`.
fn walk(steps: &[Step], prefix: &str, keys: &mut BTreeMap<String, Key>) {
    let at_probe = |value: Value| {
        let mut inner = steps.to_vec();
        let last = inner.pop();
        match last {
            None => refusal(value),
            Some(last) => {
                let outer = Step {
                    key: last.key,
                    tag: None,
                };
                inner.push(outer);
                refusal(document(&inner, value))
            }
        }
    };
    let tag = steps.last().and_then(|s| s.tag.as_ref());
    let message = at_probe(probe_map(tag));
    if message.starts_with(&format!("unknown field `{PROBE}`")) {
        for field in expected_names(&message) {
            let path = if prefix.is_empty() {
                field.clone()
            } else {
                format!("{prefix}.{field}")
            };
            keys.entry(path.clone()).or_default();
            let mut next = steps.to_vec();
            next.push(Step {
                key: field,
                tag: None,
            });
            walk(&next, &path, keys);
        }
    } else if let Some(tag) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        // A tagged enum: its variants, then each variant's fields.
        let mut with_unknown = Mapping::new();
        with_unknown.insert(tag.into(), PROBE.into());
        let variants = expected_names(&at_probe(Value::Mapping(with_unknown)));
        assert!(!variants.is_empty(), "{prefix}.{tag} names no variants");
        let tag_path = format!("{prefix}.{tag}");
        keys.entry(tag_path).or_default().values = variants.clone();
        for variant in variants {
            let mut next = steps.to_vec();
            if let Some(last) = next.last_mut() {
                last.tag = Some((tag.to_string(), variant));
            }
            walk(&next, prefix, keys);
        }
    } else {
        let values = expected_names(&at_probe(PROBE.into()));
        if let Some(key) = keys.get_mut(prefix)
            && at_probe(PROBE.into()).starts_with(&format!("unknown variant `{PROBE}`"))
        {
            key.values = values;
        }
    }
}

/// Every key path the config accepts (`ports.hbone`, `ca.mode`, `ca.dir`, ...).
fn accepted_keys() -> BTreeMap<String, Key> {
    let mut keys = BTreeMap::new();
    walk(&[], "", &mut keys);
    keys
}

/// The rows of README's "Configuration reference" table: the key cell, and the whole row.
fn reference_rows() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (_, section) = readme
        .split_once("### Configuration reference")
        .expect("README has a section `### Configuration reference`");
    let section = section.split("\n### ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let key = line
            .split('`')
            .nth(1)
            .expect("a key between backquotes")
            .to_string();
        assert!(
            rows.insert(key.clone(), line.to_string()).is_none(),
            "README lists `{key}` twice"
        );
    }
    rows
}

#[test]
fn the_walk_finds_what_the_config_is_known_to_hold() {
    // Guards the mechanism: a serde that words its refusals differently must fail here, not
    // quietly find no keys.
    let keys = accepted_keys();
    for known in [
        "node",
        "ports.hbone",
        "pool.idleTimeout",
        "controlPlane.metadata",
        "ca.mode",
        "ca.dir",
        "ca.adminSocket",
        "dataPlane.scheduling",
    ] {
        assert!(keys.contains_key(known), "{known} not found in {keys:?}");
    }
    assert_eq!(
        keys["ca.mode"].values,
        ["builtin", "cacerts", "istio", "spiffe"]
    );
    assert_eq!(
        keys["capture"].values,
        ["none", "standalone", "istio-cni", "host"]
    );
    assert!(keys.len() > 30, "{}", keys.len());
}

#[test]
fn every_config_key_has_a_reference_row_and_every_row_a_key() {
    let keys = accepted_keys();
    let rows = reference_rows();
    let missing: Vec<&String> = keys.keys().filter(|k| !rows.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "config keys without a row in README's Configuration reference: {missing:?}"
    );
    let stale: Vec<&String> = rows.keys().filter(|k| !keys.contains_key(*k)).collect();
    assert!(
        stale.is_empty(),
        "README's Configuration reference lists keys the config does not accept: {stale:?}"
    );
    for (key, found) in &keys {
        for value in &found.values {
            assert!(
                rows[key].contains(&format!("`{value}`")),
                "the row of `{key}` does not name its value `{value}`: {}",
                rows[key]
            );
        }
    }
}

#[test]
fn every_environment_override_in_the_code_is_in_the_reference() {
    // `ZTUND_*` names the daemon reads appear in its source as string literals.
    let mut names = BTreeSet::new();
    for file in [
        "src/config.rs",
        "src/config_env.rs",
        "src/logging.rs",
        "src/main.rs",
    ] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .expect("source file");
        for piece in text.split("\"ZTUND_").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            names.insert(format!("ZTUND_{name}"));
        }
    }
    assert!(names.contains("ZTUND_DRAIN_DEADLINE"), "{names:?}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (_, section) = readme
        .split_once("## Operating ztund")
        .expect("README has `## Operating ztund`");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !section.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "environment variables the code reads but README's Operating ztund does not name: {missing:?}"
    );
}
