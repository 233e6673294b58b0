//! The CONNECT request the pool sends (PROTOCOL.md §1.3): the `:authority` with the target
//! port, and the headers that describe the source (`forwarded`, `baggage`, `traceparent`,
//! `x-forwarded-network`); and [`forwarded_for`], the server's reading of `forwarded`. Knows
//! nothing about connections.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};

use super::HboneError;

/// A CONNECT to send: the `:authority` and the §1.3 headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    authority: String,
    headers: HeaderMap,
    /// The first header that could not be encoded; reported by [`Pool::open`].
    invalid: Option<(String, String)>,
    /// The client's first bytes, sent as DATA right behind the HEADERS (see
    /// [`ConnectRequest::first_data`]).
    first_data: Bytes,
}

impl ConnectRequest {
    /// A CONNECT to `authority`: `ip:port`, `[v6]:port` or `host:port`, with the target port.
    pub fn new(authority: impl Into<String>) -> Self {
        ConnectRequest {
            authority: authority.into(),
            headers: HeaderMap::new(),
            invalid: None,
            first_data: Bytes::new(),
        }
    }

    /// Bytes the client has already sent, to go out as DATA with the HEADERS rather than a
    /// round trip later, once the 200 is back: a new tunneled connection whose client speaks
    /// first (HTTP, TLS) then costs one write and one wake-up less on each node, and the app
    /// has its request as soon as the server node has dialled it. HTTP/2 allows DATA before
    /// the response (RFC 9113 §8.1); the server buffers it within the stream's window and
    /// hands it to the app only once the CONNECT is accepted, so a refused stream delivers
    /// nothing. Keep it within the send budget's per-stream floor: it is queued without
    /// waiting for room.
    pub fn with_first_data(mut self, data: Bytes) -> Self {
        self.first_data = data;
        self
    }

    pub fn first_data(&self) -> &Bytes {
        &self.first_data
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// `forwarded: for="<client>"` plus `;host=<service FQDN>` when the service is known and
    /// its name is an RFC 7230 token (every DNS name is). Any other name is left out rather than
    /// written raw: a `;`, `,` or `"` would add parameters or elements, and a byte past ASCII
    /// makes the header unreadable as text, so the peer would lose the client address too.
    pub fn forwarded(self, client: SocketAddr, service_host: Option<&str>) -> Self {
        let value = match service_host.filter(|host| is_token(host)) {
            Some(host) => format!("for=\"{client}\";host={host}"),
            None => format!("for=\"{client}\""),
        };
        self.unique_header_text("forwarded", &value)
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
        self.unique_header_text(
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

    /// A header whose value differs on every CONNECT (the client's port, a random id): kept out
    /// of HPACK's dynamic tables (encoded "never indexed"), where it could never be referred to
    /// again but would evict what can (the authority), and where each entry costs a slot in
    /// both ends' tables of the pooled connection (heaptrack: 9–12 KiB of table per connection
    /// of 100 streams, when every CONNECT brought a new `forwarded`).
    fn unique_header_text(self, name: &'static str, value: &str) -> Self {
        self.text(name, value, true)
    }

    fn header_text(self, name: &'static str, value: &str) -> Self {
        self.text(name, value, false)
    }

    fn text(mut self, name: &'static str, value: &str, unique: bool) -> Self {
        match HeaderValue::from_str(value) {
            Ok(mut value) => {
                value.set_sensitive(unique);
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

/// RFC 7230 §3.2.6 `token`: one or more `tchar`.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The client address a CONNECT's `forwarded` header names (`for="10.0.0.1:40000"`, IPv6 as
/// `for="[fd00::1]:40000"`; RFC 7239), from its first element: the original client. `None`
/// when absent, or when it names no address with a port (`for=unknown`, an obfuscated `_id`,
/// a bare IP). The client node vouches for it; nothing checks it, so it is for logs only.
pub fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let value = value.trim();
        let unquoted = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        unquoted.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(request: ConnectRequest) -> HeaderMap {
        request.headers().clone()
    }

    #[test]
    fn forwarded_for_reads_back_what_the_client_sends() {
        for client in ["10.1.2.3:40000", "[fd00::7]:443"] {
            let client: SocketAddr = client.parse().unwrap();
            let sent = ConnectRequest::new("10.0.0.2:80").forwarded(client, None);
            assert_eq!(forwarded_for(&headers_of(sent)), Some(client));
            let with_host = ConnectRequest::new("10.0.0.2:80")
                .forwarded(client, Some("echo.default.svc.cluster.local"));
            assert_eq!(forwarded_for(&headers_of(with_host)), Some(client));
        }
    }

    #[test]
    fn forwarded_for_takes_the_first_element_and_ignores_what_names_no_socket() {
        let of = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("forwarded", HeaderValue::from_str(value).unwrap());
            forwarded_for(&headers)
        };
        assert_eq!(
            of("host=x;For=\"10.0.0.1:1\", for=\"10.0.0.9:9\""),
            Some("10.0.0.1:1".parse().unwrap())
        );
        assert_eq!(of("for=10.0.0.1:2"), Some("10.0.0.1:2".parse().unwrap()));
        for unusable in [
            "for=unknown",
            "for=_hidden",
            "for=10.0.0.1",
            "host=x",
            "for=\"\"",
        ] {
            assert_eq!(of(unusable), None, "{unusable}");
        }
        assert_eq!(forwarded_for(&HeaderMap::new()), None);
    }

    /// A value that differs on every CONNECT goes out "never indexed", so HPACK keeps it out of
    /// both ends' dynamic tables; values that repeat stay indexable.
    #[test]
    fn per_connect_values_stay_out_of_the_hpack_tables() {
        let client: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let request = ConnectRequest::new("10.0.0.2:80")
            .forwarded(client, Some("echo.default.svc.cluster.local"))
            .random_traceparent()
            .baggage([("k8s.namespace.name", "default")])
            .forwarded_network("net-a");
        let sent = request.to_http().unwrap();
        let headers = sent.headers();
        assert!(headers["forwarded"].is_sensitive());
        assert!(headers["traceparent"].is_sensitive());
        assert!(!headers["baggage"].is_sensitive());
        assert!(!headers["x-forwarded-network"].is_sensitive());
        assert_eq!(forwarded_for(headers), Some(client), "still readable");
    }

    /// Found by the `headers` fuzz target (minimised): a service host of one non-ASCII
    /// character was written raw, and the peer could no longer read the client address.
    #[test]
    fn forwarded_leaves_out_a_host_that_is_not_a_token_and_still_names_the_client() {
        let client: SocketAddr = "[aaaa:9f6:3209:c43a:909:f1a4:aaaa:9f6]:2362"
            .parse()
            .unwrap();
        let minimised = std::str::from_utf8(&[0xf1, 0xa4, 0xaa, 0xaa]).unwrap();
        for host in [
            minimised,
            "a;for=\"10.9.9.9:1\"",
            "a,for=x",
            "a\"b",
            "a b",
            "",
        ] {
            let headers =
                headers_of(ConnectRequest::new("10.0.0.2:80").forwarded(client, Some(host)));
            assert_eq!(
                headers["forwarded"].to_str().unwrap(),
                format!("for=\"{client}\""),
                "{host:?}"
            );
            assert_eq!(forwarded_for(&headers), Some(client), "{host:?}");
        }
    }
}
