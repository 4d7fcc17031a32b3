//! `CORS_ALLOWED_ORIGINS` (operator input, the only grpc-web-side text the service parses
//! itself; tonic-web decodes grpc-web frames): arbitrary text through
//! `AllowedOrigins::from_str`. An accepted origin must be one a browser can send and the CORS
//! layer can hold (a valid header value), so none is dropped silently, and the parsed list
//! must parse again to itself.
#![no_main]

use std::str::FromStr;

use chat_service::server::AllowedOrigins;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = AllowedOrigins::from_str(text) else {
        return;
    };
    let again = match &parsed {
        AllowedOrigins::None => {
            assert!(text.split(',').all(|e| e.trim().is_empty()));
            String::new()
        }
        AllowedOrigins::Any => "*".to_owned(),
        AllowedOrigins::List(list) => {
            assert!(!list.is_empty());
            for o in list {
                assert!(
                    http::HeaderValue::from_str(o).is_ok(),
                    "{o:?} accepted but not a header value: the CORS layer would drop it"
                );
                assert!(
                    o.starts_with("http://") || o.starts_with("https://"),
                    "{o:?}"
                );
                // `*` and `(` may stand in a host (RFC 3986 sub-delims, and the URL standard
                // allows them): such an origin is matched byte for byte like any other.
                assert!(!o.contains(',') && o.trim() == o && !o.is_empty(), "{o:?}");
                let rest = o.split_once("://").map(|(_, r)| r).unwrap_or_default();
                assert!(
                    !rest.is_empty() && !rest.contains(['/', '?', '#', '@']),
                    "{o:?} has a path, query, fragment or user"
                );
                assert_eq!(o.to_ascii_lowercase(), *o);
            }
            list.join(",")
        }
    };
    assert_eq!(AllowedOrigins::from_str(&again), Ok(parsed));
});
