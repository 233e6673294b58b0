//! The CONNECT request the pool sends (PROTOCOL.md §1.3): the `:authority` with the target
//! port, and the headers that describe the source (`forwarded`, `baggage`, `traceparent`,
//! `x-forwarded-network`). Knows nothing about connections.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};

use super::HboneError;

/// A CONNECT to send: the `:authority` and the §1.3 headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    authority: String,
    headers: HeaderMap,
    /// The first header that could not be encoded; reported by [`Pool::open`].
    invalid: Option<(String, String)>,
}

impl ConnectRequest {
    /// A CONNECT to `authority`: `ip:port`, `[v6]:port` or `host:port`, with the target port.
    pub fn new(authority: impl Into<String>) -> Self {
        ConnectRequest {
            authority: authority.into(),
            headers: HeaderMap::new(),
            invalid: None,
        }
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// `forwarded: for="<client>"` plus `;host=<service FQDN>` when the service is known.
    pub fn forwarded(self, client: SocketAddr, service_host: Option<&str>) -> Self {
        let value = match service_host {
            Some(host) => format!("for=\"{client}\";host={host}"),
            None => format!("for=\"{client}\""),
        };
        self.header_text("forwarded", &value)
    }

    /// `baggage`: the source workload's `k=v` pairs, comma-separated.
    pub fn baggage<'a>(self, entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let value = entries
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        if value.is_empty() {
            return self;
        }
        self.header_text("baggage", &value)
    }

    /// `traceparent` with a fresh random trace id and parent id.
    pub fn random_traceparent(self) -> Self {
        let trace_id: u128 = rand::random::<u128>().max(1);
        let parent_id: u64 = rand::random::<u64>().max(1);
        self.header_text(
            "traceparent",
            &format!("00-{trace_id:032x}-{parent_id:016x}-00"),
        )
    }

    /// `x-forwarded-network`: only on the inner CONNECT of double HBONE.
    pub fn forwarded_network(self, network: &str) -> Self {
        self.header_text("x-forwarded-network", network)
    }

    /// Any other header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    fn header_text(mut self, name: &'static str, value: &str) -> Self {
        match HeaderValue::from_str(value) {
            Ok(value) => {
                self.headers.insert(HeaderName::from_static(name), value);
            }
            Err(_) if self.invalid.is_none() => {
                self.invalid = Some((name.to_string(), value.to_string()));
            }
            Err(_) => {}
        }
        self
    }

    pub(crate) fn to_http(&self) -> Result<Request<()>, HboneError> {
        if let Some((name, value)) = &self.invalid {
            return Err(HboneError::BadHeader {
                name: name.clone(),
                reason: format!("{value:?} is not a valid header value"),
            });
        }
        let uri = http::Uri::builder()
            .authority(self.authority.as_str())
            .build()
            .map_err(|_| HboneError::BadAuthority {
                authority: self.authority.clone(),
                reason: "not a valid URI authority",
            })?;
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }
}
