//! HARDENING.md §8 `hbone_authority`: bytes as a CONNECT `:authority` (parsed by `http` as h2
//! does) through ztund's [`Authority::parse`], then, for an address, through the outbound
//! self-call check of [`route::plan`]. An authority that parses names a real port, prints back
//! as itself, and a host is a DNS name, never an IP address in disguise; a loopback address on
//! one of ztund's own ports is never dialled.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use ztund::hbone::{Authority, HboneError, is_address_in_disguise};
use ztund::mesh::Snapshot;
use ztund::proxy::route::{self, Plan};

fuzz_target!(|data: &[u8]| {
    let Ok(authority) = http::uri::Authority::try_from(data) else {
        return;
    };
    let text = authority.as_str();
    let parsed = match Authority::parse(text) {
        Ok(parsed) => parsed,
        Err(HboneError::BadAuthority { authority, .. }) => {
            assert_eq!(authority, text, "the error names another authority");
            return;
        }
        Err(other) => panic!("{text:?}: not a BadAuthority error: {other}"),
    };
    assert_eq!(
        Authority::parse(&parsed.to_string()).ok().as_ref(),
        Some(&parsed),
        "{text:?} does not print back as itself"
    );
    match &parsed {
        Authority::Host(host, port) => {
            assert_ne!(*port, 0, "{text:?}: port 0");
            assert!(
                host.len() <= 253,
                "{text:?}: a host of {} bytes",
                host.len()
            );
            assert!(
                host.parse::<std::net::IpAddr>().is_err(),
                "{text:?}: an IP as a host"
            );
            assert!(!host.starts_with('['), "{text:?}: a bracketed host");
            for label in host.split('.') {
                assert!(
                    (1..=63).contains(&label.len())
                        && label.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                        }),
                    "{text:?}: label {label:?} is not a lowercase DNS label"
                );
            }
            // C3: `127.1`, `2130706433`, `10.0.0.0x1` and `localhost` are addresses to a
            // resolver: a host whose last label starts with a digit, or localhost, must be one
            // the inbound refuses (`is_address_in_disguise`), never a service name.
            let last = host.rsplit('.').next().unwrap_or_default();
            if last.starts_with(|c: char| c.is_ascii_digit())
                || host == "localhost"
                || host.ends_with(".localhost")
            {
                assert!(
                    is_address_in_disguise(host),
                    "{text:?}: an address in disguise taken for a name"
                );
            }
        }
        Authority::Addr(addr) => {
            self_call_is_refused(*addr);
            // C3: port 0 of an address is refused by the inbound (`bad_authority`, tested in
            // tests/admission.rs), which counts it; the parser passes it on.
        }
    }
});

/// The outbound decision for the address: ztund's own ports on loopback are refused.
fn self_call_is_refused(addr: SocketAddr) {
    let plan = route::plan(&Snapshot::default(), None, addr, 15008);
    let ip = addr.ip();
    // C1: every port ztund listens on, loopback in any spelling.
    let self_call = ip.to_canonical().is_loopback()
        && [15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080].contains(&addr.port());
    if self_call {
        assert!(
            matches!(plan, Plan::Refuse(_)),
            "{addr} is a self-call, planned {plan:?}"
        );
    }
}
