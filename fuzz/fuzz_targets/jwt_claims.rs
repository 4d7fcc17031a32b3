//! JWT claims behind a valid signature: the input is the payload (claims JSON, or anything),
//! signed here with HS256 under the verifier's secret, so every input passes the signature
//! check and reaches the claims: `exp` / `nbf` / `iss` / `aud` checks, user id (`sub`, `id`),
//! tenant (`tenantId`, `tenant_id`), `permissions`, and the cache of verified tokens.
//!
//! Only what holds under any claim rules is asserted: no panic, a refusal is UNAUTHENTICATED,
//! and an accepted token gives ids of 1 to 255 bytes without control characters and an expiry
//! not yet past (see `check_caller`).
#![no_main]

use chat_service_fuzz::{hs256_verifiers, sign_hs256, verify_twice, SECRET};
use libfuzzer_sys::fuzz_target;

const HEADER: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

fuzz_target!(|claims: &[u8]| {
    let token = sign_hs256(SECRET, HEADER, claims);
    for v in hs256_verifiers() {
        verify_twice(v, &token);
    }
});
