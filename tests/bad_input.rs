//! DESIGN §4 "Bad input gets a clear gRPC error and changes nothing", on every backend: each bad
//! call answers the exact code (INVALID_ARGUMENT naming the field in `google.rpc.BadRequest`,
//! NOT_FOUND, OUT_OF_RANGE) and leaves every table's row count as it was. Limits count UTF-8
//! bytes for bodies and Unicode scalar values for names and subjects. Text comes back byte for
//! byte.

mod common;

use std::future::Future;
use std::time::Duration;

use chat_service::cli::ChatClient;
use chat_service::proto;
use common::*;
use prost_types::FieldMask;
use tonic::{Code, Response, Status};

/// Runs `call`, expects `code` (and, for INVALID_ARGUMENT, a violation on one of `fields`), and
/// checks that no table changed.
async fn expect<T: std::fmt::Debug>(
    server: &TestServer,
    what: &str,
    code: Code,
    fields: &[&str],
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Status {
    let before = server.db.counts().await;
    let status = match call.await {
        Ok(r) => panic!("{what}: expected {code:?}, got Ok({:?})", r.into_inner()),
        Err(s) => s,
    };
    check(server, what, code, fields, &status, before).await;
    status
}

async fn check(
    server: &TestServer,
    what: &str,
    code: Code,
    fields: &[&str],
    status: &Status,
    before: Vec<(String, i64)>,
) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    if code == Code::InvalidArgument {
        let v = violations(status);
        assert!(
            fields.iter().any(|f| v.iter().any(|x| x == f)),
            "{what}: violations {v:?} should name one of {fields:?} ({})",
            status.message()
        );
    }
    let after = server.db.counts().await;
    assert_eq!(before, after, "{what}: a refused call changed rows");
}

async fn invalid<T: std::fmt::Debug>(
    server: &TestServer,
    what: &str,
    field: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) {
    expect(server, what, Code::InvalidArgument, &[field], call).await;
}

async fn not_found<T: std::fmt::Debug>(
    server: &TestServer,
    what: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) {
    expect(server, what, Code::NotFound, &[], call).await;
}

fn to_channel(channel: &str, body: &str) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        channel_id: channel.into(),
        body: body.into(),
        ..Default::default()
    }
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

fn random_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A fresh server with a group of alice (OWNER) and bob, and one message of alice in it.
async fn setup(backend: Backend) -> (TestServer, String, proto::Message) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let m = send(&mut alice, &ch, "first").await;
    (server, ch, m)
}

// ---------------------------------------------------------------------------------------------

async fn body_limits(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;

    // 32,768 bytes of two-byte characters plus one byte.
    let over = format!("{}a", "é".repeat(16_384));
    assert_eq!(over.len(), 32_769);
    invalid(
        &server,
        "body of 32,769 bytes",
        "body",
        alice.send_message(to_channel(&ch, &over)),
    )
    .await;
    // 8,193 four-byte emoji: few characters, too many bytes (the limit counts bytes).
    let emoji_over = "😀".repeat(8_193);
    assert_eq!(emoji_over.len(), 32_772);
    invalid(
        &server,
        "body of 8,193 emoji",
        "body",
        alice.send_message(to_channel(&ch, &emoji_over)),
    )
    .await;
    invalid(
        &server,
        "UpdateMessage body of 32,769 bytes",
        "body",
        alice.update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: over.clone(),
            update_mask: mask(&["body"]),
            ..Default::default()
        }),
    )
    .await;

    // Exactly 32,768 bytes of multibyte UTF-8 is fine, and comes back whole.
    for exact in [
        "é".repeat(16_384),
        "😀".repeat(8_192),
        format!("{}{}", "中".repeat(10_922), "ab"),
    ] {
        assert_eq!(exact.len(), 32_768);
        let sent = send(&mut alice, &ch, &exact).await;
        assert_eq!(sent.body.as_bytes(), exact.as_bytes());
        let got = alice
            .get_message(proto::GetMessageRequest {
                message_id: sent.id,
            })
            .await
            .expect("get")
            .into_inner()
            .message
            .expect("message");
        assert_eq!(got.body.as_bytes(), exact.as_bytes());
    }
    server.stop().await;
}

async fn empty_body(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    invalid(
        &server,
        "empty body without attachments",
        "body",
        alice.send_message(to_channel(&ch, "")),
    )
    .await;
    invalid(
        &server,
        "UpdateMessage to an empty body without attachments",
        "body",
        alice.update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: String::new(),
            update_mask: mask(&["body"]),
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn subject_limits(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    for (subject, what) in [
        ("s".repeat(201), "subject of 201 ASCII characters"),
        ("😀".repeat(201), "subject of 201 emoji"),
        ("e\u{301}".repeat(101), "subject of 202 scalar values"),
    ] {
        invalid(
            &server,
            what,
            "subject",
            alice.send_message(proto::SendMessageRequest {
                channel_id: ch.clone(),
                body: "hi".into(),
                subject: subject.clone(),
                ..Default::default()
            }),
        )
        .await;
    }
    invalid(
        &server,
        "UpdateMessage subject of 201 characters",
        "subject",
        alice.update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            subject: "s".repeat(201),
            update_mask: mask(&["subject"]),
            ..Default::default()
        }),
    )
    .await;
    // 200 four-byte emoji (800 bytes) is 200 characters: accepted, and returned whole.
    let subject = "😀".repeat(200);
    let sent = alice
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "hi".into(),
            subject: subject.clone(),
            ..Default::default()
        })
        .await
        .expect("200 emoji subject")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(sent.subject, subject);
    server.stop().await;
}

