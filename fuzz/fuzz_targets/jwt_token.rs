//! Bearer tokens as a client sends them: arbitrary `authorization` text through
//! `Verifier::verify_header` and arbitrary token text through `Verifier::verify`, against
//! HS256 (with and without `iss` / `aud`) and a two-key RS256 JWKS. This reaches the header
//! decoding (base64url, JSON, `alg`, `kid`) and jsonwebtoken's own parsing; the claims behind a
//! valid signature are the `jwt_claims` target's.
#![no_main]

use chat_service::error::Error;
use chat_service_fuzz::{hs256_verifiers, jwks_verifier, verify_twice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        // Metadata values that are not text never reach the verifier (the interceptor refuses
        // them first), so only text is worth the time.
        return;
    };
    let [plain, checked] = hs256_verifiers();
    for v in [plain, checked, jwks_verifier()] {
        verify_twice(v, text);
        // The header form: the same answer as the bare token behind `Bearer `.
        let header = v.verify_header(Some(text));
        match text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
        {
            Some(token) => {
                let bare = v.verify(token.trim());
                assert_eq!(
                    header.as_ref().map(|c| (&c.user_id, &c.tenant_id)).ok(),
                    bare.as_ref().map(|c| (&c.user_id, &c.tenant_id)).ok()
                );
            }
            None => assert!(matches!(header, Err(Error::Unauthenticated(_)))),
        }
    }
});
