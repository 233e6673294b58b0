//! HARDENING.md §8 `headers`: the CONNECT headers ztund writes (`forwarded`, `baggage`,
//! `traceparent`, `x-forwarded-network`) from fuzzed workload facts, and the `forwarded` header
//! it reads from a peer, as fuzzed bytes. Nothing panics; a `forwarded` ztund wrote reads back
//! as the client it names, whatever the service host holds; a `traceparent` is W3C-shaped.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ztund::hbone::ConnectRequest;
use ztund::hbone::request::forwarded_for;

#[derive(Debug, Arbitrary)]
struct Input {
    /// A `forwarded` header as a peer sends it.
    received: Vec<u8>,
    client: ([u8; 16], bool, u16),
    service_host: Option<String>,
    baggage: Vec<(String, String)>,
    network: Option<String>,
}

fuzz_target!(|input: Input| {
    if let Ok(value) = HeaderValue::from_bytes(&input.received) {
        let mut headers = HeaderMap::new();
        headers.insert("forwarded", value);
        let _ = forwarded_for(&headers);
    }

    let (octets, v4, port) = input.client;
    let ip = match v4 {
        true => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
        false => IpAddr::V6(Ipv6Addr::from(octets)),
    };
    let client = SocketAddr::new(ip, port);
    let mut request = ConnectRequest::new("10.0.0.2:8080")
        .forwarded(client, input.service_host.as_deref())
        .baggage((input.baggage.iter().take(8)).map(|(k, v)| (k.as_str(), v.as_str())))
        .random_traceparent();
    if let Some(network) = &input.network {
        request = request.forwarded_network(network);
    }
    let headers = request.headers();
    if headers.contains_key("forwarded") {
        assert_eq!(
            forwarded_for(headers),
            Some(client),
            "forwarded {:?} does not read back as {client}",
            headers["forwarded"]
        );
    }
    let traceparent = headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert!(
        matches!(parts.as_slice(), [v, t, p, f]
            if *v == "00" && t.len() == 32 && p.len() == 16 && *f == "00"
                && t.bytes().chain(p.bytes()).all(|b| b.is_ascii_hexdigit())
                && *t != "0".repeat(32) && *p != "0".repeat(16)),
        "traceparent {traceparent:?}"
    );
});