async fn nul_characters(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    invalid(
        &server,
        "NUL in body",
        "body",
        alice.send_message(to_channel(&ch, "before\0after")),
    )
    .await;
    invalid(
        &server,
        "NUL in subject",
        "subject",
        alice.send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "hi".into(),
            subject: "a\0b".into(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "UpdateMessage NUL in body",
        "body",
        alice.update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: "\0".into(),
            update_mask: mask(&["body"]),
            ..Default::default()
        }),
    )
    .await;
    let mut groups = server.groups(&token("alice")).await;
    invalid(
        &server,
        "NUL in a group name",
        "name",
        groups.create_group(proto::CreateGroupRequest {
            name: "team\0".into(),
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn malformed_ids(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    invalid(
        &server,
        "SendMessage channel_id not-a-uuid",
        "channel_id",
        alice.send_message(to_channel("not-a-uuid", "hi")),
    )
    .await;
    invalid(
        &server,
        "GetMessage message_id empty",
        "message_id",
        alice.get_message(proto::GetMessageRequest {
            message_id: String::new(),
        }),
    )
    .await;
    invalid(
        &server,
        "SendMessage parent_message_id x",
        "parent_message_id",
        alice.send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "reply".into(),
            parent_message_id: "x".into(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "ListMessages channel_id not-a-uuid",
        "channel_id",
        alice.list_messages(proto::ListMessagesRequest {
            channel_id: "not-a-uuid".into(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "ListMessages parent_message_id x",
        "parent_message_id",
        alice.list_messages(proto::ListMessagesRequest {
            channel_id: ch.clone(),
            parent_message_id: "x".into(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "UpdateMessage message_id not-a-uuid",
        "message_id",
        alice.update_message(proto::UpdateMessageRequest {
            message_id: "not-a-uuid".into(),
            body: "x".into(),
            update_mask: mask(&["body"]),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "DeleteMessage message_id not-a-uuid",
        "message_id",
        alice.delete_message(proto::DeleteMessageRequest {
            message_id: "not-a-uuid".into(),
        }),
    )
    .await;
    invalid(
        &server,
        "MarkRead channel_id not-a-uuid",
        "channel_id",
        alice.mark_read(proto::MarkReadRequest {
            channel_id: "not-a-uuid".into(),
            sequence: 1,
        }),
    )
    .await;
    invalid(
        &server,
        "SendMessage attachment_ids[0] not-a-uuid",
        "attachment_ids[0]",
        alice.send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "hi".into(),
            attachment_ids: vec!["not-a-uuid".into()],
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "client_message_id of 101 bytes",
        "client_message_id",
        alice.send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "hi".into(),
            client_message_id: "c".repeat(101),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "ForwardMessage message_id empty",
        "message_id",
        alice.forward_message(proto::ForwardMessageRequest {
            message_id: String::new(),
            channel_id: ch.clone(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "GetGroup channel_id not-a-uuid",
        "channel_id",
        groups.get_group(proto::GetGroupRequest {
            channel_id: "not-a-uuid".into(),
        }),
    )
    .await;
    invalid(
        &server,
        "AddMembers channel_id not-a-uuid",
        "channel_id",
        groups.add_members(proto::AddMembersRequest {
            channel_id: "not-a-uuid".into(),
            user_ids: vec!["carol".into()],
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn target_rules(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    expect(
        &server,
        "SendMessage with both channel_id and recipient_id",
        Code::InvalidArgument,
        &["channel_id", "recipient_id"],
        alice.send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            recipient_id: "bob".into(),
            body: "hi".into(),
            ..Default::default()
        }),
    )
    .await;
    expect(
        &server,
        "SendMessage with neither channel_id nor recipient_id",
        Code::InvalidArgument,
        &["channel_id", "recipient_id"],
        alice.send_message(proto::SendMessageRequest {
            body: "hi".into(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "SendMessage to oneself",
        "recipient_id",
        alice.send_message(proto::SendMessageRequest {
            recipient_id: "alice".into(),
            body: "hi".into(),
            ..Default::default()
        }),
    )
    .await;
    for (recipient, what) in [
        ("r".repeat(256), "recipient_id of 256 bytes"),
        ("bob\n".to_owned(), "recipient_id with a control character"),
    ] {
        invalid(
            &server,
            what,
            "recipient_id",
            alice.send_message(proto::SendMessageRequest {
                recipient_id: recipient,
                body: "hi".into(),
                ..Default::default()
            }),
        )
        .await;
    }
    expect(
        &server,
        "ForwardMessage with both channel_id and recipient_id",
        Code::InvalidArgument,
        &["channel_id", "recipient_id"],
        alice.forward_message(proto::ForwardMessageRequest {
            message_id: m.id.clone(),
            channel_id: ch.clone(),
            recipient_id: "bob".into(),
        }),
    )
    .await;
    invalid(
        &server,
        "ForwardMessage to oneself",
        "recipient_id",
        alice.forward_message(proto::ForwardMessageRequest {
            message_id: m.id.clone(),
            recipient_id: "alice".into(),
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn page_sizes(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    for size in [-1, 201] {
        invalid(
            &server,
            &format!("ListMessages page_size {size}"),
            "page_size",
            alice.list_messages(proto::ListMessagesRequest {
                channel_id: ch.clone(),
                page_size: size,
                ..Default::default()
            }),
        )
        .await;
        invalid(
            &server,
            &format!("ListGroups page_size {size}"),
            "page_size",
            groups.list_groups(proto::ListGroupsRequest {
                page_size: size,
                ..Default::default()
            }),
        )
        .await;
        invalid(
            &server,
            &format!("ListMembers page_size {size}"),
            "page_size",
            groups.list_members(proto::ListMembersRequest {
                channel_id: ch.clone(),
                page_size: size,
                ..Default::default()
            }),
        )
        .await;
    }
    for size in [0, 200] {
        let r = alice
            .list_messages(proto::ListMessagesRequest {
                channel_id: ch.clone(),
                page_size: size,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListMessages page_size {size}: {e:?}"))
            .into_inner();
        assert_eq!(r.messages.len(), 1);
        let r = groups
            .list_groups(proto::ListGroupsRequest {
                page_size: size,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListGroups page_size {size}: {e:?}"))
            .into_inner();
        assert_eq!(r.channels.len(), 1);
        let r = groups
            .list_members(proto::ListMembersRequest {
                channel_id: ch.clone(),
                page_size: size,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListMembers page_size {size}: {e:?}"))
            .into_inner();
        assert_eq!(r.members.len(), 2);
    }
    server.stop().await;
}

async fn page_tokens(backend: Backend) {
    let (server, a, _) = setup(backend).await;
    let b = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    send(&mut alice, &a, "second").await;

    for garbage in ["!!! not a token !!!", "Zm9v", "bWVzc2FnZXMv"] {
        invalid(
            &server,
            &format!("ListMessages page_token {garbage:?}"),
            "page_token",
            alice.list_messages(proto::ListMessagesRequest {
                channel_id: a.clone(),
                page_token: garbage.into(),
                ..Default::default()
            }),
        )
        .await;
        invalid(
            &server,
            &format!("ListGroups page_token {garbage:?}"),
            "page_token",
            groups.list_groups(proto::ListGroupsRequest {
                page_token: garbage.into(),
                ..Default::default()
            }),
        )
        .await;
        invalid(
            &server,
            &format!("ListMembers page_token {garbage:?}"),
            "page_token",
            groups.list_members(proto::ListMembersRequest {
                channel_id: a.clone(),
                page_token: garbage.into(),
                ..Default::default()
            }),
        )
        .await;
    }

    // A real token of channel a, used on channel b (and on a thread of a).
    let messages_token = alice
        .list_messages(proto::ListMessagesRequest {
            channel_id: a.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list a")
        .into_inner()
        .next_page_token;
    assert!(!messages_token.is_empty(), "two messages, page of one");
    invalid(
        &server,
        "ListMessages with a page token of another channel",
        "page_token",
        alice.list_messages(proto::ListMessagesRequest {
            channel_id: b.clone(),
            page_token: messages_token.clone(),
            ..Default::default()
        }),
    )
    .await;
    let members_token = groups
        .list_members(proto::ListMembersRequest {
            channel_id: a.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("members of a")
        .into_inner()
        .next_page_token;
    assert!(!members_token.is_empty(), "two members, page of one");
    invalid(
        &server,
        "ListMembers with a page token of another channel",
        "page_token",
        groups.list_members(proto::ListMembersRequest {
            channel_id: b.clone(),
            page_token: members_token.clone(),
            ..Default::default()
        }),
    )
    .await;
    // Tokens of one RPC are not tokens of another.
    invalid(
        &server,
        "ListGroups with a ListMembers token",
        "page_token",
        groups.list_groups(proto::ListGroupsRequest {
            page_token: members_token.clone(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "ListMessages with a ListMembers token",
        "page_token",
        alice.list_messages(proto::ListMessagesRequest {
            channel_id: a.clone(),
            page_token: members_token,
            ..Default::default()
        }),
    )
    .await;
    // The token still works where it belongs.
    alice
        .list_messages(proto::ListMessagesRequest {
            channel_id: a.clone(),
            page_token: messages_token,
            ..Default::default()
        })
        .await
        .expect("the token on its own channel");
    server.stop().await;
}

async fn parent_in_another_channel(backend: Backend) {
    let (server, a, m) = setup(backend).await;
    let b = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    invalid(
        &server,
        "reply in b to a message of a",
        "parent_message_id",
        alice.send_message(proto::SendMessageRequest {
            channel_id: b.clone(),
            body: "reply".into(),
            parent_message_id: m.id.clone(),
            ..Default::default()
        }),
    )
    .await;
    invalid(
        &server,
        "reply to an unknown message",
        "parent_message_id",
        alice.send_message(proto::SendMessageRequest {
            channel_id: a.clone(),
            body: "reply".into(),
            parent_message_id: random_id(),
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn unknown_channel(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    let unknown = random_id();
    not_found(
        &server,
        "SendMessage to an unknown channel",
        alice.send_message(to_channel(&unknown, "hi")),
    )
    .await;
    not_found(
        &server,
        "ListMessages of an unknown channel",
        alice.list_messages(proto::ListMessagesRequest {
            channel_id: unknown.clone(),
            ..Default::default()
        }),
    )
    .await;
    not_found(
        &server,
        "MarkRead in an unknown channel",
        alice.mark_read(proto::MarkReadRequest {
            channel_id: unknown.clone(),
            sequence: 1,
        }),
    )
    .await;
    not_found(
        &server,
        "CountMessages of an unknown channel",
        alice.count_messages(proto::CountMessagesRequest {
            channel_id: unknown.clone(),
        }),
    )
    .await;
    not_found(
        &server,
        "GetMessage of an unknown message",
        alice.get_message(proto::GetMessageRequest {
            message_id: random_id(),
        }),
    )
    .await;
    not_found(
        &server,
        "GetGroup of an unknown channel",
        groups.get_group(proto::GetGroupRequest {
            channel_id: unknown.clone(),
        }),
    )
    .await;
    not_found(
        &server,
        "ListMembers of an unknown channel",
        groups.list_members(proto::ListMembersRequest {
            channel_id: unknown.clone(),
            ..Default::default()
        }),
    )
    .await;
    not_found(
        &server,
        "AddMembers to an unknown channel",
        groups.add_members(proto::AddMembersRequest {
            channel_id: unknown.clone(),
            user_ids: vec!["carol".into()],
            ..Default::default()
        }),
    )
    .await;
    let before = server.db.counts().await;
    let status = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            channel_ids: vec![unknown.clone()],
            ..Default::default()
        },
    )
    .await;
    check(
        &server,
        "Subscribe to an unknown channel",
        Code::NotFound,
        &[],
        &status,
        before,
    )
    .await;
    // A channel that exists but that the caller is not in looks the same.
    let mut carol = server.chat(&token("carol")).await;
    not_found(
        &server,
        "SendMessage by a non-member",
        carol.send_message(to_channel(&ch, "hi")),
    )
    .await;
    server.stop().await;
}

async fn unknown_attachment(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    for body in ["with text", ""] {
        invalid(
            &server,
            &format!("unknown attachment, body {body:?}"),
            "attachment_ids[0]",
            alice.send_message(proto::SendMessageRequest {
                channel_id: ch.clone(),
                body: body.into(),
                attachment_ids: vec![random_id()],
                ..Default::default()
            }),
        )
        .await;
    }
    server.stop().await;
}

/// SendMessage to a user without a direct channel yet, refused for its parent: the refusal
/// must not leave a new direct channel (or its members, events and audit rows) behind.
async fn direct_send_with_bad_parent_changes_nothing(backend: Backend) {
    let (server, _, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    invalid(
        &server,
        "direct reply to a message of another channel",
        "parent_message_id",
        alice.send_message(proto::SendMessageRequest {
            recipient_id: "dana".into(),
            body: "reply".into(),
            parent_message_id: m.id.clone(),
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

/// SendMessage to a user without a direct channel yet, refused for its attachment: the refusal
/// must not leave a new direct channel behind.
async fn direct_send_with_unknown_attachment_changes_nothing(backend: Backend) {
    let (server, _, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    invalid(
        &server,
        "direct message with an unknown attachment",
        "attachment_ids[0]",
        alice.send_message(proto::SendMessageRequest {
            recipient_id: "erin".into(),
            body: "hi".into(),
            attachment_ids: vec![random_id()],
            ..Default::default()
        }),
    )
    .await;
    server.stop().await;
}

async fn create_group_limits(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut groups = server.groups(&token("alice")).await;
    for (name, what) in [
        (String::new(), "empty name"),
        ("n".repeat(101), "name of 101 ASCII characters"),
        ("é".repeat(101), "name of 101 two-byte characters"),
        ("😀".repeat(101), "name of 101 emoji"),
    ] {
        invalid(
            &server,
            what,
            "name",
            groups.create_group(proto::CreateGroupRequest {
                name,
                ..Default::default()
            }),
        )
        .await;
    }
    invalid(
        &server,
        "1001 member ids",
        "member_ids",
        groups.create_group(proto::CreateGroupRequest {
            name: "big".into(),
            member_ids: (0..1001).map(|i| format!("user-{i}")).collect(),
            ..Default::default()
        }),
    )
    .await;
    // 100 emoji is 100 characters: accepted, returned whole.
    let name = "😀".repeat(100);
    let ch = groups
        .create_group(proto::CreateGroupRequest {
            name: name.clone(),
            ..Default::default()
        })
        .await
        .expect("100 emoji name")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(ch.name, name);
    server.stop().await;
}

async fn update_mask_rules(backend: Backend) {
    let (server, _, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    for (update_mask, what) in [
        (None, "no update_mask"),
        (mask(&[]), "empty update_mask"),
        (mask(&["sender_id"]), "update_mask sender_id"),
        (mask(&["bodyy"]), "update_mask bodyy"),
        (
            mask(&["body", "channel_id"]),
            "update_mask body + channel_id",
        ),
    ] {
        invalid(
            &server,
            what,
            "update_mask",
            alice.update_message(proto::UpdateMessageRequest {
                message_id: m.id.clone(),
                body: "edited".into(),
                update_mask,
                ..Default::default()
            }),
        )
        .await;
    }
    let got = alice
        .get_message(proto::GetMessageRequest {
            message_id: m.id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(got.body, "first", "refused edits changed the body");
    server.stop().await;
}

async fn membership_calls(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    for seq in [0, -5] {
        invalid(
            &server,
            &format!("MarkRead sequence {seq}"),
            "sequence",
            alice.mark_read(proto::MarkReadRequest {
                channel_id: ch.clone(),
                sequence: seq,
            }),
        )
        .await;
    }
    let last = groups
        .get_group(proto::GetGroupRequest {
            channel_id: ch.clone(),
        })
        .await
        .expect("get group")
        .into_inner()
        .channel
        .expect("channel")
        .last_sequence;
    invalid(
        &server,
        "MarkRead beyond the channel's last sequence",
        "sequence",
        alice.mark_read(proto::MarkReadRequest {
            channel_id: ch.clone(),
            sequence: last + 1,
        }),
    )
    .await;
    invalid(
        &server,
        "AddMembers with no users",
        "user_ids",
        groups.add_members(proto::AddMembersRequest {
            channel_id: ch.clone(),
            user_ids: vec![],
            ..Default::default()
        }),
    )
    .await;
    for role in [proto::MemberRole::Unspecified as i32, 99] {
        invalid(
            &server,
            &format!("UpdateMemberRole role {role}"),
            "role",
            groups.update_member_role(proto::UpdateMemberRoleRequest {
                channel_id: ch.clone(),
                user_id: "bob".into(),
                role,
            }),
        )
        .await;
    }
    server.stop().await;
}

/// The status of a Subscribe call that must fail, whether the server refuses the call or ends
/// the stream at once.
async fn subscribe_status(client: &mut ChatClient, req: proto::SubscribeRequest) -> Status {
    match client.subscribe(req).await {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Err(s)) => s,
                other => panic!("expected the stream to fail, got {other:?}"),
            }
        }
    }
}

async fn subscribe_rules(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;

    let before = server.db.counts().await;
    let s = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            channel_ids: vec!["not-a-uuid".into()],
            ..Default::default()
        },
    )
    .await;
    check(
        &server,
        "Subscribe to a malformed channel id",
        Code::InvalidArgument,
        &["channel_ids[0]"],
        &s,
        before,
    )
    .await;

    let before = server.db.counts().await;
    let s = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            channel_ids: vec![ch.clone()],
            cursors: [(ch.clone(), -1)].into_iter().collect(),
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "negative cursor: {s:?}");
    let v = violations(&s);
    assert!(
        v.iter().any(|f| f.starts_with("cursors")),
        "negative cursor: violations {v:?} should name the cursor"
    );
    check(
        &server,
        "Subscribe with a negative cursor",
        Code::InvalidArgument,
        &v.iter().map(String::as_str).collect::<Vec<_>>(),
        &s,
        before,
    )
    .await;

    let before = server.db.counts().await;
    let s = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            cursors: [("not-a-uuid".to_owned(), 0)].into_iter().collect(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "malformed cursor key: {s:?}"
    );
    check(
        &server,
        "Subscribe with a malformed cursor key",
        Code::InvalidArgument,
        &violations(&s)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &s,
        before,
    )
    .await;

    // The last sequence of the channel is the message's (two MemberAdded events, then it).
    for req in [
        proto::SubscribeRequest {
            channel_ids: vec![ch.clone()],
            cursors: [(ch.clone(), m.sequence + 1)].into_iter().collect(),
        },
        proto::SubscribeRequest {
            channel_ids: vec![],
            cursors: [(ch.clone(), m.sequence + 100)].into_iter().collect(),
        },
    ] {
        let before = server.db.counts().await;
        let s = subscribe_status(&mut alice, req).await;
        check(
            &server,
            "Subscribe with a cursor beyond the last sequence",
            Code::OutOfRange,
            &[],
            &s,
            before,
        )
        .await;
    }
    // A cursor at the last sequence is fine.
    let resp = alice
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![ch.clone()],
            cursors: [(ch.clone(), m.sequence)].into_iter().collect(),
        })
        .await
        .expect("cursor at the last sequence");
    drop(resp);
    server.stop().await;
}

/// Size of what a status carries in metadata: its message and its encoded details.
fn status_metadata_bytes(s: &Status) -> usize {
    s.message().len() + s.details().len()
}

/// Error messages are bounded (common clients refuse status metadata over 16 KiB and report
/// RESOURCE_EXHAUSTED instead): 1,000 bad member ids once gave a 33 KB error, a 1 MiB cursor key
/// a 917 KB one. At most 20 violations are listed, then "and N more"; echoed input is clipped.
async fn errors_are_bounded(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut groups = server.groups(&token("alice")).await;
    let bad: Vec<String> = (0..1000).map(|i| format!("bad\u{1}user {i}")).collect();
    let s = expect(
        &server,
        "CreateGroup with 1,000 bad member ids",
        Code::InvalidArgument,
        &["member_ids[0]"],
        groups.create_group(proto::CreateGroupRequest {
            name: "bounded".into(),
            member_ids: bad,
            ..Default::default()
        }),
    )
    .await;
    let v = violations(&s);
    assert_eq!(v.len(), 11, "10 violations and one 'and N more': {v:?}");
    assert!(s.message().contains("and 997 more"), "{}", s.message());
    assert!(
        status_metadata_bytes(&s) < 8 * 1024,
        "{} bytes",
        status_metadata_bytes(&s)
    );

    let mut alice = server.chat(&token("alice")).await;
    let before = server.db.counts().await;
    let huge = "k".repeat(1 << 20);
    let s = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            cursors: [(huge, 0)].into_iter().collect(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        s.code(),
        Code::InvalidArgument,
        "1 MiB cursor key: {}",
        s.code()
    );
    let v = violations(&s);
    assert!(
        v.len() == 1 && v[0].starts_with("cursors[kkk") && v[0].len() <= 100,
        "the field path is clipped: {:?}",
        v.iter().map(|f| f.len()).collect::<Vec<_>>()
    );
    assert!(
        status_metadata_bytes(&s) < 2 * 1024,
        "{} bytes",
        status_metadata_bytes(&s)
    );
    check(
        &server,
        "1 MiB cursor key",
        Code::InvalidArgument,
        &[v[0].as_str()],
        &s,
        before,
    )
    .await;

    // A long id in a NOT_FOUND message is clipped too.
    let s = alice
        .count_messages(proto::CountMessagesRequest {
            channel_id: format!("{ch}{}", "0".repeat(1 << 20)),
        })
        .await
        .expect_err("a 1 MiB channel id");
    assert!(s.message().len() <= 512, "{}", s.message().len());
    server.stop().await;
}

/// Subscribe is bounded: at most 1,000 `channel_ids` and 1,000 `cursors` (INVALID_ARGUMENT
/// past that, at once: 100,000 entries once took 20 s to set up); repeated ids count once, so
/// a message arrives once; memory stays bounded when a client sends 100,000 entries.
async fn subscribe_is_bounded(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let ids = |n: usize| -> Vec<String> { (0..n).map(|_| random_id()).collect() };
    let rss_before = rss_kib();
    for (what, field, req) in [
        (
            "1,001 channel ids",
            "channel_ids",
            proto::SubscribeRequest {
                channel_ids: ids(1001),
                ..Default::default()
            },
        ),
        (
            "1,001 cursors",
            "cursors",
            proto::SubscribeRequest {
                cursors: ids(1001).into_iter().map(|i| (i, 0)).collect(),
                ..Default::default()
            },
        ),
        (
            "100,000 channel ids",
            "channel_ids",
            proto::SubscribeRequest {
                channel_ids: ids(100_000),
                ..Default::default()
            },
        ),
        (
            "100,000 cursors",
            "cursors",
            proto::SubscribeRequest {
                cursors: (0..100_000).map(|i| (format!("c{i}"), i)).collect(),
                ..Default::default()
            },
        ),
    ] {
        let before = server.db.counts().await;
        let s = subscribe_status(&mut alice, req).await;
        check(&server, what, Code::InvalidArgument, &[field], &s, before).await;
        assert_eq!(
            violations(&s).len(),
            1,
            "{what}: one violation, not one per entry"
        );
    }
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 200 * 1024, "RSS grew {grown} KiB");

    // The same channel 1,000 times: followed once, the message arrives once.
    let mut feed = alice
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![ch.clone(); 1000],
            cursors: [(ch.clone(), m.sequence)].into_iter().collect(),
        })
        .await
        .expect("repeated ids")
        .into_inner();
    let mut bob = server.chat(&token("bob")).await;
    let m2 = send(&mut bob, &ch, "once").await;
    let m3 = send(&mut bob, &ch, "twice?").await;
    for want in [m2.sequence, m3.sequence] {
        let ev = tokio::time::timeout(Duration::from_secs(20), feed.message())
            .await
            .expect("event")
            .expect("ok")
            .expect("open");
        assert_eq!(ev.sequence, want, "each event once, in order");
    }
    server.stop().await;
}

/// Storage that refuses writes is UNAVAILABLE (retryable), never INTERNAL: the database opened
/// read-only (SQLite `mode=ro`, SQLITE_READONLY; PostgreSQL `default_transaction_read_only`,
/// SQLSTATE 25006, as on a standby; MariaDB with `read_only` on, as a replica or a demoted
/// primary, error 1290 for a user without the privilege to write anyway). Reads still answer;
/// nothing changes. (Full disks, I/O errors and lost connections are classified by the same
/// rules: see tests/store.rs.)
async fn storage_failures_are_unavailable(backend: Backend) {
    let (server, ch, m) = setup(backend).await;
    let mut server = server;
    // MariaDB's `read_only` is server-wide: it holds back only users without the READ ONLY
    // ADMIN privilege, so other tests (as root) go on; it is switched off again on drop.
    let mut read_only = None;
    match backend {
        Backend::Sqlite => server.opts.url_params = Some("?mode=ro".into()),
        Backend::Postgres => {
            server.opts.url_params = Some("?options=-c%20default_transaction_read_only%3Don".into())
        }
        Backend::Mysql => {
            let guard = MysqlReadOnly::new(&server.db).await;
            server.opts.url = Some(guard.url.clone());
            read_only = Some(guard);
        }
    }
    let server = server.restart().await;
    let mut alice = server.chat(&token("alice")).await;
    let mut groups = server.groups(&token("alice")).await;
    expect(
        &server,
        "SendMessage on read-only storage",
        Code::Unavailable,
        &[],
        alice.send_message(to_channel(&ch, "lost?")),
    )
    .await;
    expect(
        &server,
        "CreateGroup on read-only storage",
        Code::Unavailable,
        &[],
        groups.create_group(proto::CreateGroupRequest {
            name: "ro".into(),
            ..Default::default()
        }),
    )
    .await;
    let got = alice
        .get_message(proto::GetMessageRequest {
            message_id: m.id.clone(),
        })
        .await
        .expect("reads still work")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(got.body, "first");
    server.stop().await;
    drop(read_only);
}

/// A request message over the limit is RESOURCE_EXHAUSTED, as the README promises (tonic
/// answers OUT_OF_RANGE, which on Subscribe means "cursor beyond the end"): a 5 MiB
/// SendMessage and Subscribe (limit 4 MiB), a 1.2 MiB UploadChunk and upload frame (limit
/// 1 MiB + 64 KiB). Nothing is stored.
async fn oversize_messages_are_resource_exhausted(backend: Backend) {
    use chat_service::proto::attachment_service_client::AttachmentServiceClient;
    use chat_service::proto::upload_attachment_request::Data;
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    expect(
        &server,
        "5 MiB SendMessage",
        Code::ResourceExhausted,
        &[],
        alice.send_message(to_channel(&ch, &"x".repeat(5 << 20))),
    )
    .await;
    let before = server.db.counts().await;
    let s = subscribe_status(
        &mut alice,
        proto::SubscribeRequest {
            channel_ids: vec!["y".repeat(5 << 20)],
            ..Default::default()
        },
    )
    .await;
    check(
        &server,
        "5 MiB Subscribe",
        Code::ResourceExhausted,
        &[],
        &s,
        before,
    )
    .await;

    let bearer = chat_service::cli::Bearer::new(&token("alice")).expect("bearer");
    let mut files = AttachmentServiceClient::with_interceptor(server.channel().await, bearer);
    let meta = proto::AttachmentMetadata {
        channel_id: ch.clone(),
        file_name: "big.bin".into(),
        content_type: "application/octet-stream".into(),
        size_bytes: 2 << 20,
        sha256: String::new(),
    };
    let upload_id = files
        .create_upload(proto::CreateUploadRequest {
            metadata: Some(meta.clone()),
        })
        .await
        .expect("create upload")
        .into_inner()
        .upload_id;
    let chunk = vec![1u8; 1200 * 1024];
    expect(
        &server,
        "1.2 MiB UploadChunk",
        Code::ResourceExhausted,
        &[],
        files.upload_chunk(proto::UploadChunkRequest {
            upload_id,
            offset: 0,
            chunk: chunk.clone().into(),
        }),
    )
    .await;
    let frames = vec![
        proto::UploadAttachmentRequest {
            data: Some(Data::Metadata(meta)),
        },
        proto::UploadAttachmentRequest {
            data: Some(Data::Chunk(chunk.into())),
        },
    ];
    let before = server.db.count("attachments").await;
    let s = files
        .upload_attachment(futures::stream::iter(frames))
        .await
        .expect_err("a 1.2 MiB upload frame");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        server.db.count("attachments").await,
        before,
        "nothing stored"
    );
    server.stop().await;
}

/// Right-to-left Hebrew and Arabic, combining marks (decomposed, so nothing may normalise
/// them), CJK, 4-byte emoji with ZWJ, skin tones, flags and variation selectors, bidi controls,
/// line breaks and surrounding spaces.
const MIXED: &str = "  שָׁלוֹם עולם — مَرْحَبًا بالعالم، e\u{301}te\u{301} Å\u{30a} n\u{303} \
                     你好，世界 こんにちは 안녕하세요 𠜎𠜱 😀👩\u{200d}👩\u{200d}👧\u{200d}👦 👍🏽 🇮🇱🇯🇵 ❤\u{fe0f} \
                     \u{202b}RTL\u{202c} \u{200f}x\u{200e} zero\u{200b}width\r\n\ttabbed  ";

async fn text_round_trips(backend: Backend) {
    let (server, ch, _) = setup(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let subject = "נושא موضوع 主题 😀 e\u{301}";
    let sent = alice
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: MIXED.into(),
            subject: subject.into(),
            ..Default::default()
        })
        .await
        .expect("send mixed text")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(sent.body.as_bytes(), MIXED.as_bytes(), "SendMessage echo");
    assert_eq!(sent.subject.as_bytes(), subject.as_bytes());

    let got = alice
        .get_message(proto::GetMessageRequest {
            message_id: sent.id.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(got.body.as_bytes(), MIXED.as_bytes(), "GetMessage body");
    assert_eq!(
        got.subject.as_bytes(),
        subject.as_bytes(),
        "GetMessage subject"
    );

    let listed = alice
        .list_messages(proto::ListMessagesRequest {
            channel_id: ch.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .messages;
    let found = listed
        .iter()
        .find(|x| x.id == sent.id)
        .expect("listed message");
    assert_eq!(found.body.as_bytes(), MIXED.as_bytes(), "ListMessages body");
    assert_eq!(found.subject.as_bytes(), subject.as_bytes());

    // Another reader, and an edit, see the same bytes.
    let mut bob = server.chat(&token("bob")).await;
    let seen = bob
        .get_message(proto::GetMessageRequest {
            message_id: sent.id.clone(),
        })
        .await
        .expect("bob get")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(seen.body.as_bytes(), MIXED.as_bytes(), "another reader");
    let edited = format!("{MIXED}✏️");
    alice
        .update_message(proto::UpdateMessageRequest {
            message_id: sent.id.clone(),
            body: edited.clone(),
            update_mask: mask(&["body"]),
            ..Default::default()
        })
        .await
        .expect("edit");
    let got = alice
        .get_message(proto::GetMessageRequest {
            message_id: sent.id.clone(),
        })
        .await
        .expect("get edited")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(got.body.as_bytes(), edited.as_bytes(), "edited body");

    // Group names and descriptions too.
    let mut groups = server.groups(&token("alice")).await;
    let name = "צוות فريق 团队 👩\u{200d}💻 e\u{301}";
    let description = &MIXED[2..];
    let g = groups
        .create_group(proto::CreateGroupRequest {
            name: name.into(),
            description: description.into(),
            ..Default::default()
        })
        .await
        .expect("create group")
        .into_inner()
        .channel
        .expect("channel");
    let g = groups
        .get_group(proto::GetGroupRequest { channel_id: g.id })
        .await
        .expect("get group")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(g.name.as_bytes(), name.as_bytes(), "group name");
    assert_eq!(
        g.description.as_bytes(),
        description.as_bytes(),
        "description"
    );
    server.stop().await;
}

on_every_backend!(
    body_limits,
    empty_body,
    subject_limits,
    nul_characters,
    malformed_ids,
    target_rules,
    page_sizes,
    page_tokens,
    parent_in_another_channel,
    unknown_channel,
    unknown_attachment,
    direct_send_with_bad_parent_changes_nothing,
    direct_send_with_unknown_attachment_changes_nothing,
    create_group_limits,
    update_mask_rules,
    membership_calls,
    subscribe_rules,
    errors_are_bounded,
    subscribe_is_bounded,
    storage_failures_are_unavailable,
    oversize_messages_are_resource_exhausted,
    text_round_trips,
);

/// A MariaDB user with every privilege on one test database but none to write when the
/// server is read-only, and the server's `read_only` switched on while this lives.
struct MysqlReadOnly {
    user: String,
    /// The test database's URL as that user.
    url: String,
    admin: String,
}

impl MysqlReadOnly {
    async fn new(db: &TestDb) -> MysqlReadOnly {
        let user = format!("ro_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (scheme_and_user, rest) = db.url.split_once('@').expect("user@host in the URL");
        // The server's admin URL: the test database is gone by the time this is dropped.
        let admin = mysql_url();
        let database = db.url.rsplit('/').next().expect("database");
        let scheme = scheme_and_user.split("//").next().expect("scheme");
        let url = format!("{scheme}//{user}:pw@{rest}");
        let pool = sqlx::MySqlPool::connect(&admin).await.expect("mysql");
        for sql in [
            format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"),
            format!("GRANT ALL ON `{database}`.* TO '{user}'@'%'"),
            "SET GLOBAL read_only = 1".to_owned(),
        ] {
            sqlx::raw_sql(&sql).execute(&pool).await.expect(&sql);
        }
        pool.close().await;
        MysqlReadOnly { user, url, admin }
    }
}

impl Drop for MysqlReadOnly {
    fn drop(&mut self) {
        let (admin, user) = (self.admin.clone(), self.user.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let pool = sqlx::MySqlPool::connect(&admin).await.expect("mysql");
                for sql in [
                    "SET GLOBAL read_only = 0".to_owned(),
                    format!("DROP USER IF EXISTS '{user}'@'%'"),
                ] {
                    sqlx::raw_sql(&sql).execute(&pool).await.expect(&sql);
                }
                pool.close().await;
            });
        })
        .join()
        .expect("read_only off");
    }
}
