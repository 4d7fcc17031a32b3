//! JWT verification into a typed [`Caller`].
//!
//! Rules (DESIGN §2): the accepted algorithm follows the configured key, never the token header,
//! so `alg: none` and algorithm confusion (an HS256 token signed with a public key) are refused.
//! `exp` is required, `nbf` honoured, `iss` / `aud` checked when configured, 30 s leeway.
//! Claims follow the sourceloop seed: user = `sub` (else `id`), tenant = `tenantId` (else
//! `tenant_id`, else `default`), permission keys = `permissions`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use crate::error::Error;

/// Clock skew accepted on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

/// A permission key of the seed (`ViewMessage`, …) or of the groups API (`ViewGroup`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Permission {
    ViewMessage,
    CreateMessage,
    UpdateMessage,
    DeleteMessage,
    ViewMessageRecipient,
    CreateMessageRecipient,
    UpdateMessageRecipient,
    DeleteMessageRecipient,
    ViewAttachmentFile,
    CreateAttachmentFile,
    UpdateAttachmentFile,
    DeleteAttachmentFile,
    ViewGroup,
    CreateGroup,
    UpdateGroup,
    DeleteGroup,
}

/// Every key, in the seed's order: the first eight also answer to the seed's numeric aliases
/// `"1"` … `"8"`.
pub const ALL_PERMISSIONS: [Permission; 16] = [
    Permission::ViewMessage,
    Permission::CreateMessage,
    Permission::UpdateMessage,
    Permission::DeleteMessage,
    Permission::ViewMessageRecipient,
    Permission::CreateMessageRecipient,
    Permission::UpdateMessageRecipient,
    Permission::DeleteMessageRecipient,
    Permission::ViewAttachmentFile,
    Permission::CreateAttachmentFile,
    Permission::UpdateAttachmentFile,
    Permission::DeleteAttachmentFile,
    Permission::ViewGroup,
    Permission::CreateGroup,
    Permission::UpdateGroup,
    Permission::DeleteGroup,
];

impl Permission {
    /// The key as it appears in a token.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ViewMessage => "ViewMessage",
            Permission::CreateMessage => "CreateMessage",
            Permission::UpdateMessage => "UpdateMessage",
            Permission::DeleteMessage => "DeleteMessage",
            Permission::ViewMessageRecipient => "ViewMessageRecipient",
            Permission::CreateMessageRecipient => "CreateMessageRecipient",
            Permission::UpdateMessageRecipient => "UpdateMessageRecipient",
            Permission::DeleteMessageRecipient => "DeleteMessageRecipient",
            Permission::ViewAttachmentFile => "ViewAttachmentFile",
            Permission::CreateAttachmentFile => "CreateAttachmentFile",
            Permission::UpdateAttachmentFile => "UpdateAttachmentFile",
            Permission::DeleteAttachmentFile => "DeleteAttachmentFile",
            Permission::ViewGroup => "ViewGroup",
            Permission::CreateGroup => "CreateGroup",
            Permission::UpdateGroup => "UpdateGroup",
            Permission::DeleteGroup => "DeleteGroup",
        }
    }

    /// Parses a key name or one of the seed's numeric aliases `"1"`..`"8"`.
    pub fn parse(s: &str) -> Option<Permission> {
        if let Ok(n) = s.parse::<usize>() {
            return (1..=8).contains(&n).then(|| ALL_PERMISSIONS[n - 1]);
        }
        ALL_PERMISSIONS.iter().copied().find(|p| p.name() == s)
    }

    fn bit(self) -> u32 {
        1 << (self as u8)
    }
}

/// The verified identity behind a request, put into request extensions by the auth layer.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `sub`, else `id`.
    pub user_id: String,
    /// `tenantId`, else `tenant_id`, else `default`.
    pub tenant_id: String,
    permissions: u32,
    enforce: bool,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Caller {
    /// A caller with the given keys, for tests and tools.
    pub fn new(
        user_id: &str,
        tenant_id: &str,
        permissions: &[Permission],
        expires_at: u64,
    ) -> Caller {
        Caller {
            user_id: user_id.to_owned(),
            tenant_id: tenant_id.to_owned(),
            permissions: permissions.iter().fold(0, |a, p| a | p.bit()),
            enforce: true,
            expires_at,
        }
    }

    /// `Ok` when the token carries `p` (or key checks are off); `PERMISSION_DENIED` otherwise.
    pub fn require(&self, p: Permission) -> Result<(), Error> {
        if !self.enforce || self.permissions & p.bit() != 0 {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "the token lacks the permission key {}",
                p.name()
            )))
        }
    }

    /// Time left until the token expires (zero when past).
    pub fn time_left(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256 shared secret (`JWT_SECRET`).
    Secret(Vec<u8>),
    /// A PEM public key file (`JWT_PUBLIC_KEY`): RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA.
    PublicKeyPem(PathBuf),
    /// A JWKS file (`JWT_JWKS`), keys picked by `kid`, re-read when the file changes.
    Jwks(PathBuf),
}

