//! HARDENING.md §8 `spiffe_id`: any string through the SPIFFE id parser. An id that parses
//! prints back as exactly the text it came from, has no empty part, and is rebuilt equal from
//! its parts; one that does not names the text in its error (a too-long one gives its length).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztund::identity::SpiffeId;
use ztund::identity::spiffe::SpiffeIdError;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let id = match text.parse::<SpiffeId>() {
        Ok(id) => id,
        // A length error gives the lengths instead of echoing up to 2 KiB of hostile text.
        Err(SpiffeIdError::TooLong { len, max, what }) => {
            assert!(
                len > max && len <= text.len(),
                "{what}: {len} bytes over {max}, of a text of {}",
                text.len()
            );
            return;
        }
        Err(e) => {
            assert!(
                text.is_empty() || e.to_string().contains(&format!("{text:?}")),
                "the error {e} does not name {text:?}"
            );
            return;
        }
    };
    assert_eq!(id.to_string(), text, "does not round-trip");
    let parts = [id.trust_domain(), id.namespace(), id.service_account()];
    for part in parts {
        assert!(!part.is_empty(), "{text:?} has an empty part");
        assert!(!part.contains('/'), "{text:?}: a part holds a '/'");
    }
    assert_eq!(
        SpiffeId::new(parts[0], parts[1], parts[2]).as_ref(),
        Ok(&id),
        "rebuilt from its parts it differs"
    );
    assert_eq!(format!("spiffe://{}", id.principal()), text);
    // T4: no dot segments, and the lengths the SPIFFE spec caps.
    {
        for part in parts {
            assert!(part != "." && part != "..", "{text:?} has a dot segment");
        }
        assert!(text.len() <= 2048, "an id of {} bytes", text.len());
        assert!(
            parts[0].len() <= 255,
            "a trust domain of {} bytes",
            parts[0].len()
        );
    }
});
