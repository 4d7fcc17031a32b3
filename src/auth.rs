//! JWT verification into a typed [`Caller`].
//!
//! Rules (DESIGN §2): the accepted algorithm follows the configured key, never the token header,
//! so `alg: none` and algorithm confusion (an HS256 token signed with a public key) are refused.
//! `exp` is required, `nbf` honoured, `iss` / `aud` checked when configured, 30 s leeway.
//! Claims follow the sourceloop seed: user = `sub` (else `id`), tenant = `tenantId` (else
//! `tenant_id`, else `default`), permission keys = `permissions`. Only an absent claim takes
//! the next one or the default: a claim that is present with the wrong JSON type (a number,
//! null, an object, an empty string) is refused, naming the claim. `exp` and `nbf` are RFC 7519
//! NumericDates, whole or fractional seconds.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use crate::error::Error;

/// Clock skew accepted on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

/// The longest a token is taken to live, whatever its `exp`: 100 years.
pub const MAX_TOKEN_TIME_LEFT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

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

    /// Time left until the token's `exp` (a live feed ends then; unary calls allow
    /// [`LEEWAY_SECONDS`] more for clock skew at the start of a call). Zero when past; at most
    /// [`MAX_TOKEN_TIME_LEFT`], since an `exp` of 10^19 is legal and would overflow a clock.
    pub fn time_left(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now())).min(MAX_TOKEN_TIME_LEFT)
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

/// The keys of a JWKS file, swapped in whole by a watcher thread when the file changes, so a
/// request only ever loads the current set (no file I/O, no lock held across a read).
type JwksKeys = Arc<arc_swap::ArcSwap<Keys>>;

/// Verifies bearer tokens. Cheap to share (`Arc`).
pub struct Verifier {
    settings: AuthSettings,
    fixed: Option<Arc<Keys>>,
    jwks: Option<JwksKeys>,
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

/// Reads a JWKS file: every usable verification key, by `kid`.
///
/// A key is skipped (and logged) when it cannot be used: not valid JSON for a JWK, an unknown
/// key type or curve, a shared secret (`kty: oct`: anyone who reads the file could mint
/// tokens), bad key material, or one not meant for verifying signatures (`use` other than
/// `sig`, or `key_ops` without `verify`; RFC 7517 §4.2-4.3). One bad key must not take the
/// others down with it, at start-up or on rotation.
///
/// Errors: an unreadable file, text that is not a JWKS (`{"keys": [...]}`), or a set without
/// any usable key.
fn load_jwks(path: &PathBuf) -> Result<Keys, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: RawSet = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
    let mut by_kid = HashMap::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
        match jwk_key(raw) {
            Ok((key, alg)) => {
                by_kid.insert(kid.unwrap_or_default(), (key, alg));
            }
            Err(why) => tracing::warn!(
                path = %path.display(),
                index = i,
                kid = kid.as_deref().unwrap_or(""),
                "JWKS: skipping a key: {why}"
            ),
        }
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

/// One JWK as a verification key and its algorithm, or why it cannot be used.
fn jwk_key(raw: Value) -> Result<(DecodingKey, Algorithm), String> {
    use jsonwebtoken::jwk::{Jwk, KeyOperations, PublicKeyUse};
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a usable JWK: {e}"))?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("use is {other:?}, not sig")),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("key_ops does not include verify".into());
        }
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        // Shared secrets in a JWKS file would let anyone who reads it mint tokens.
        AlgorithmParameters::OctetKey(_) => return Err("a shared secret (kty oct)".into()),
    };
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|ka| serde_json::to_value(ka).ok())
        .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
        .unwrap_or(alg);
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok((key, alg))
}

