//! Page tokens (`page_token` of every List RPC): arbitrary text through every decoder, and
//! what the server encodes decoding back to the same key, in its own scope only.
#![no_main]

use chat_service::domain::validate::{
    decode_id_page_token, decode_member_page_token, decode_page_token, decode_sequence_page_token,
    encode_page_token,
};
use chat_service::error::Error;
use libfuzzer_sys::fuzz_target;

/// Scopes as the List RPCs build them (`format!` of validated UUIDs): never a newline.
const SCOPES: [&str; 6] = [
    "groups",
    "messages/0190a8e4-1c2b-7000-8000-000000000001/",
    "messages/0190a8e4-1c2b-7000-8000-000000000001/0190a8e4-1c2b-7000-8000-000000000002",
    "members/0190a8e4-1c2b-7000-8000-000000000001",
    "attachments/0190a8e4-1c2b-7000-8000-000000000001/",
    "downloads/0190a8e4-1c2b-7000-8000-000000000003",
];

/// The input: one byte choosing the scope (low half) and another scope (high half), then the
/// text, used both as a token a client sends and as a key the server encodes.
struct Input<'a> {
    scope: u8,
    other_scope: u8,
    token: &'a str,
    key: &'a str,
    sequence: i64,
    join_time: i64,
}

fn refused<T: std::fmt::Debug>(r: &Result<T, Error>) {
    if let Err(e) = r {
        match e {
            Error::Invalid(v) => assert!(
                v.len() == 1 && v[0].field == "page_token",
                "a bad token must name page_token alone: {v:?}"
            ),
            other => panic!("a bad token must be INVALID_ARGUMENT: {other:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut n = [0u8; 16];
    for (i, b) in rest.iter().enumerate() {
        n[i % 16] ^= b;
    }
    let input = Input {
        scope: choice & 0x0f,
        other_scope: choice >> 4,
        token: &text,
        key: &text,
        sequence: i64::from_le_bytes(n[..8].try_into().unwrap()),
        join_time: i64::from_le_bytes(n[8..].try_into().unwrap()),
    };
    let scope = SCOPES[usize::from(input.scope) % SCOPES.len()];
    let other = SCOPES[usize::from(input.other_scope) % SCOPES.len()];

    // Whatever a client sends: no panic, INVALID_ARGUMENT on page_token when refused, and a
    // decoded key that the server would encode back into a token of the same key.
    let plain = decode_page_token(input.token, scope);
    refused(&plain);
    if let Ok(Some(k)) = &plain {
        let again = encode_page_token(scope, k);
        assert_eq!(decode_page_token(&again, scope).ok(), Some(Some(k.clone())));
    }
    assert_eq!(plain.as_ref().ok() == Some(&None), input.token.is_empty());

    let id = decode_id_page_token(input.token, scope);
    refused(&id);
    if let Ok(Some(k)) = &id {
        assert!(uuid::Uuid::try_parse(k).is_ok(), "id token with key {k:?}");
        assert_eq!(plain.as_ref().ok(), Some(&Some(k.clone())));
    }

    let seq = decode_sequence_page_token(input.token, scope);
    refused(&seq);
    if let Ok(Some(n)) = seq {
        let k = plain.as_ref().ok().cloned().flatten().expect("decoded key");
        assert_eq!(k.parse::<i64>().ok(), Some(n));
    }

    let member = decode_member_page_token(input.token, scope);
    refused(&member);
    if let Ok(Some((t, u))) = &member {
        assert!(!u.is_empty() && u.len() <= 255 && !u.chars().any(char::is_control));
        // Not always the same text (`01/x` and `+1/x` read as `1/x`), but the same key.
        let again = encode_page_token(scope, &format!("{t}/{u}"));
        assert_eq!(
            decode_member_page_token(&again, scope).ok(),
            Some(Some((*t, u.clone())))
        );
    }

    // What the server encodes decodes to the same key in its scope, and nowhere else.
    let token = encode_page_token(scope, input.key);
    assert_eq!(
        decode_page_token(&token, scope).ok(),
        Some(Some(input.key.to_owned()))
    );
    if other != scope {
        let r = decode_page_token(&token, other);
        assert!(r.is_err(), "a token of {scope:?} accepted for {other:?}");
        refused(&r);
    }
    let token = encode_page_token(scope, &input.sequence.to_string());
    assert_eq!(
        decode_sequence_page_token(&token, scope).ok(),
        Some(Some(input.sequence))
    );
    let member_key = format!("{}/{}", input.join_time, input.key);
    let token = encode_page_token(scope, &member_key);
    let user_ok =
        !input.key.is_empty() && input.key.len() <= 255 && !input.key.chars().any(char::is_control);
    match decode_member_page_token(&token, scope) {
        Ok(Some((t, u))) => {
            assert!(user_ok, "member token with user {u:?} accepted");
            assert_eq!((t, u.as_str()), (input.join_time, input.key));
        }
        Ok(None) => unreachable!("a token is never the first page"),
        Err(_) => assert!(!user_ok, "member token of {member_key:?} refused"),
    }
    let id = uuid::Uuid::from_u64_pair(input.sequence as u64, input.join_time as u64);
    let token = encode_page_token(scope, &id.to_string());
    assert_eq!(
        decode_id_page_token(&token, scope).ok(),
        Some(Some(id.to_string()))
    );
});
