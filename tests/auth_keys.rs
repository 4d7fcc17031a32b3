//! Key sources and claims of DESIGN §2 against a real server: RS256 / ES256 / EdDSA with a PEM
//! public key, JWKS with `kid` and rotation without restart, algorithm confusion and `alg: none`
//! refused, sourceloop-style claims, numeric permission aliases, `exp` / `nbf` / `iss` / `aud`,
//! and UNAUTHENTICATED messages that name the failed check and never the secret.
//!
//! The keys are test-only fixtures under `tests/fixtures/` (see its README).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use chat_service::auth::{self, AuthSettings, KeySource, Verifier};
use chat_service::proto;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tonic::Code;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Standard claims for `user` in tenant `default` with every permission, valid an hour.
fn claims(user: &str) -> Value {
    json!({
        "sub": user,
        "tenantId": "default",
        "permissions": auth::all_permission_names(),
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// Signs `claims` with the private key fixture `private` using `alg` and an optional `kid`.
fn sign(alg: Algorithm, kid: Option<&str>, private: &str, claims: &Value) -> String {
    let pem = read_fixture(private);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .expect("private key fixture");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

/// An HS256 token over `claims` with `secret`.
fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

/// An unsigned token: header `{"alg":"none"}`, empty signature.
fn unsigned(claims: &Value) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

async fn pem_server(public: &str) -> TestServer {
    TestServer::start_with(
        Backend::Sqlite,
        Options {
            key: Some(KeySource::PublicKeyPem(fixture(public))),
            ..Default::default()
        },
    )
    .await
}

/// Calls ListGroups (key ViewGroup) with `token`.
async fn call(
    server: &TestServer,
    token: &str,
) -> Result<proto::ListGroupsResponse, tonic::Status> {
    let mut g = server.groups(token).await;
    g.list_groups(proto::ListGroupsRequest::default())
        .await
        .map(|r| r.into_inner())
}

async fn accepted(server: &TestServer, token: &str, what: &str) {
    if let Err(s) = call(server, token).await {
        panic!("{what}: expected the token to be accepted, got {s:?}");
    }
}

/// Asserts UNAUTHENTICATED whose message contains one of `needles` (case-insensitive) and none
/// of the `secrets`.
fn assert_unauth<T: std::fmt::Debug>(
    res: Result<T, tonic::Status>,
    needles: &[&str],
    secrets: &[&[u8]],
    what: &str,
) {
    let status = match res {
        Ok(v) => panic!("{what}: expected UNAUTHENTICATED, got Ok({v:?})"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    let msg = status.message().to_lowercase();
    assert!(
        needles.is_empty() || needles.iter().any(|n| msg.contains(&n.to_lowercase())),
        "{what}: message {:?} should say which check failed ({needles:?})",
        status.message()
    );
    for secret in secrets {
        let text = String::from_utf8_lossy(secret);
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 8 && !l.starts_with("-----"))
        {
            assert!(
                !status.message().contains(line),
                "{what}: message {:?} leaks key material",
                status.message()
            );
        }
    }
}

async fn unauth(server: &TestServer, token: &str, needles: &[&str], secrets: &[&[u8]], what: &str) {
    assert_unauth(call(server, token).await, needles, secrets, what);
}

// ---------------------------------------------------------------------------------------------
// PEM public keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_with_public_key_pem() {
    let server = pem_server("rsa_public.pem").await;
    accepted(
        &server,
        &sign(Algorithm::RS256, None, "rsa_private.pem", &claims("alice")),
        "RS256",
    )
    .await;
    // A kid in the header does not matter for a single PEM key.
    accepted(
        &server,
        &sign(
            Algorithm::RS256,
            Some("any"),
            "rsa_private.pem",
            &claims("alice"),
        ),
        "RS256 with kid",
    )
    .await;
    // Signed by another RSA key: bad signature.
    unauth(
        &server,
        &sign(Algorithm::RS256, None, "rsa2_private.pem", &claims("alice")),
        &["signature"],
        &[],
        "RS256 signed by another key",
    )
    .await;
    // The right key but an algorithm other than the configured key's.
    unauth(
        &server,
        &sign(Algorithm::ES256, None, "ec_private.pem", &claims("alice")),
        &[],
        &[],
        "ES256 token on an RSA key",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_with_public_key_pem() {
    let server = pem_server("ec_public.pem").await;
    accepted(
        &server,
        &sign(Algorithm::ES256, None, "ec_private.pem", &claims("alice")),
        "ES256",
    )
    .await;
    unauth(
        &server,
        &sign(Algorithm::RS256, None, "rsa_private.pem", &claims("alice")),
        &[],
        &[],
        "RS256 token on an EC key",
    )
    .await;
    unauth(
        &server,
        &sign_hs256(&read_fixture("ec_public.pem"), &claims("alice")),
        &[],
        &[&read_fixture("ec_public.pem")],
        "HS256 with the EC public key as secret",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_with_public_key_pem() {
    let server = pem_server("ed25519_public.pem").await;
    accepted(
        &server,
        &sign(
            Algorithm::EdDSA,
            None,
            "ed25519_private.pem",
            &claims("alice"),
        ),
        "EdDSA",
    )
    .await;
    unauth(
        &server,
        &sign(Algorithm::ES256, None, "ec_private.pem", &claims("alice")),
        &[],
        &[],
        "ES256 token on an Ed25519 key",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithm_confusion_and_none_are_refused() {
    let server = pem_server("rsa_public.pem").await;
    let pem = read_fixture("rsa_public.pem");
    // HS256 whose HMAC secret is the configured public key's PEM bytes (with and without the
    // final newline).
    unauth(
        &server,
        &sign_hs256(&pem, &claims("mallory")),
        &[],
        &[&pem],
        "HS256 signed with the RSA public key PEM",
    )
    .await;
    let trimmed = String::from_utf8(pem.clone()).unwrap();
    unauth(
        &server,
        &sign_hs256(trimmed.trim_end().as_bytes(), &claims("mallory")),
        &[],
        &[&pem],
        "HS256 signed with the trimmed PEM",
    )
    .await;
    // alg none, and its case variants.
    for alg in ["none", "None", "NONE"] {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        let t = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT"})),
            b64(&claims("mallory"))
        );
        unauth(&server, &t, &[], &[&pem], &format!("alg {alg}")).await;
    }
    server.stop().await;

    // The same on an HS256 server: alg none is refused, the secret never appears.
    let server = TestServer::start(Backend::Sqlite).await;
    unauth(
        &server,
        &unsigned(&claims("mallory")),
        &["none", "unsigned"],
        &[SECRET.as_bytes()],
        "alg none on an HS256 server",
    )
    .await;
    // An RS256 token on an HS256 server.
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            None,
            "rsa_private.pem",
            &claims("mallory"),
        ),
        &[],
        &[SECRET.as_bytes()],
        "RS256 token on an HS256 server",
    )
    .await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// JWKS

async fn jwks_server(path: &Path) -> TestServer {
    TestServer::start_with(
        Backend::Sqlite,
        Options {
            key: Some(KeySource::Jwks(path.to_owned())),
            ..Default::default()
        },
    )
    .await
}

/// Replaces `path` atomically (temp file + rename) with the fixture `name`.
fn replace_with(path: &Path, name: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, read_fixture(name)).expect("write jwks");
    std::fs::rename(&tmp, path).expect("rename jwks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_picks_keys_by_kid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace_with(&path, "jwks_k1.json");
    let server = jwks_server(&path).await;
    let k1 = sign(
        Algorithm::RS256,
        Some("k1"),
        "rsa_private.pem",
        &claims("alice"),
    );
    accepted(&server, &k1, "kid k1").await;
    // Unknown kid signed by a key that is not in the set.
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k9"),
            "rsa2_private.pem",
            &claims("alice"),
        ),
        &[],
        &[],
        "unknown kid, foreign key",
    )
    .await;
    // The right kid, the wrong key.
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k1"),
            "rsa2_private.pem",
            &claims("alice"),
        ),
        &["signature"],
        &[],
        "kid k1 signed by k2's key",
    )
    .await;
    // Algorithm confusion against a JWKS key.
    let n = serde_json::from_slice::<Value>(&read_fixture("jwks_k1.json")).unwrap()["keys"][0]["n"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    for secret in [
        read_fixture("rsa_public.pem"),
        read_fixture("jwks_k1.json"),
        n.into_bytes(),
    ] {
        let t = jsonwebtoken::encode(&h, &claims("mallory"), &EncodingKey::from_secret(&secret))
            .unwrap();
        unauth(&server, &t, &[], &[&secret], "HS256 with kid k1").await;
    }
    unauth(
        &server,
        &unsigned(&claims("mallory")),
        &[],
        &[],
        "alg none on a JWKS server",
    )
    .await;
    server.stop().await;
}

/// Keys are picked by `kid` (DESIGN §2): a token naming a kid the set does not hold is refused,
/// even when the set has one key only and the signature would verify with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_unknown_kid_refused_with_a_single_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace_with(&path, "jwks_k1.json");
    let server = jwks_server(&path).await;
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k9"),
            "rsa_private.pem",
            &claims("alice"),
        ),
        &["kid"],
        &[],
        "unknown kid k9 (signed with k1's key)",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_holds_several_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace_with(&path, "jwks_k1_k2.json");
    let server = jwks_server(&path).await;
    accepted(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k1"),
            "rsa_private.pem",
            &claims("alice"),
        ),
        "k1 of two",
    )
    .await;
    accepted(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k2"),
            "rsa2_private.pem",
            &claims("alice"),
        ),
        "k2 of two",
    )
    .await;
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k3"),
            "rsa_private.pem",
            &claims("alice"),
        ),
        &["kid"],
        &[],
        "unknown kid k3",
    )
    .await;
    unauth(
        &server,
        &sign(
            Algorithm::RS256,
            Some("k2"),
            "rsa_private.pem",
            &claims("alice"),
        ),
        &["signature"],
        &[],
        "kid k2 signed by k1's key",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotates_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace_with(&path, "jwks_k1.json");
    let server = jwks_server(&path).await;
    let k1 = sign(
        Algorithm::RS256,
        Some("k1"),
        "rsa_private.pem",
        &claims("alice"),
    );
    let k2 = sign(
        Algorithm::RS256,
        Some("k2"),
        "rsa2_private.pem",
        &claims("alice"),
    );
    accepted(&server, &k1, "k1 before rotation").await;
    unauth(&server, &k2, &[], &[], "k2 before rotation").await;

    // The verifier looks at the file's mtime at most once a second: let that second pass and
    // make sure the new file has a different mtime.
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    replace_with(&path, "jwks_k2.json");
    let after = std::fs::metadata(&path).unwrap().modified().unwrap();
    assert_ne!(before, after, "the rewritten JWKS must have a new mtime");

    // The file is watched off the request path, once a second: wait for the swap.
    tokio::time::timeout(Duration::from_secs(20), async {
        while call(&server, &k2).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("k2 accepted after rotation");
    unauth(&server, &k1, &[], &[], "k1 after rotation").await;
    server.stop().await;
}

/// One unusable key does not take the set down: a JWKS with a key of bad material, one of an
/// unknown type, a shared secret, one for encryption (`use: enc`) and one whose `key_ops` lack
/// `verify` still starts the server with its one good key; tokens of the skipped keys are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_skips_unusable_keys() {
    let k1: Value = serde_json::from_slice(&read_fixture("jwks_k1.json")).expect("k1");
    let k2: Value = serde_json::from_slice(&read_fixture("jwks_k2.json")).expect("k2");
    let key = |set: &Value, kid: &str, extra: Value| {
        let mut k = set["keys"][0].clone();
        k["kid"] = Value::from(kid);
        for (name, v) in extra.as_object().expect("object") {
            k[name] = v.clone();
        }
        k
    };
    let set = json!({"keys": [
        {"kty": "RSA", "kid": "bad", "n": "!!!", "e": "AQAB"},
        {"kty": "XYZ", "kid": "weird"},
        {"kty": "oct", "kid": "secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
        key(&k1, "enc", json!({"use": "enc"})),
        key(&k1, "signonly", json!({"use": null, "key_ops": ["sign"]})),
        key(&k2, "good", json!({})),
    ]});
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&set).expect("json")).expect("write");
    let server = jwks_server(&path).await;
    let token =
        |kid: &str, private: &str| sign(Algorithm::RS256, Some(kid), private, &claims("alice"));
    accepted(&server, &token("good", "rsa2_private.pem"), "the good key").await;
    for (kid, why) in [
        ("enc", "use enc"),
        ("signonly", "key_ops without verify"),
        ("bad", "bad material"),
    ] {
        unauth(&server, &token(kid, "rsa_private.pem"), &["kid"], &[], why).await;
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Claims

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sourceloop_claims_id_and_tenant_id() {
    let server = TestServer::start(Backend::Sqlite).await;
    let now = now();
    let sourceloop = sign_hs256(
        SECRET.as_bytes(),
        &json!({
            "id": "carol",
            "tenant_id": "acme",
            "permissions": auth::all_permission_names(),
            "iat": now,
            "exp": now + 3600,
        }),
    );
    let mut g = server.groups(&sourceloop).await;
    let ch = g
        .create_group(proto::CreateGroupRequest {
            name: "sourceloop".into(),
            ..Default::default()
        })
        .await
        .expect("create group with a sourceloop token")
        .into_inner()
        .channel
        .expect("channel");
    let members = g
        .list_members(proto::ListMembersRequest {
            channel_id: ch.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list members")
        .into_inner()
        .members;
    assert_eq!(
        members
            .iter()
            .map(|m| m.user_id.as_str())
            .collect::<Vec<_>>(),
        ["carol"],
        "user id comes from `id`"
    );
    // The same user in tenant acme (standard claims) sees it; in tenant default they do not.
    let acme = server
        .groups(&token_with(
            "carol",
            "acme",
            auth::all_permission_names(),
            3600,
        ))
        .await
        .list_groups(proto::ListGroupsRequest::default())
        .await
        .expect("list acme")
        .into_inner();
    assert_eq!(acme.channels.len(), 1, "tenant comes from `tenant_id`");
    assert_eq!(acme.channels[0].id, ch.id);
    let default = server
        .groups(&token("carol"))
        .await
        .list_groups(proto::ListGroupsRequest::default())
        .await
        .expect("list default")
        .into_inner();
    assert!(default.channels.is_empty(), "another tenant sees nothing");

    // `sub` wins over `id`, `tenantId` over `tenant_id`; no tenant at all means `default`.
    let both = sign_hs256(
        SECRET.as_bytes(),
        &json!({
            "sub": "dave", "id": "not-dave",
            "tenantId": "acme", "tenant_id": "not-acme",
            "permissions": auth::all_permission_names(),
            "exp": now + 3600,
        }),
    );
    let mut g = server.groups(&both).await;
    let ch2 = g
        .create_group(proto::CreateGroupRequest {
            name: "both".into(),
            ..Default::default()
        })
        .await
        .expect("create group")
        .into_inner()
        .channel
        .expect("channel");
    let members = g
        .list_members(proto::ListMembersRequest {
            channel_id: ch2.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list members")
        .into_inner()
        .members;
    assert_eq!(members[0].user_id, "dave");
    server
        .groups(&token_with(
            "dave",
            "acme",
            auth::all_permission_names(),
            3600,
        ))
        .await
        .get_group(proto::GetGroupRequest { channel_id: ch2.id })
        .await
        .expect("dave in acme sees the group");

    let no_tenant = sign_hs256(
        SECRET.as_bytes(),
        &json!({"sub": "erin", "permissions": auth::all_permission_names(), "exp": now + 3600}),
    );
    let ch3 = server
        .groups(&no_tenant)
        .await
        .create_group(proto::CreateGroupRequest {
            name: "no tenant".into(),
            ..Default::default()
        })
        .await
        .expect("create group")
        .into_inner()
        .channel
        .expect("channel");
    server
        .groups(&token("erin"))
        .await
        .get_group(proto::GetGroupRequest { channel_id: ch3.id })
        .await
        .expect("no tenant claim means tenant default");

    // Neither `sub` nor `id`: no user.
    unauth(
        &server,
        &sign_hs256(
            SECRET.as_bytes(),
            &json!({"tenantId": "default", "permissions": ["ViewGroup"], "exp": now + 3600}),
        ),
        &["user", "sub"],
        &[SECRET.as_bytes()],
        "no sub and no id",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_permission_aliases() {
    let server = TestServer::start(Backend::Sqlite).await;
    let ch = group(&server, "alice", &["numeric"]).await;
    let t = token_with("numeric", "default", vec!["2".into(), "1".into()], 3600);
    let mut chat = server.chat(&t).await;
    // "2" = CreateMessage
    let m = send(&mut chat, &ch, "sent with alias 2").await;
    // "1" = ViewMessage
    let list = chat
        .list_messages(proto::ListMessagesRequest {
            channel_id: ch.clone(),
            ..Default::default()
        })
        .await
        .expect("ListMessages with alias 1")
        .into_inner();
    assert_eq!(list.messages[0].id, m.id);
    // Nothing maps to CreateGroup or ViewGroup.
    let err = server
        .groups(&t)
        .await
        .create_group(proto::CreateGroupRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("CreateGroup without the key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = call(&server, &t)
        .await
        .expect_err("ListGroups without the key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Without "3" no UpdateMessage.
    let err = chat
        .update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: "edited".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["body".into()],
            }),
            ..Default::default()
        })
        .await
        .expect_err("UpdateMessage without the key");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // "3" = UpdateMessage
    let t3 = token_with("numeric", "default", vec!["3".into()], 3600);
    server
        .chat(&t3)
        .await
        .update_message(proto::UpdateMessageRequest {
            message_id: m.id,
            body: "edited".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["body".into()],
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateMessage with alias 3");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_with_leeway() {
    let server = TestServer::start(Backend::Sqlite).await;
    let secret: &[&[u8]] = &[SECRET.as_bytes()];
    let with = |extra: Value| {
        let mut c = claims("alice");
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        sign_hs256(SECRET.as_bytes(), &c)
    };
    let now = now();
    // nbf
    unauth(
        &server,
        &with(json!({"nbf": now + 120})),
        &["nbf", "not valid yet", "not yet valid"],
        secret,
        "nbf two minutes ahead",
    )
    .await;
    accepted(
        &server,
        &with(json!({"nbf": now + 10})),
        "nbf within leeway",
    )
    .await;
    accepted(&server, &with(json!({"nbf": now - 10})), "nbf in the past").await;
    // exp
    unauth(
        &server,
        &with(json!({"exp": null})),
        &["exp"],
        secret,
        "missing exp",
    )
    .await;
    unauth(
        &server,
        &with(json!({"exp": now - 120})),
        &["expired"],
        secret,
        "expired two minutes ago",
    )
    .await;
    accepted(
        &server,
        &with(json!({"exp": now - 10})),
        "expired within leeway",
    )
    .await;
    // Also through the harness's own minting.
    unauth(
        &server,
        &token_with("alice", "default", auth::all_permission_names(), -3600),
        &["expired"],
        secret,
        "expired an hour ago",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_checked_when_configured() {
    let server = TestServer::start_with(
        Backend::Sqlite,
        Options {
            issuer: Some("https://issuer.test".into()),
            ..Default::default()
        },
    )
    .await;
    let mut c = claims("alice");
    c["iss"] = json!("https://issuer.test");
    accepted(&server, &sign_hs256(SECRET.as_bytes(), &c), "right issuer").await;
    c["iss"] = json!("https://evil.test");
    unauth(
        &server,
        &sign_hs256(SECRET.as_bytes(), &c),
        &["issuer"],
        &[SECRET.as_bytes()],
        "wrong issuer",
    )
    .await;
    server.stop().await;
}

/// `iss` must equal JWT_ISSUER when set (DESIGN §2): a token without `iss` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_iss_refused_when_issuer_configured() {
    let server = TestServer::start_with(
        Backend::Sqlite,
        Options {
            issuer: Some("https://issuer.test".into()),
            ..Default::default()
        },
    )
    .await;
    unauth(
        &server,
        &sign_hs256(SECRET.as_bytes(), &claims("alice")),
        &["iss"],
        &[SECRET.as_bytes()],
        "no issuer",
    )
    .await;
    server.stop().await;
}

/// The verifier remembers tokens it passed, but a remembered token still expires: a token
/// that is past `exp` but inside the leeway passes, is remembered, and is refused as expired
/// once the leeway runs out, as a token checked afresh would be.
#[test]
fn a_remembered_token_still_expires() {
    let verifier = Verifier::new(AuthSettings {
        key: KeySource::Secret(SECRET.as_bytes().to_vec()),
        issuer: None,
        audience: None,
        enforce_permissions: true,
    })
    .expect("verifier");
    let mut c = claims("alice");
    let leeway = auth::LEEWAY_SECONDS as i64;
    c["exp"] = json!(now() - leeway + 2);
    let token = sign_hs256(SECRET.as_bytes(), &c);
    let first = verifier.verify(&token).expect("inside the leeway");
    let again = verifier.verify(&token).expect("remembered");
    assert_eq!(
        (again.user_id, again.tenant_id, again.expires_at),
        (first.user_id, first.tenant_id, first.expires_at)
    );
    std::thread::sleep(Duration::from_millis(3_100));
    let e = verifier
        .verify(&token)
        .expect_err("past exp and the leeway");
    assert!(e.to_string().ends_with("token expired"), "{e}");
}

fn audience_verifier(audience: Option<&str>) -> Verifier {
    Verifier::new(AuthSettings {
        key: KeySource::PublicKeyPem(fixture("rsa_public.pem")),
        issuer: None,
        audience: audience.map(str::to_owned),
        enforce_permissions: true,
    })
    .expect("verifier")
}

fn with_aud(aud: Option<Value>) -> String {
    let mut c = claims("alice");
    if let Some(a) = aud {
        c["aud"] = a;
    }
    sign(Algorithm::RS256, None, "rsa_private.pem", &c)
}

#[test]
fn audience_checked_when_configured() {
    let verifier = audience_verifier(Some("chat"));
    let caller = verifier
        .verify(&with_aud(Some(json!("chat"))))
        .expect("aud chat");
    assert_eq!(caller.user_id, "alice");
    assert_eq!(caller.tenant_id, "default");
    verifier
        .verify(&with_aud(Some(json!(["other", "chat"]))))
        .expect("aud array containing chat");
    for (aud, what) in [
        (Some(json!("other")), "wrong audience"),
        (
            Some(json!(["other", "more"])),
            "audience array without chat",
        ),
    ] {
        match verifier.verify(&with_aud(aud)) {
            Err(chat_service::error::Error::Unauthenticated(m)) => {
                assert!(m.to_lowercase().contains("aud"), "{what}: {m:?}")
            }
            other => panic!("{what}: expected Unauthenticated, got {other:?}"),
        }
    }

    // Without a configured audience, `aud` is not checked.
    audience_verifier(None)
        .verify(&with_aud(Some(json!("whatever"))))
        .expect("aud not checked when not configured");
}

/// `aud` must contain JWT_AUDIENCE when set (DESIGN §2): a token without `aud` does not.
#[test]
fn token_without_aud_refused_when_audience_configured() {
    match audience_verifier(Some("chat")).verify(&with_aud(None)) {
        Err(chat_service::error::Error::Unauthenticated(m)) => {
            assert!(m.to_lowercase().contains("aud"), "{m:?}")
        }
        other => panic!("no audience: expected Unauthenticated, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_name_the_check_never_the_secret() {
    let server = TestServer::start(Backend::Sqlite).await;
    let secret: &[&[u8]] = &[SECRET.as_bytes()];
    // Missing metadata.
    let res = server
        .raw_groups()
        .await
        .list_groups(proto::ListGroupsRequest::default())
        .await;
    assert_unauth(res, &["missing", "authorization"], secret, "no token");
    // Not a JWT at all.
    unauth(&server, "not-a-jwt", &["malformed"], secret, "garbage").await;
    unauth(
        &server,
        "a.b.c",
        &["malformed"],
        secret,
        "three garbage parts",
    )
    .await;
    // Bad signature: another secret, or a tampered payload.
    unauth(
        &server,
        &sign_hs256(b"another-secret-0123456789", &claims("alice")),
        &["signature"],
        secret,
        "wrong secret",
    )
    .await;
    let good = token("alice");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut c = claims("root");
    c["exp"] = json!(now() + 3600);
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
    unauth(
        &server,
        &parts.join("."),
        &["signature"],
        secret,
        "tampered payload",
    )
    .await;
    // Expired.
    unauth(
        &server,
        &token_with("alice", "default", auth::all_permission_names(), -120),
        &["expired"],
        secret,
        "expired",
    )
    .await;
    // A valid token still works after all that.
    accepted(&server, &good, "good token").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_control_characters_are_refused() {
    let server = TestServer::start(Backend::Sqlite).await;
    let secret: &[&[u8]] = &[SECRET.as_bytes()];
    for (what, c) in [
        ("newline in sub", {
            let mut c = claims("alice");
            c["sub"] = Value::from("a\nb");
            c
        }),
        ("NUL in tenant", {
            let mut c = claims("alice");
            c["tenantId"] = Value::from("t\u{0}1");
            c
        }),
        ("overlong sub", {
            let mut c = claims("alice");
            c["sub"] = Value::from("u".repeat(256));
            c
        }),
    ] {
        unauth(
            &server,
            &sign_hs256(SECRET.as_bytes(), &c),
            &["malformed"],
            secret,
            what,
        )
        .await;
    }
}

/// A claim that is present with the wrong JSON type is refused, naming the claim; it never
/// falls back to the next claim or to tenant `default` (`{"sub":"eve","tenantId":null}` was eve
/// of `default`, a number 7 the tenant "7"). Only an absent claim takes the default.
async fn malformed_claims_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    // Eve of `default` owns a group: none of the malformed tokens below may reach it.
    group(&server, "eve", &[]).await;
    let secret: &[&[u8]] = &[SECRET.as_bytes()];
    let cases: Vec<(&str, Option<&str>, Value)> = vec![
        ("tenantId", None, json!({"k": "default"})),
        ("tenantId", None, json!(["default"])),
        ("tenantId", None, json!(true)),
        ("tenantId", None, Value::Null),
        ("tenantId", None, json!("")),
        ("tenantId", None, json!(7)),
        ("sub", None, json!(7)),
        ("sub", None, Value::Null),
        ("sub", None, json!({"id": "eve"})),
        ("sub", None, json!("")),
        ("id", Some("sub"), json!(42)),
        ("tenant_id", Some("tenantId"), json!(false)),
        ("permissions", None, json!("ViewGroup")),
        ("permissions", None, json!([1, 2])),
    ];
    for (claim, remove, value) in cases {
        let mut c = claims("eve");
        if let Some(r) = remove {
            c.as_object_mut().unwrap().remove(r);
        }
        c[claim] = value.clone();
        let what = format!("{claim} = {value}");
        let res = call(&server, &sign_hs256(SECRET.as_bytes(), &c)).await;
        assert_unauth(res, &[claim], secret, &what);
    }
    // Absent claims still take their documented defaults.
    let mut c = claims("eve");
    c.as_object_mut().unwrap().remove("tenantId");
    let mine = call(&server, &sign_hs256(SECRET.as_bytes(), &c))
        .await
        .expect("no tenant claim: tenant default");
    assert_eq!(mine.channels.len(), 1, "eve of default sees her group");
    server.stop().await;
}

on_every_backend!(malformed_claims_are_refused);
