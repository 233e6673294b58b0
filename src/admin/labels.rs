//! Istio's traffic labels (PROTOCOL.md §6.3) and their text encoding: which side reported, who
//! talked to whom, how it ended and how it was secured. Filling them from a connection's facts
//! is the proxies' job.

use std::fmt::Write as _;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};

/// Which side of a connection recorded the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side: outbound capture, SOCKS5.
    Source,
    /// The server side: HBONE inbound, inbound plaintext.
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Why a connection ended badly, in Istio's `response_flags` vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlags {
    /// No failure (`-`).
    #[default]
    None,
    /// Denied by authorization policy.
    Deny,
    /// The upstream connect failed.
    Connect,
    /// The TLS handshake failed.
    TlsFailure,
    /// The HTTP/2 handshake on an HBONE connection failed.
    H2HandshakeFailure,
    /// Refused by a network-level policy (e.g. STRICT mTLS on plaintext).
    NetworkPolicy,
    /// The local or peer identity could not be established.
    IdentityError,
    /// The peer's certificate is revoked.
    CertRevoked,
}

impl ResponseFlags {
    fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::TlsFailure => "TLS_FAILURE",
            ResponseFlags::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlags::NetworkPolicy => "NETWORK_POLICY",
            ResponseFlags::IdentityError => "IDENTITY_ERROR",
            ResponseFlags::CertRevoked => "CERT_REVOKED",
        }
    }

    /// Whether these flags mark the connection as failed.
    pub fn is_failure(self) -> bool {
        self != ResponseFlags::None
    }
}

/// How the connection was secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SecurityPolicy {
    /// HBONE: mutual TLS.
    MutualTls,
    /// Plaintext, or not known.
    #[default]
    Unknown,
}

impl SecurityPolicy {
    fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::Unknown => "unknown",
        }
    }
}

/// Istio's traffic labels for one connection. Empty strings are written as `unknown`, as Istio
/// does for missing values; `request_protocol` is always `tcp`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    /// SPIFFE id; only from a verified certificate.
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    /// The service's FQDN.
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl TrafficLabels {
    /// Labels with every value unknown but the reporter; fill the fields you know.
    pub fn new(reporter: Reporter) -> Self {
        TrafficLabels {
            reporter,
            source_workload: String::new(),
            source_canonical_service: String::new(),
            source_canonical_revision: String::new(),
            source_workload_namespace: String::new(),
            source_principal: String::new(),
            source_app: String::new(),
            source_version: String::new(),
            source_cluster: String::new(),
            destination_service: String::new(),
            destination_service_namespace: String::new(),
            destination_service_name: String::new(),
            destination_workload: String::new(),
            destination_canonical_service: String::new(),
            destination_canonical_revision: String::new(),
            destination_workload_namespace: String::new(),
            destination_principal: String::new(),
            destination_app: String::new(),
            destination_version: String::new(),
            destination_cluster: String::new(),
            response_flags: ResponseFlags::None,
            connection_security_policy: SecurityPolicy::Unknown,
        }
    }

    /// The same labels with other response flags (a connection opens with `-` and may close
    /// with a failure).
    pub fn with_response_flags(mut self, flags: ResponseFlags) -> Self {
        self.response_flags = flags;
        self
    }
}

pub(super) fn encode_label(
    encoder: &mut LabelSetEncoder,
    key: &str,
    value: &str,
) -> Result<(), std::fmt::Error> {
    let value = if value.is_empty() { "unknown" } else { value };
    let mut label = encoder.encode_label();
    let mut key_encoder = label.encode_label_key()?;
    key_encoder.write_str(key)?;
    let mut value_encoder = key_encoder.encode_label_value()?;
    // The text encoder writes values verbatim; names from config files may hold quotes.
    for c in value.chars() {
        match c {
            '\\' => value_encoder.write_str("\\\\")?,
            '"' => value_encoder.write_str("\\\"")?,
            '\n' => value_encoder.write_str("\\n")?,
            c => value_encoder.write_char(c)?,
        }
    }
    value_encoder.finish()
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let labels: [(&str, &str); 23] = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source_workload),
            ("source_canonical_service", &self.source_canonical_service),
            ("source_canonical_revision", &self.source_canonical_revision),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("source_app", &self.source_app),
            ("source_version", &self.source_version),
            ("source_cluster", &self.source_cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &self.destination_workload),
            (
                "destination_canonical_service",
                &self.destination_canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination_canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_principal", &self.destination_principal),
            ("destination_app", &self.destination_app),
            ("destination_version", &self.destination_version),
            ("destination_cluster", &self.destination_cluster),
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags.as_str()),
            (
                "connection_security_policy",
                self.connection_security_policy.as_str(),
            ),
        ];
        for (key, value) in labels {
            encode_label(&mut encoder, key, value)?;
        }
        Ok(())
    }
}