/// Verifier settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The key.
    pub key: KeySource,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required member of `aud`, when set.
    pub audience: Option<String>,
    /// `AUTH_ENFORCE_PERMISSIONS`: false switches permission-key checks off.
    pub enforce_permissions: bool,
}

#[derive(Clone)]
struct Keys {
    /// By `kid` (a JWKS), or the one configured key under `""` (secret or PEM).
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    /// A JWKS: the token's `kid` must name a key (a token without `kid` may use a one-key set).
    /// A secret or PEM key: the token's `kid`, if any, is ignored.
    match_kid: bool,
}

struct JwksCache {
    path: PathBuf,
    checked: Instant,
    modified: Option<SystemTime>,
    keys: Arc<Keys>,
}

/// Verifies bearer tokens. Cheap to share (`Arc`).
pub struct Verifier {
    settings: AuthSettings,
    fixed: Option<Arc<Keys>>,
    jwks: Option<Mutex<JwksCache>>,
    /// Tokens that passed [`Verifier::verify`] lately, by their exact text (see [`Verified`]).
    verified: quick_cache::sync::Cache<String, Arc<Verified>>,
}

/// Most tokens [`Verifier`] remembers as verified (an S3-FIFO cache of about this many). A
/// client sends the same token with every call until it renews it, and checking it again
/// (base64, two JSON documents, the signature) was a tenth of the server's CPU per send in
/// chat-bench scenario 2. A typical token and its caller take about 0.5 KiB (about 2 MiB in
/// all); tokens longer than [`MAX_REMEMBERED_TOKEN_BYTES`] are never remembered, so at most
/// about 9 MiB.
pub const VERIFIED_TOKENS: usize = 4096;

/// Longest token [`Verifier`] remembers, in bytes; longer ones are checked in full every time.
pub const MAX_REMEMBERED_TOKEN_BYTES: usize = 2048;

/// A token that passed every check, and when it stops passing them.
///
/// A remembered token is taken as verified only if it is the same text, the keys it was
/// checked with are still the ones in use (a reloaded JWKS forgets every token checked before),
/// and the clock is inside the window in which the time checks (`exp`, `nbf`, each with
/// [`LEEWAY_SECONDS`]) passed. The other checks (signature, algorithm, issuer, audience, user id)
/// depend only on the text and the keys. Anything else goes through the full check again, which
/// gives the precise error.
struct Verified {
    caller: Caller,
    keys: Arc<Keys>,
    /// First second (Unix time) the token passes the `nbf` check.
    valid_from: u64,
    /// Last second it passes the `exp` check.
    valid_until: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

/// How often, at most, the JWKS file's modification time is checked.
const JWKS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

fn pem_key(path: &PathBuf) -> Result<(DecodingKey, Algorithm), String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((k, Algorithm::ES256));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((k, Algorithm::EdDSA));
    }
    Err(format!(
        "{}: not an RSA, EC or Ed25519 public key in PEM form",
        path.display()
    ))
}