/// Watches a JWKS file from a thread of its own: every [`JWKS_CHECK_INTERVAL`] it compares the
/// file's modification time with the last one loaded and, when it changed, loads the file and
/// swaps the new set in (a half-written or broken file keeps the old keys, and is tried again at
/// the next change). The thread ends once the verifier holding `keys` is dropped.
fn watch_jwks(
    path: PathBuf,
    mut loaded: Option<SystemTime>,
    keys: std::sync::Weak<arc_swap::ArcSwap<Keys>>,
) {
    let spawned = std::thread::Builder::new()
        .name("jwks-watch".into())
        .spawn(move || loop {
            std::thread::sleep(JWKS_CHECK_INTERVAL);
            let Some(keys) = keys.upgrade() else {
                return;
            };
            // The time before the read: a rewrite during the read is seen at the next check.
            let now = modified(&path);
            if now == loaded {
                continue;
            }
            match load_jwks(&path) {
                Ok(new) => {
                    keys.store(Arc::new(new));
                    loaded = now;
                    tracing::info!(path = %path.display(), "JWKS reloaded");
                }
                // Tried again every interval until it loads (a half-written file whose writer
                // finishes within the same mtime tick must still be picked up).
                Err(e) => tracing::warn!(error = %e, "JWKS reload failed; keeping the old keys"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the JWKS watcher; keys will not rotate");
    }
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
                let loaded = modified(p);
                let keys: JwksKeys = Arc::new(arc_swap::ArcSwap::from_pointee(load_jwks(p)?));
                watch_jwks(p.clone(), loaded, Arc::downgrade(&keys));
                (None, Some(keys))
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
        match &self.jwks {
            Some(keys) => keys.load_full(),
            None => Arc::new(Keys {
                by_kid: HashMap::new(),
                match_kid: true,
            }),
        }
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
                K::InvalidClaimFormat(c) => {
                    format!("malformed token: the {c} claim has the wrong type")
                }
                // A JSON error after jsonwebtoken read the header means the signature verified
                // (it checks it before reading the claims): the claims are worth explaining.
                K::Json(_) if jsonwebtoken::decode_header(token).is_ok() => {
                    return self.explain_claims(token)
                }
                _ => "malformed token".to_owned(),
            })
        })?;
        self.caller_from_claims(&data.claims)
    }

    /// The caller a verified token's claims name, and the first second the token passes the
    /// `nbf` check (`None`: not to be remembered). Errors: a claim present with the wrong type.
    fn caller_from_claims(
        &self,
        claims: &HashMap<String, Value>,
    ) -> Result<(Caller, Option<u64>), Error> {
        let user_id = match id_claim(claims, "sub")? {
            Some(id) => id,
            None => id_claim(claims, "id")?
                .ok_or_else(|| unauth("the token has no user id (sub or id claim)"))?,
        };
        let tenant_id = match id_claim(claims, "tenantId")? {
            Some(t) => t,
            None => id_claim(claims, "tenant_id")?.unwrap_or_else(|| DEFAULT_TENANT.to_owned()),
        };
        let permissions = match claims.get("permissions") {
            None => 0,
            Some(Value::Array(a)) => a.iter().try_fold(0, |acc, p| match p {
                // Keys this service does not know (another service's) are ignored.
                Value::String(s) => Ok(Permission::parse(s).map_or(acc, |p| acc | p.bit())),
                _ => Err(unauth(
                    "malformed token: the permissions claim must be an array of strings",
                )),
            })?,
            Some(_) => {
                return Err(unauth(
                    "malformed token: the permissions claim must be an array of strings",
                ))
            }
        };
        // `exp` passed jsonwebtoken's check, which reads a number (integer or not, RFC 7519
        // NumericDate) and rounds it; read it the same way so every path agrees on the instant.
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or_else(|| unauth("malformed token: exp must be a number of seconds"))?;
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

    /// Why a token whose signature verified could not be read by jsonwebtoken (it reports only
    /// "JSON error" when, say, `sub` is an object): our own reading of the payload names the
    /// claim; "malformed token" when it cannot.
    fn explain_claims(&self, token: &str) -> Error {
        let payload = token.split('.').nth(1).unwrap_or_default();
        let claims: Option<HashMap<String, Value>> =
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        match claims.map(|c| self.caller_from_claims(&c)) {
            Some(Err(e)) => e,
            _ => unauth("malformed token"),
        }
    }
}

/// The tenant of a token without `tenantId` or `tenant_id`.
pub const DEFAULT_TENANT: &str = "default";

/// Longest user or tenant id a token may carry, in bytes (the limit of ids in requests).
pub const MAX_CLAIM_ID_BYTES: usize = 255;

/// An id claim (`sub`, `id`, `tenantId`, `tenant_id`): `None` when absent, the text when it is
/// a string of 1 to [`MAX_CLAIM_ID_BYTES`] bytes without control characters.
///
/// Errors: `UNAUTHENTICATED` naming the claim when it is present but anything else (a number,
/// null, an object, an array, a boolean, an empty or over-long string). Only an absent claim
/// falls back to the next one: a malformed `tenantId` must not quietly mean tenant `default`.
fn id_claim(claims: &HashMap<String, Value>, name: &str) -> Result<Option<String>, Error> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_CLAIM_ID_BYTES && !s.chars().any(char::is_control) =>
        {
            Ok(Some(s.clone()))
        }
        Some(_) => Err(unauth(format!(
            "malformed token: the {name} claim must be a string of 1 to {MAX_CLAIM_ID_BYTES} bytes without control characters"
        ))),
    }
}

/// An RFC 7519 NumericDate as jsonwebtoken reads it: a non-negative integer, or a finite
/// non-negative number rounded to the nearest second.
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
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
    /// verification (jsonwebtoken rounds it) but gave `expires_at` 0, so a live feed of
    /// that caller ended at once as if the token had expired.
    #[test]
    fn fractional_exp_is_rounded_not_zero() {
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
        // Rounded, as jsonwebtoken's own check reads it (`f64::round`, half away from zero).
        assert_eq!(caller.expires_at, exp + 1);
        assert!(caller.time_left() > Duration::from_secs(3000));
    }

    #[test]
    fn numeric_date_reads_whole_and_fractional_seconds_only() {
        use serde_json::json;
        assert_eq!(numeric_date(&json!(5)), Some(5));
        assert_eq!(numeric_date(&json!(5.9)), Some(6));
        assert_eq!(numeric_date(&json!(5.4)), Some(5));
        assert_eq!(numeric_date(&json!(-1)), None);
        assert_eq!(numeric_date(&json!(-0.5)), None);
        assert_eq!(numeric_date(&json!(1e300)), None);
        assert_eq!(numeric_date(&json!("5")), None);
    }
}
