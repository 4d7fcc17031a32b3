//! Helpers shared by the fuzz targets in `fuzz_targets/`: the verifiers they call, an HS256
//! signer of arbitrary bytes, and the invariants every accepted token must meet.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chat_service::auth::{AuthSettings, Caller, KeySource, Verifier, LEEWAY_SECONDS};
use chat_service::domain::validate::MAX_USER_ID_BYTES;
use chat_service::error::Error;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The HS256 secret of [`hs256_verifiers`]; seeds are signed with it (`seeds/make_seeds.py`).
pub const SECRET: &[u8] = b"fuzz-secret";
/// The issuer and audience the second HS256 verifier requires.
pub const ISSUER: &str = "fuzz-issuer";
pub const AUDIENCE: &str = "fuzz-audience";

/// The RSA keys `k1` and `k2` of the test suite (test-only, public).
pub const JWKS_K1_K2: &str = include_str!("../../tests/fixtures/jwks_k1_k2.json");

fn settings(key: KeySource, checked: bool) -> AuthSettings {
    AuthSettings {
        key,
        issuer: checked.then(|| ISSUER.to_owned()),
        audience: checked.then(|| AUDIENCE.to_owned()),
        enforce_permissions: true,
    }
}

/// Two HS256 verifiers under [`SECRET`]: without and with `iss` / `aud` checks.
pub fn hs256_verifiers() -> &'static [Verifier; 2] {
    static V: OnceLock<[Verifier; 2]> = OnceLock::new();
    V.get_or_init(|| {
        [false, true].map(|checked| {
            Verifier::new(settings(KeySource::Secret(SECRET.to_vec()), checked))
                .expect("HS256 verifier")
        })
    })
}

/// A verifier over the test suite's two-key JWKS, written once to a temporary file.
pub fn jwks_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let path = scratch_file("jwks_k1_k2.json");
        std::fs::write(&path, JWKS_K1_K2).expect("write JWKS");
        Verifier::new(settings(KeySource::Jwks(path), false)).expect("JWKS verifier")
    })
}

/// A file path private to this process, on tmpfs when there is one (cheap to rewrite).
pub fn scratch_file(name: &str) -> PathBuf {
    let base = ["/dev/shm", "/tmp"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("chat-service-fuzz-{}-{name}", std::process::id()))
}

/// `header.payload.signature` with the given header and payload bytes, signed with HS256
/// under `secret` the way RFC 7515 says: base64url without padding, HMAC-SHA256 over
/// `b64(header) "." b64(payload)`.
pub fn sign_hs256(secret: &[u8], header: &[u8], payload: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key size");
    mac.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What every accepted token must give, whatever the claim rules: a user id and a tenant of
/// 1 to 255 bytes without control characters (they become keys and stored text), and an
/// expiry that has not passed (the feed's timer and the cache of verified tokens rely on it).
pub fn check_caller(c: &Caller, before: u64) {
    for (what, v) in [("user_id", &c.user_id), ("tenant_id", &c.tenant_id)] {
        assert!(
            !v.is_empty() && v.len() <= MAX_USER_ID_BYTES,
            "{what} of {} bytes accepted: {v:?}",
            v.len()
        );
        assert!(
            !v.chars().any(char::is_control),
            "{what} with a control character accepted: {v:?}"
        );
    }
    assert!(
        c.expires_at.saturating_add(LEEWAY_SECONDS) >= before,
        "accepted, but expires_at {} is past (now {before})",
        c.expires_at
    );
}

/// Verifies `token` with `v` twice (the second answer may come from the cache of verified
/// tokens) and checks that both agree and meet [`check_caller`].
pub fn verify_twice(v: &Verifier, token: &str) {
    let before = now();
    let first = v.verify(token);
    let second = v.verify(token);
    match (&first, &second) {
        (Ok(a), Ok(b)) => {
            check_caller(a, before);
            assert_eq!(
                (&a.user_id, &a.tenant_id, a.expires_at),
                (&b.user_id, &b.tenant_id, b.expires_at),
                "the remembered token gave another caller"
            );
        }
        (Err(a), Err(b)) => {
            for e in [a, b] {
                assert!(
                    matches!(e, Error::Unauthenticated(_)),
                    "a refused token must be UNAUTHENTICATED: {e:?}"
                );
            }
        }
        // Only the clock may part them: a token whose `exp` passed between the two calls.
        _ => assert!(now() != before, "{first:?} then {second:?}"),
    }
}

/// Splits an input into `N` text fields at the byte 0xFF (which UTF-8 never uses, so every
/// field can hold any text); invalid UTF-8 becomes U+FFFD, missing fields are empty. Seeds of
/// the targets that take fields are readable this way (`seeds/`).
pub fn fields<const N: usize>(data: &[u8]) -> [String; N] {
    let mut parts = data.splitn(N, |&b| b == 0xFF);
    std::array::from_fn(|_| {
        parts
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    })
}