fn load_jwks(path: &PathBuf) -> Result<Keys, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                Algorithm::ES384
            }
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            // Shared secrets in a JWKS file would let anyone who reads it mint tokens.
            AlgorithmParameters::OctetKey(_) => continue,
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|ka| serde_json::to_value(ka).ok())
            .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
            .unwrap_or(alg);
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| format!("{}: bad key: {e}", path.display()))?;
        by_kid.insert(jwk.common.key_id.clone().unwrap_or_default(), (key, alg));
    }
    if by_kid.is_empty() {
        return Err(format!(
            "{}: the JWKS holds no usable public key",
            path.display()
        ));
    }
    Ok(Keys {
        by_kid,
        match_kid: true,
    })
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Verifier {
    /// Builds a verifier, reading key files once.
    ///
    /// Errors: an unreadable or unparsable key file, named in the message.
    pub fn new(settings: AuthSettings) -> Result<Verifier, String> {
        let (fixed, jwks) = match &settings.key {
            KeySource::Secret(s) => {
                if s.is_empty() {
                    return Err("JWT_SECRET is empty".into());
                }
                let mut by_kid = HashMap::new();
                by_kid.insert(
                    String::new(),
                    (DecodingKey::from_secret(s), Algorithm::HS256),
                );
                (
                    Some(Arc::new(Keys {
                        by_kid,
                        match_kid: false,
                    })),
                    None,
                )
            }
            KeySource::PublicKeyPem(p) => {
                let mut by_kid = HashMap::new();
                by_kid.insert(String::new(), pem_key(p)?);
                (
                    Some(Arc::new(Keys {
                        by_kid,
                        match_kid: false,
                    })),
                    None,
                )
            }
            KeySource::Jwks(p) => {
                let keys = load_jwks(p)?;
                let cache = JwksCache {
                    path: p.clone(),
                    checked: Instant::now(),
                    modified: modified(p),
                    keys: Arc::new(keys),
                };
                (None, Some(Mutex::new(cache)))
            }
        };
        Ok(Verifier {
            settings,
            fixed,
            jwks,
            verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS),
        })
    }

    fn keys(&self) -> Arc<Keys> {
        if let Some(k) = &self.fixed {
            return k.clone();
        }
        let Some(m) = &self.jwks else {
            return Arc::new(Keys {
                by_kid: HashMap::new(),
                match_kid: true,
            });
        };
        let mut cache = m.lock().unwrap_or_else(|p| p.into_inner());
        if cache.checked.elapsed() >= JWKS_CHECK_INTERVAL {
            cache.checked = Instant::now();
            let now = modified(&cache.path);
            if now != cache.modified {
                // Keep the old keys when the new file is half-written or broken.
                match load_jwks(&cache.path) {
                    Ok(keys) => {
                        cache.keys = Arc::new(keys);
                        cache.modified = now;
                        tracing::info!(path = %cache.path.display(), "JWKS reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS reload failed; keeping the old keys")
                    }
                }
            }
        }
        cache.keys.clone()
    }

    /// Verifies `Authorization` header text (`Bearer <jwt>`).
    ///
    /// Errors: `Error::Unauthenticated` saying which check failed (missing, malformed, `none`,
    /// unknown `kid`, bad signature, expired, not yet valid, wrong issuer, wrong audience,
    /// no user id).
    pub fn verify_header(&self, header: Option<&str>) -> Result<Caller, Error> {
        let header = header
            .ok_or_else(|| unauth("missing authorization metadata (expected `Bearer <JWT>`)"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| unauth("authorization metadata must be `Bearer <JWT>`"))?;
        self.verify(token.trim())
    }

    /// Verifies a bare JWT. Errors as [`Verifier::verify_header`].
    ///
    /// A token that passed lately is not checked again while the keys and the time window it
    /// passed in hold (see [`VERIFIED_TOKENS`]); what it gives is the same.
    pub fn verify(&self, token: &str) -> Result<Caller, Error> {
        let keys = self.keys();
        let now = unix_now();
        if let Some(v) = self.verified.get(token) {
            if Arc::ptr_eq(&v.keys, &keys) && v.valid_from <= now && now <= v.valid_until {
                return Ok(v.caller.clone());
            }
            self.verified.remove(token);
        }
        let (caller, valid_from) = self.check(token, &keys)?;
        if let Some(valid_from) = valid_from.filter(|_| token.len() <= MAX_REMEMBERED_TOKEN_BYTES) {
            self.verified.insert(
                token.to_owned(),
                Arc::new(Verified {
                    caller: caller.clone(),
                    keys,
                    valid_from,
                    valid_until: caller.expires_at.saturating_add(LEEWAY_SECONDS),
                }),
            );
        }
        Ok(caller)
    }

    /// Every check of [`Verifier::verify`] against `keys`: the caller, and the first second
    /// the token passes the `nbf` check (`None`: not to be remembered).
    fn check(&self, token: &str, keys: &Keys) -> Result<(Caller, Option<u64>), Error> {
        let raw_header = token.split('.').next().unwrap_or_default();
        let header_json: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw_header.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| unauth("malformed token"))?;
        let alg = header_json
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if alg.eq_ignore_ascii_case("none") {
            return Err(unauth("unsigned tokens (alg none) are refused"));
        }
        let kid = header_json
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let only = || {
            if keys.by_kid.len() == 1 {
                keys.by_kid.values().next()
            } else {
                None
            }
        };
        let found = match (keys.match_kid, kid.is_empty()) {
            (false, _) | (true, true) => keys.by_kid.get(kid).or_else(only),
            (true, false) => keys.by_kid.get(kid),
        };
        let (key, key_alg) = found.ok_or_else(|| unauth(format!("no key with kid {kid:?}")))?;
        let mut v = Validation::new(*key_alg);
        v.leeway = LEEWAY_SECONDS;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.settings.issuer.is_some() {
            required.push("iss");
        }
        if self.settings.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match &self.settings.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.settings.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<HashMap<String, Value>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            unauth(match e.kind() {
                K::ExpiredSignature => "token expired".to_owned(),
                K::InvalidSignature => "bad signature".to_owned(),
                K::InvalidIssuer => "wrong issuer".to_owned(),
                K::InvalidAudience => "wrong audience".to_owned(),
                K::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                K::InvalidAlgorithm => {
                    format!("algorithm {alg} not accepted (expected {key_alg:?})")
                }
                K::MissingRequiredClaim(c) => format!("missing claim {c}"),
                _ => "malformed token".to_owned(),
            })
        })?;
        let claims = data.claims;
        let text = |v: &Value| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let user_id = claims
            .get("sub")
            .and_then(text)
            .or_else(|| claims.get("id").and_then(text))
            .ok_or_else(|| unauth("the token has no user id (sub or id claim)"))?;
        let tenant_id = claims
            .get("tenantId")
            .and_then(text)
            .or_else(|| claims.get("tenant_id").and_then(text))
            .unwrap_or_else(|| "default".to_owned());
        // Ids become keys and stored text: the same rules as user ids in requests.
        for (claim, v) in [("user id", &user_id), ("tenant", &tenant_id)] {
            if v.len() > 255 || v.chars().any(char::is_control) {
                return Err(unauth(format!(
                    "malformed token: the {claim} claim must be 1 to 255 bytes without control characters"
                )));
            }
        }
        let permissions = claims
            .get("permissions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().and_then(Permission::parse))
                    .fold(0, |acc, p| acc | p.bit())
            })
            .unwrap_or(0);
        // A NumericDate may have a fraction (RFC 7519 §2), which jsonwebtoken accepts and
        // truncates; so do we, or a feed would take such a token as already expired.
        let expires_at = claims.get("exp").and_then(numeric_date).unwrap_or(0);
        // When the time checks start to pass, for the cache of verified tokens: a token whose
        // `exp` or `nbf` is not a whole number of seconds is not remembered at all.
        let valid_from = match claims.get("nbf") {
            _ if !claims.get("exp").is_some_and(Value::is_u64) => None,
            None => Some(0),
            Some(nbf) => nbf.as_u64().map(|n| n.saturating_sub(LEEWAY_SECONDS)),
        };
        let caller = Caller {
            user_id,
            tenant_id,
            permissions,
            enforce: self.settings.enforce_permissions,
            expires_at,
        };
        Ok((caller, valid_from))
    }
}

