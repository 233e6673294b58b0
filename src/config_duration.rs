//! Durations written with a unit: `500ms`, `30s`, `5m`, `24h`, `7d`. A bare number is refused
//! rather than read as seconds: `idleTimeout: 300` could as well mean milliseconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Writes the shortest exact form (`500ms`, `30s`, `5m`), which [`parse`] reads back.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// The shortest exact text of `d` in the units [`parse`] reads.
pub fn format(d: Duration) -> String {
    if d.subsec_nanos() != 0 || d.is_zero() {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Reads a duration with a unit (serde's `with` hook).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration with a unit, like 500ms, 30s, 5m or 24h")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        parse(text).map_err(E::custom)
    }

    // YAML reads `30` as a number: the same refusal as for the text "30".
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        self.visit_str(&n.to_string())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        self.visit_str(&n.to_string())
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
        self.visit_str(&n.to_string())
    }
}

/// Why a text is not a duration. Each variant carries the text as written (trimmed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No leading number.
    #[error("{text:?} is not a duration like 500ms, 30s, 5m or 24h")]
    NotADuration {
        /// The text as written.
        text: String,
    },
    /// A bare number: refused rather than guessed at.
    #[error("{text} needs a unit, e.g. {text}s (ms, s, m, h or d)")]
    NoUnit {
        /// The text as written.
        text: String,
    },
    /// A unit other than ms, s, m, h or d.
    #[error("{text:?} has unknown unit {unit:?} (use ms, s, m, h or d)")]
    UnknownUnit {
        /// The text as written.
        text: String,
        /// The unit found.
        unit: String,
    },
    /// More seconds than a `u64` holds.
    #[error("{text:?} is too long")]
    TooLong {
        /// The text as written.
        text: String,
    },
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `7d`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| DurationError::NotADuration {
        text: text.to_string(),
    })?;
    let seconds_per = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" => {
            return Err(DurationError::NoUnit {
                text: text.to_string(),
            });
        }
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    n.checked_mul(seconds_per)
        .map(Duration::from_secs)
        .ok_or_else(|| DurationError::TooLong {
            text: text.to_string(),
        })
}
