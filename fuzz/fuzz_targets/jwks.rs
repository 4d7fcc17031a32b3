//! JWKS files (`JWT_JWKS`): arbitrary file contents through `Verifier::new` (JSON, key types,
//! `alg`, `kid`, RSA / EC / OKP key material), then, when the file is accepted, tokens signed
//! with the test suite's keys and an HS256 token (a shared secret must never be usable from a
//! JWKS) verified against it. The file is operator input, not a client's, but a bad one must
//! stop start-up with a message, never a panic. One small write to tmpfs per input.
#![no_main]

use std::sync::OnceLock;

use chat_service::auth::{AuthSettings, KeySource, Verifier};
use chat_service_fuzz::{scratch_file, sign_hs256, verify_twice, SECRET};
use libfuzzer_sys::fuzz_target;

/// RS256 tokens of the test keys `k1` and `k2`, with and without `kid` (seeds/make_seeds.py).
const RS256_TOKENS: &str = include_str!("../seeds/rs256_tokens.txt");

fn tokens() -> &'static Vec<String> {
    static T: OnceLock<Vec<String>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t: Vec<String> = RS256_TOKENS.lines().map(str::to_owned).collect();
        t.push(sign_hs256(
            SECRET,
            br#"{"alg":"HS256","kid":"k1"}"#,
            br#"{"sub":"mallory","exp":4102444800}"#,
        ));
        t
    })
}

fuzz_target!(|file: &[u8]| {
    let path = scratch_file("jwks.json");
    std::fs::write(&path, file).expect("write JWKS");
    let settings = AuthSettings {
        key: KeySource::Jwks(path),
        issuer: None,
        audience: None,
        enforce_permissions: true,
    };
    let Ok(v) = Verifier::new(settings) else {
        return;
    };
    for (i, token) in tokens().iter().enumerate() {
        verify_twice(&v, token);
        if i == tokens().len() - 1 {
            assert!(v.verify(token).is_err(), "an HS256 token passed a JWKS");
        }
    }
});