/// A NumericDate claim in whole seconds: an integer, or a finite non-negative number with a
/// fraction, truncated (as jsonwebtoken reads `exp` and `nbf`).
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unauth(m: impl Into<String>) -> Error {
    Error::Unauthenticated(m.into())
}

/// Claims of a token minted by [`mint_hs256`].
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    pub sub: &'a str,
    pub tenant: &'a str,
    pub permissions: Vec<String>,
    /// Lifetime in seconds (may be negative, for tests of expiry).
    pub ttl_seconds: i64,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// Every permission key by name, for development tokens.
pub fn all_permission_names() -> Vec<String> {
    ALL_PERMISSIONS
        .iter()
        .map(|p| p.name().to_owned())
        .collect()
}

/// Mints an HS256 token (the `token` subcommand and tests).
///
/// Errors: only if signing fails, which HS256 with any secret does not.
pub fn mint_hs256(
    secret: &[u8],
    spec: &TokenSpec<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let mut claims = serde_json::json!({
        "sub": spec.sub,
        "tenantId": spec.tenant,
        "permissions": spec.permissions,
        "iat": now,
        "exp": now + spec.ttl_seconds,
    });
    if let Some(iss) = spec.issuer {
        claims["iss"] = Value::from(iss);
    }
    if let Some(aud) = spec.audience {
        claims["aud"] = Value::from(aud);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `jwt_claims` fuzz target: a token whose `exp` has a fraction passed
    /// verification (jsonwebtoken truncates it) but gave `expires_at` 0, so a live feed of
    /// that caller ended at once as if the token had expired.
    #[test]
    fn fractional_exp_is_truncated_not_zero() {
        let secret = b"s";
        let v = Verifier::new(AuthSettings {
            key: KeySource::Secret(secret.to_vec()),
            issuer: None,
            audience: None,
            enforce_permissions: true,
        })
        .unwrap();
        let exp = unix_now() + 3600;
        let claims = serde_json::json!({ "sub": "alice", "exp": exp as f64 + 0.5 });
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        let caller = v.verify(&token).unwrap();
        assert_eq!(caller.expires_at, exp);
        assert!(caller.time_left() > Duration::from_secs(3000));
    }

    #[test]
    fn numeric_date_reads_whole_and_fractional_seconds_only() {
        use serde_json::json;
        assert_eq!(numeric_date(&json!(5)), Some(5));
        assert_eq!(numeric_date(&json!(5.9)), Some(5));
        assert_eq!(numeric_date(&json!(-1)), None);
        assert_eq!(numeric_date(&json!(-0.5)), None);
        assert_eq!(numeric_date(&json!(1e300)), None);
        assert_eq!(numeric_date(&json!("5")), None);
    }
}
