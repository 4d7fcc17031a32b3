//! Black-box API suite: the happy path of every ChatService and GroupService RPC (Subscribe and
//! AttachmentService have files of their own), the wrong-caller matrix of every RPC (token
//! checks, permission keys, membership, tenancy), AUTH_ENFORCE_PERMISSIONS=false, and audit rows.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use chat_service::auth::{self, TokenSpec};
use chat_service::cli::{ChatClient, GroupClient};
use chat_service::proto::chat_service_client::ChatServiceClient;
use chat_service::proto::group_service_client::GroupServiceClient;
use chat_service::proto::{self, ChannelKind, MemberRole};
use common::*;
use prost_types::FieldMask;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// The gRPC code of a call's result (`Code::Ok` on success).
fn code<T>(r: Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn ids(messages: &[proto::Message]) -> Vec<String> {
    messages.iter().map(|m| m.id.clone()).collect()
}

async fn send_to(client: &mut ChatClient, recipient: &str, body: &str) -> proto::Message {
    client
        .send_message(proto::SendMessageRequest {
            recipient_id: recipient.into(),
            body: body.into(),
            ..Default::default()
        })
        .await
        .expect("send to recipient")
        .into_inner()
        .message
        .expect("message")
}

async fn get_msg(client: &mut ChatClient, id: &str) -> proto::Message {
    client
        .get_message(proto::GetMessageRequest {
            message_id: id.into(),
        })
        .await
        .expect("get message")
        .into_inner()
        .message
        .expect("message")
}

async fn list_page(
    client: &mut ChatClient,
    channel: &str,
    parent: &str,
    page_size: i32,
    page_token: &str,
) -> proto::ListMessagesResponse {
    client
        .list_messages(proto::ListMessagesRequest {
            channel_id: channel.into(),
            parent_message_id: parent.into(),
            page_size,
            page_token: page_token.into(),
        })
        .await
        .expect("list messages")
        .into_inner()
}

async fn list_all(client: &mut ChatClient, channel: &str) -> Vec<proto::Message> {
    list_page(client, channel, "", 200, "").await.messages
}

async fn count_msgs(client: &mut ChatClient, channel: &str) -> i64 {
    client
        .count_messages(proto::CountMessagesRequest {
            channel_id: channel.into(),
        })
        .await
        .expect("count messages")
        .into_inner()
        .count
}

async fn delete_msg(client: &mut ChatClient, id: &str) -> Result<(), Status> {
    client
        .delete_message(proto::DeleteMessageRequest {
            message_id: id.into(),
        })
        .await
        .map(drop)
}

async fn mark_read(client: &mut ChatClient, channel: &str, seq: i64) -> Result<i64, Status> {
    client
        .mark_read(proto::MarkReadRequest {
            channel_id: channel.into(),
            sequence: seq,
        })
        .await
        .map(|r| r.into_inner().read_sequence)
}

async fn recipients(client: &mut ChatClient, id: &str) -> Vec<proto::MessageRecipient> {
    client
        .list_message_recipients(proto::ListMessageRecipientsRequest {
            message_id: id.into(),
        })
        .await
        .expect("list recipients")
        .into_inner()
        .recipients
}

async fn unread(client: &mut ChatClient) -> Vec<(String, i64)> {
    client
        .get_unread_counts(proto::GetUnreadCountsRequest {})
        .await
        .expect("unread counts")
        .into_inner()
        .unread_counts
        .into_iter()
        .map(|u| (u.channel_id, u.count))
        .collect()
}

fn unread_of(counts: &[(String, i64)], channel: &str) -> Option<i64> {
    counts.iter().find(|(c, _)| c == channel).map(|(_, n)| *n)
}

async fn get_group(g: &mut GroupClient, channel: &str) -> Result<proto::Channel, Status> {
    g.get_group(proto::GetGroupRequest {
        channel_id: channel.into(),
    })
    .await
    .map(|r| r.into_inner().channel.expect("channel"))
}

async fn all_groups(g: &mut GroupClient) -> Vec<proto::Channel> {
    g.list_groups(proto::ListGroupsRequest {
        page_size: 200,
        page_token: String::new(),
    })
    .await
    .expect("list groups")
    .into_inner()
    .channels
}

async fn members(g: &mut GroupClient, channel: &str) -> Vec<(String, i32)> {
    g.list_members(proto::ListMembersRequest {
        channel_id: channel.into(),
        page_size: 200,
        page_token: String::new(),
    })
    .await
    .expect("list members")
    .into_inner()
    .members
    .into_iter()
    .map(|m| (m.user_id, m.role))
    .collect()
}

async fn add_members(
    g: &mut GroupClient,
    channel: &str,
    users: &[&str],
    role: MemberRole,
) -> Result<Vec<(String, i32)>, Status> {
    g.add_members(proto::AddMembersRequest {
        channel_id: channel.into(),
        user_ids: users.iter().map(|u| u.to_string()).collect(),
        role: role as i32,
    })
    .await
    .map(|r| {
        r.into_inner()
            .members
            .into_iter()
            .map(|m| (m.user_id, m.role))
            .collect()
    })
}

async fn set_role(
    g: &mut GroupClient,
    channel: &str,
    user: &str,
    role: MemberRole,
) -> Result<proto::Member, Status> {
    g.update_member_role(proto::UpdateMemberRoleRequest {
        channel_id: channel.into(),
        user_id: user.into(),
        role: role as i32,
    })
    .await
    .map(|r| r.into_inner().member.expect("member"))
}

async fn remove_member(g: &mut GroupClient, channel: &str, user: &str) -> Result<(), Status> {
    g.remove_member(proto::RemoveMemberRequest {
        channel_id: channel.into(),
        user_id: user.into(),
    })
    .await
    .map(drop)
}

const OWNER: i32 = MemberRole::Owner as i32;
const ADMIN: i32 = MemberRole::Admin as i32;
const MEMBER: i32 = MemberRole::Member as i32;

fn pair(user: &str, role: i32) -> (String, i32) {
    (user.to_owned(), role)
}

// ---------------------------------------------------------------------------------------------
// ChatService happy paths
// ---------------------------------------------------------------------------------------------

async fn send_and_get_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    assert_eq!(count_msgs(&mut alice, &ch).await, 0);

    let m = alice
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "hello 👋 שלום".into(),
            subject: "greeting".into(),
            ..Default::default()
        })
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message");
    assert!(
        uuid::Uuid::try_parse(&m.id).is_ok(),
        "id is a UUID: {}",
        m.id
    );
    assert_eq!(m.channel_id, ch);
    assert_eq!(m.sender_id, "alice");
    assert_eq!(m.body, "hello 👋 שלום");
    assert_eq!(m.subject, "greeting");
    assert!(m.sequence > 0);
    assert!(!m.etag.is_empty(), "a message carries an etag");
    assert!(m.create_time.is_some());
    assert!(m.update_time.is_none(), "never edited");
    assert!(m.delete_time.is_none());
    assert!(m.deleted_by.is_empty());

    // Another member reads the same message back.
    let got = get_msg(&mut bob, &m.id).await;
    assert_eq!(got, m);
    assert_eq!(count_msgs(&mut bob, &ch).await, 1);

    // A second message takes a higher sequence.
    let m2 = send(&mut bob, &ch, "hi alice").await;
    assert!(m2.sequence > m.sequence);
    assert_eq!(count_msgs(&mut alice, &ch).await, 2);

    // An unknown message id → NOT_FOUND; a malformed one → INVALID_ARGUMENT.
    let st = alice
        .get_message(proto::GetMessageRequest {
            message_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = alice
        .get_message(proto::GetMessageRequest {
            message_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["message_id".to_owned()]);
    server.stop().await;
}

async fn direct_channel_once_per_pair(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let channels0 = server.db.count("channels").await;

    let m1 = send_to(&mut alice, "bob", "hi bob").await;
    assert!(!m1.channel_id.is_empty());
    assert_eq!(server.db.count("channels").await, channels0 + 1);
    let m2 = send_to(&mut alice, "bob", "again").await;
    assert_eq!(
        m2.channel_id, m1.channel_id,
        "a second send reuses the direct channel"
    );
    let m3 = send_to(&mut bob, "alice", "hi alice").await;
    assert_eq!(
        m3.channel_id, m1.channel_id,
        "the other user lands in the same channel"
    );
    assert_eq!(
        server.db.count("channels").await,
        channels0 + 1,
        "one direct channel per pair"
    );
    let direct = m1.channel_id.clone();

    // Either user may also send to it by channel id.
    send(&mut bob, &direct, "by channel id").await;
    assert_eq!(count_msgs(&mut alice, &direct).await, 4);

    // ListGroups shows it as DIRECT with both users, for both users.
    for user in ["alice", "bob"] {
        let mut g = server.groups(&token(user)).await;
        let chans = all_groups(&mut g).await;
        let c = chans
            .iter()
            .find(|c| c.id == direct)
            .unwrap_or_else(|| panic!("{user} lists the direct channel"));
        assert_eq!(c.kind, ChannelKind::Direct as i32);
        let mut users = c.direct_user_ids.clone();
        users.sort();
        assert_eq!(users, vec!["alice".to_owned(), "bob".to_owned()]);
        let got = get_group(&mut g, &direct).await.expect("get direct");
        assert_eq!(got.kind, ChannelKind::Direct as i32);
    }

    // Another pair gets another channel.
    let m4 = send_to(&mut alice, "carol", "hi carol").await;
    assert_ne!(m4.channel_id, direct);

    // Sending to oneself is refused.
    let st = alice
        .send_message(proto::SendMessageRequest {
            recipient_id: "alice".into(),
            body: "me".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    server.stop().await;
}

async fn threads(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let other = group(&server, "alice", &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;

    let root = send(&mut alice, &ch, "root").await;
    let reply = |parent: &str, body: &str| proto::SendMessageRequest {
        channel_id: ch.clone(),
        body: body.into(),
        parent_message_id: parent.into(),
        ..Default::default()
    };
    let r1 = bob
        .send_message(reply(&root.id, "reply 1"))
        .await
        .expect("reply 1")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(r1.parent_message_id, root.id);
    send(&mut alice, &ch, "top level").await;
    let r2 = alice
        .send_message(reply(&root.id, "reply 2"))
        .await
        .expect("reply 2")
        .into_inner()
        .message
        .expect("message");

    let thread = list_page(&mut bob, &ch, &root.id, 0, "").await;
    assert_eq!(ids(&thread.messages), vec![r2.id.clone(), r1.id.clone()]);
    assert!(thread.next_page_token.is_empty());
    assert_eq!(
        list_all(&mut bob, &ch).await.len(),
        4,
        "the channel lists all"
    );

    // A parent in another channel is refused.
    let elsewhere = send(&mut alice, &other, "elsewhere").await;
    let st = alice
        .send_message(reply(&elsewhere.id, "cross"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["parent_message_id".to_owned()]);
    server.stop().await;
}

async fn idempotent_client_message_id(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let ch2 = group(&server, "alice", &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let req = |channel: &str, body: &str| proto::SendMessageRequest {
        channel_id: channel.into(),
        body: body.into(),
        client_message_id: "client-key-1".into(),
        ..Default::default()
    };

    let first = alice
        .send_message(req(&ch, "once"))
        .await
        .expect("first")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(first.client_message_id, "client-key-1");
    let rows = server.db.count("messages").await;
    let again = alice
        .send_message(req(&ch, "once"))
        .await
        .expect("repeat")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(again.id, first.id, "the same message comes back");
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(count_msgs(&mut alice, &ch).await, 1);
    assert_eq!(server.db.count("messages").await, rows, "no duplicate row");

    // Another sender, or another channel, with the same key is a new message.
    let bobs = bob
        .send_message(req(&ch, "bob's"))
        .await
        .expect("bob")
        .into_inner()
        .message
        .expect("message");
    assert_ne!(bobs.id, first.id);
    let other = alice
        .send_message(req(&ch2, "other channel"))
        .await
        .expect("other channel")
        .into_inner()
        .message
        .expect("message");
    assert_ne!(other.id, first.id);
    assert_eq!(count_msgs(&mut alice, &ch).await, 2);
    server.stop().await;
}

async fn list_messages_paging(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(send(&mut alice, &ch, &format!("m{i}")).await);
    }
    let newest_first: Vec<String> = sent.iter().rev().map(|m| m.id.clone()).collect();

    let all = list_page(&mut bob, &ch, "", 0, "").await;
    assert_eq!(ids(&all.messages), newest_first);
    assert!(all.next_page_token.is_empty());

    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut tok = String::new();
    loop {
        let page = list_page(&mut bob, &ch, "", 2, &tok).await;
        pages.push(ids(&page.messages));
        if page.next_page_token.is_empty() {
            break;
        }
        tok = page.next_page_token;
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    let flat: Vec<String> = pages.concat();
    assert_eq!(flat, newest_first, "all five, newest first, no duplicate");
    assert_eq!(flat.iter().collect::<HashSet<_>>().len(), 5);

    // A page token stays valid while new messages arrive.
    let p1 = list_page(&mut bob, &ch, "", 2, "").await;
    send(&mut alice, &ch, "new 1").await;
    send(&mut bob, &ch, "new 2").await;
    let p2 = list_page(&mut bob, &ch, "", 2, &p1.next_page_token).await;
    assert_eq!(
        ids(&p2.messages),
        vec![sent[2].id.clone(), sent[1].id.clone()]
    );
    let p3 = list_page(&mut bob, &ch, "", 2, &p2.next_page_token).await;
    assert_eq!(ids(&p3.messages), vec![sent[0].id.clone()]);
    assert!(p3.next_page_token.is_empty());

    // page_size beyond 200 is bad input.
    let st = bob
        .list_messages(proto::ListMessagesRequest {
            channel_id: ch.clone(),
            page_size: 201,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    server.stop().await;
}

/// A page of history is one query that checks membership in the same statement: whoever is not
/// (or no longer) a member of the live channel gets NOT_FOUND, not an empty page, while a
/// member of a channel without messages gets an empty page.
async fn list_messages_only_for_members(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let mut dave = server.chat(&token("dave")).await;
    let list = |ch: &str| proto::ListMessagesRequest {
        channel_id: ch.to_owned(),
        ..Default::default()
    };
    // A member, no messages yet: an empty page.
    let empty = bob.list_messages(list(&ch)).await.expect("empty page");
    assert!(empty.into_inner().messages.is_empty());
    for i in 0..3 {
        send(&mut alice, &ch, &format!("m{i}")).await;
    }
    assert_eq!(list_all(&mut bob, &ch).await.len(), 3);
    // Never a member; a member of another tenant's channel of the same id.
    assert_eq!(code(dave.list_messages(list(&ch)).await), Code::NotFound);
    let mut other_tenant = server
        .chat(&token_with(
            "bob",
            "other",
            auth::all_permission_names(),
            3600,
        ))
        .await;
    assert_eq!(
        code(other_tenant.list_messages(list(&ch)).await),
        Code::NotFound
    );
    // Removed: the messages are still there for the others.
    let mut ga = server.groups(&token("alice")).await;
    remove_member(&mut ga, &ch, "bob")
        .await
        .expect("remove bob");
    assert_eq!(code(bob.list_messages(list(&ch)).await), Code::NotFound);
    assert_eq!(list_all(&mut alice, &ch).await.len(), 3);
    // Deleted channel: nobody.
    ga.delete_group(proto::DeleteGroupRequest {
        channel_id: ch.clone(),
    })
    .await
    .expect("delete group");
    assert_eq!(code(alice.list_messages(list(&ch)).await), Code::NotFound);
    server.stop().await;
}

async fn update_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let m = alice
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "v1".into(),
            subject: "s1".into(),
            ..Default::default()
        })
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message");

    let edit =
        |body: &str, subject: &str, paths: &[&str], etag: &str| proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: body.into(),
            subject: subject.into(),
            update_mask: mask(paths),
            etag: etag.into(),
        };

    // Body only, with the current etag.
    let e1 = alice
        .update_message(edit("v2", "ignored", &["body"], &m.etag))
        .await
        .expect("edit body")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(e1.id, m.id);
    assert_eq!(e1.body, "v2");
    assert_eq!(e1.subject, "s1", "subject not in the mask stays");
    assert_ne!(e1.etag, m.etag, "the etag changes on an edit");
    assert!(e1.update_time.is_some());
    assert_eq!(
        e1.sequence, m.sequence,
        "sequence of the creation event stays"
    );
    assert_eq!(get_msg(&mut bob, &m.id).await.body, "v2");

    // A stale etag → ABORTED, nothing changes.
    let st = alice
        .update_message(edit("v3", "", &["body"], &m.etag))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Aborted);
    assert_eq!(get_msg(&mut alice, &m.id).await.body, "v2");

    // Subject only, no etag.
    let e2 = alice
        .update_message(edit("ignored", "s2", &["subject"], ""))
        .await
        .expect("edit subject")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(e2.body, "v2");
    assert_eq!(e2.subject, "s2");
    assert_ne!(e2.etag, e1.etag);

    // Not the sender → PERMISSION_DENIED.
    let st = bob
        .update_message(edit("hijack", "", &["body"], ""))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // An empty mask → INVALID_ARGUMENT.
    let st = alice
        .update_message(edit("v9", "", &[], ""))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["update_mask".to_owned()]);
    let now = get_msg(&mut alice, &m.id).await;
    assert_eq!((now.body.as_str(), now.subject.as_str()), ("v2", "s2"));
    server.stop().await;
}

async fn delete_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut ga = server.groups(&token("alice")).await;
    add_members(&mut ga, &ch, &["carol"], MemberRole::Admin)
        .await
        .expect("add admin");
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let mut carol = server.chat(&token("carol")).await;

    let a1 = send(&mut alice, &ch, "alice's").await;
    let b1 = send(&mut bob, &ch, "bob 1").await;
    let b2 = send(&mut bob, &ch, "bob 2").await;
    let b3 = send(&mut bob, &ch, "bob 3").await;
    assert_eq!(count_msgs(&mut alice, &ch).await, 4);
    let rows = server.db.count("messages").await;

    // A plain member may not delete another's message.
    assert_eq!(
        code(delete_msg(&mut bob, &a1.id).await),
        Code::PermissionDenied
    );
    assert!(get_msg(&mut bob, &a1.id).await.delete_time.is_none());

    // The sender deletes: soft.
    delete_msg(&mut alice, &a1.id)
        .await
        .expect("sender deletes");
    let gone = get_msg(&mut bob, &a1.id).await;
    assert!(gone.delete_time.is_some(), "delete_time set");
    assert_eq!(gone.deleted_by, "alice");
    assert_eq!(gone.body, "", "a deleted message has an empty body");
    assert_eq!(gone.sender_id, "alice");

    // The OWNER deletes a member's message; the ADMIN too; a member deletes their own.
    delete_msg(&mut alice, &b1.id).await.expect("owner deletes");
    assert_eq!(get_msg(&mut bob, &b1.id).await.deleted_by, "alice");
    delete_msg(&mut carol, &b2.id).await.expect("admin deletes");
    assert_eq!(get_msg(&mut bob, &b2.id).await.deleted_by, "carol");
    delete_msg(&mut bob, &b3.id)
        .await
        .expect("sender deletes own");
    assert_eq!(get_msg(&mut bob, &b3.id).await.deleted_by, "bob");

    assert!(list_all(&mut bob, &ch).await.is_empty(), "deleted left out");
    assert_eq!(count_msgs(&mut bob, &ch).await, 0);
    assert_eq!(
        server.db.count("messages").await,
        rows,
        "soft delete keeps rows"
    );

    // A later message is listed again.
    let live = send(&mut bob, &ch, "still here").await;
    assert_eq!(ids(&list_all(&mut alice, &ch).await), vec![live.id]);
    assert_eq!(count_msgs(&mut alice, &ch).await, 1);
    server.stop().await;
}

async fn forward_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let ch2 = group(&server, "alice", &["carol"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let mut carol = server.chat(&token("carol")).await;
    let src = bob
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "worth forwarding".into(),
            subject: "fyi".into(),
            ..Default::default()
        })
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message");

    // Into another channel.
    let f = alice
        .forward_message(proto::ForwardMessageRequest {
            message_id: src.id.clone(),
            channel_id: ch2.clone(),
            recipient_id: String::new(),
        })
        .await
        .expect("forward to channel")
        .into_inner()
        .message
        .expect("message");
    assert_ne!(f.id, src.id);
    assert_eq!(f.channel_id, ch2);
    assert_eq!(f.sender_id, "alice");
    assert_eq!(f.body, src.body);
    assert_eq!(f.subject, src.subject);
    assert_eq!(f.forwarded_from_message_id, src.id);
    assert_eq!(get_msg(&mut carol, &f.id).await, f);
    assert_eq!(ids(&list_all(&mut carol, &ch2).await), vec![f.id.clone()]);

    // To a user: a direct channel.
    let d = alice
        .forward_message(proto::ForwardMessageRequest {
            message_id: src.id.clone(),
            channel_id: String::new(),
            recipient_id: "dave".into(),
        })
        .await
        .expect("forward to recipient")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(d.forwarded_from_message_id, src.id);
    assert_eq!(d.body, src.body);
    assert_ne!(d.channel_id, ch);
    assert_ne!(d.channel_id, ch2);
    let mut dave = server.chat(&token("dave")).await;
    assert_eq!(get_msg(&mut dave, &d.id).await.id, d.id);
    let mut gd = server.groups(&token("dave")).await;
    let direct = get_group(&mut gd, &d.channel_id)
        .await
        .expect("dave sees it");
    assert_eq!(direct.kind, ChannelKind::Direct as i32);

    // The source is untouched; someone who cannot see it cannot forward it.
    let s = get_msg(&mut bob, &src.id).await;
    assert!(s.forwarded_from_message_id.is_empty());
    assert_eq!(count_msgs(&mut bob, &ch).await, 1);
    let st = carol
        .forward_message(proto::ForwardMessageRequest {
            message_id: src.id.clone(),
            channel_id: ch2.clone(),
            recipient_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    server.stop().await;
}

async fn mark_read_forward_only(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let m1 = send(&mut alice, &ch, "1").await;
    let m2 = send(&mut alice, &ch, "2").await;
    let m3 = send(&mut alice, &ch, "3").await;

    assert_eq!(
        mark_read(&mut bob, &ch, m2.sequence).await.unwrap(),
        m2.sequence
    );
    assert!(recipients(&mut bob, &m2.id)
        .await
        .iter()
        .any(|r| r.user_id == "bob" && r.read));
    assert!(recipients(&mut bob, &m3.id)
        .await
        .iter()
        .any(|r| r.user_id == "bob" && !r.read));
    // Never back.
    assert_eq!(
        mark_read(&mut bob, &ch, m1.sequence).await.unwrap(),
        m2.sequence,
        "a lower sequence changes nothing"
    );
    assert!(recipients(&mut bob, &m2.id)
        .await
        .iter()
        .any(|r| r.user_id == "bob" && r.read));

    // Beyond the channel's last sequence, or below 1 → INVALID_ARGUMENT.
    let mut gb = server.groups(&token("bob")).await;
    let last = get_group(&mut gb, &ch).await.unwrap().last_sequence;
    assert!(last >= m3.sequence);
    let st = mark_read(&mut bob, &ch, last + 1).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["sequence".to_owned()]);
    assert_eq!(
        code(mark_read(&mut bob, &ch, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(mark_read(&mut bob, &ch, last).await.unwrap(), last);
    assert!(recipients(&mut bob, &m3.id)
        .await
        .iter()
        .any(|r| r.user_id == "bob" && r.read));
    server.stop().await;
}

async fn recipients_and_favorites(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let mut carol = server.chat(&token("carol")).await;
    let mut ga = server.groups(&token("alice")).await;
    let m = send(&mut alice, &ch, "read me").await;

    let state = |rs: &[proto::MessageRecipient]| -> Vec<(String, bool, bool)> {
        rs.iter()
            .map(|r| (r.user_id.clone(), r.read, r.favorite))
            .collect()
    };
    let order: Vec<String> = members(&mut ga, &ch)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    let rs = recipients(&mut bob, &m.id).await;
    assert_eq!(
        rs.iter().map(|r| r.user_id.clone()).collect::<Vec<_>>(),
        order,
        "one entry per member, join order"
    );
    let find = |rs: &[proto::MessageRecipient], u: &str| -> (bool, bool) {
        let r = rs.iter().find(|r| r.user_id == u).expect("recipient");
        (r.read, r.favorite)
    };
    assert_eq!(
        find(&rs, "alice"),
        (true, false),
        "the sender has always read"
    );
    assert_eq!(find(&rs, "bob"), (false, false));
    assert_eq!(find(&rs, "carol"), (false, false));

    mark_read(&mut bob, &ch, m.sequence)
        .await
        .expect("mark read");
    let fav = carol
        .set_favorite(proto::SetFavoriteRequest {
            message_id: m.id.clone(),
            favorite: true,
        })
        .await
        .expect("star")
        .into_inner();
    assert!(fav.favorite);
    let rs = recipients(&mut alice, &m.id).await;
    assert_eq!(find(&rs, "alice"), (true, false));
    assert_eq!(find(&rs, "bob"), (true, false));
    assert_eq!(find(&rs, "carol"), (false, true));
    // Starring twice is fine.
    assert!(
        carol
            .set_favorite(proto::SetFavoriteRequest {
                message_id: m.id.clone(),
                favorite: true,
            })
            .await
            .expect("star again")
            .into_inner()
            .favorite
    );

    // A later message is unread for bob; the sender still has read it.
    let later = send(&mut carol, &ch, "later").await;
    let rs = recipients(&mut alice, &later.id).await;
    assert_eq!(find(&rs, "carol"), (true, false));
    assert_eq!(find(&rs, "bob"), (false, false));
    assert_eq!(find(&rs, "alice"), (false, false));

    // Unstar.
    let fav = carol
        .set_favorite(proto::SetFavoriteRequest {
            message_id: m.id.clone(),
            favorite: false,
        })
        .await
        .expect("unstar")
        .into_inner();
    assert!(!fav.favorite);
    let rs = recipients(&mut carol, &m.id).await;
    assert!(state(&rs).iter().all(|(_, _, f)| !f), "{:?}", state(&rs));
    server.stop().await;
}

async fn unread_counts(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let quiet = group(&server, "carol", &["bob"]).await;
    let not_bobs = group(&server, "alice", &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let a1 = send(&mut alice, &ch, "a1").await;
    send(&mut alice, &ch, "a2").await;
    let a3 = send(&mut alice, &ch, "a3").await;
    let b1 = send(&mut bob, &ch, "b1").await;
    send(&mut alice, &not_bobs, "elsewhere").await;

    let counts = unread(&mut bob).await;
    assert_eq!(unread_of(&counts, &ch), Some(3), "own message left out");
    assert_eq!(
        unread_of(&counts, &quiet),
        Some(0),
        "channels with 0 listed"
    );
    assert_eq!(
        unread_of(&counts, &not_bobs),
        None,
        "only the caller's channels"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(unread_of(&unread(&mut alice).await, &ch), Some(1));

    // Deleted messages are left out.
    delete_msg(&mut alice, &a3.id).await.expect("delete");
    assert_eq!(unread_of(&unread(&mut bob).await, &ch), Some(2));
    // At or below the read marker is read.
    mark_read(&mut bob, &ch, a1.sequence).await.expect("mark");
    assert_eq!(unread_of(&unread(&mut bob).await, &ch), Some(1));
    mark_read(&mut bob, &ch, b1.sequence).await.expect("mark");
    assert_eq!(unread_of(&unread(&mut bob).await, &ch), Some(0));
    assert_eq!(unread_of(&unread(&mut alice).await, &ch), Some(1));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// GroupService happy paths
// ---------------------------------------------------------------------------------------------

async fn create_get_update_group(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ga = server.groups(&token("alice")).await;
    let mut gb = server.groups(&token("bob")).await;
    let mut gc = server.groups(&token("carol")).await;
    let c = ga
        .create_group(proto::CreateGroupRequest {
            name: "Team ✨".into(),
            description: "the team".into(),
            member_ids: vec!["bob".into(), "carol".into()],
            channel_type: "support".into(),
        })
        .await
        .expect("create")
        .into_inner()
        .channel
        .expect("channel");
    assert!(uuid::Uuid::try_parse(&c.id).is_ok());
    assert_eq!(c.kind, ChannelKind::Group as i32);
    assert_eq!(c.name, "Team ✨");
    assert_eq!(c.description, "the team");
    assert_eq!(c.channel_type, "support");
    assert!(c.direct_user_ids.is_empty());
    assert!(c.create_time.is_some());
    let ms = members(&mut gb, &c.id).await;
    assert_eq!(ms.len(), 3);
    assert_eq!(ms[0], pair("alice", OWNER), "the creator is OWNER");
    assert!(ms.contains(&pair("bob", MEMBER)));
    assert!(ms.contains(&pair("carol", MEMBER)));

    let got = get_group(&mut gb, &c.id).await.expect("bob gets it");
    assert_eq!(got.id, c.id);
    assert_eq!(got.name, c.name);
    assert_eq!(got.kind, ChannelKind::Group as i32);

    // An empty name is bad input.
    let st = ga
        .create_group(proto::CreateGroupRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["name".to_owned()]);

    // Update by mask.
    let upd = |name: &str, desc: &str, label: &str, paths: &[&str]| proto::UpdateGroupRequest {
        channel_id: c.id.clone(),
        name: name.into(),
        description: desc.into(),
        channel_type: label.into(),
        update_mask: mask(paths),
    };
    let u1 = ga
        .update_group(upd("Renamed", "ignored", "ignored", &["name"]))
        .await
        .expect("rename")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(u1.name, "Renamed");
    assert_eq!(u1.description, "the team");
    assert_eq!(u1.channel_type, "support");
    let u2 = ga
        .update_group(upd(
            "ignored",
            "new desc",
            "sales",
            &["description", "channel_type"],
        ))
        .await
        .expect("describe")
        .into_inner()
        .channel
        .expect("channel");
    assert_eq!(u2.name, "Renamed");
    assert_eq!(u2.description, "new desc");
    assert_eq!(u2.channel_type, "sales");

    // An empty mask → INVALID_ARGUMENT.
    let st = ga.update_group(upd("x", "", "", &[])).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(violations(&st), vec!["update_mask".to_owned()]);

    // A MEMBER may not; an ADMIN may.
    let st = gb
        .update_group(upd("by bob", "", "", &["name"]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    set_role(&mut ga, &c.id, "carol", MemberRole::Admin)
        .await
        .expect("promote");
    gc.update_group(upd("by carol", "", "", &["name"]))
        .await
        .expect("admin renames");
    assert_eq!(get_group(&mut gb, &c.id).await.unwrap().name, "by carol");
    server.stop().await;
}

async fn list_groups_paging(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(group(&server, "alice", &["bob"]).await);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let foreign = group(&server, "zed", &["bob"]).await;
    let mut ga = server.groups(&token("alice")).await;
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();

    let all: Vec<String> = all_groups(&mut ga)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(all, newest_first, "the caller's channels, newest first");
    assert!(!all.contains(&foreign));

    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut tok = String::new();
    loop {
        let r = ga
            .list_groups(proto::ListGroupsRequest {
                page_size: 2,
                page_token: tok.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        pages.push(r.channels.into_iter().map(|c| c.id).collect());
        if r.next_page_token.is_empty() {
            break;
        }
        tok = r.next_page_token;
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(pages.concat(), newest_first);

    // bob is in all six.
    let mut gb = server.groups(&token("bob")).await;
    assert_eq!(all_groups(&mut gb).await.len(), 6);
    server.stop().await;
}

async fn delete_group(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut ga = server.groups(&token("alice")).await;
    let mut gb = server.groups(&token("bob")).await;
    let mut gc = server.groups(&token("carol")).await;
    add_members(&mut ga, &ch, &["carol"], MemberRole::Admin)
        .await
        .expect("add admin");
    let mut alice = server.chat(&token("alice")).await;
    send(&mut alice, &ch, "doomed").await;
    let del = |id: &str| proto::DeleteGroupRequest {
        channel_id: id.into(),
    };

    assert_eq!(
        code(gb.delete_group(del(&ch)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(gc.delete_group(del(&ch)).await),
        Code::PermissionDenied
    );
    assert!(get_group(&mut gb, &ch).await.is_ok(), "still there");

    ga.delete_group(del(&ch)).await.expect("owner deletes");
    for g in [&mut ga, &mut gb, &mut gc] {
        assert_eq!(code(get_group(g, &ch).await), Code::NotFound);
        assert!(!all_groups(g).await.iter().any(|c| c.id == ch));
    }
    let st = alice
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "after".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert_eq!(code(ga.delete_group(del(&ch)).await), Code::NotFound);
    server.stop().await;
}

async fn add_members_roles(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut ga = server.groups(&token("alice")).await;
    let mut gb = server.groups(&token("bob")).await;
    let mut gc = server.groups(&token("carol")).await;

    assert_eq!(
        add_members(&mut ga, &ch, &["carol"], MemberRole::Admin)
            .await
            .unwrap(),
        vec![pair("carol", ADMIN)]
    );
    // An ADMIN adds; unspecified means MEMBER.
    assert_eq!(
        add_members(&mut gc, &ch, &["dave"], MemberRole::Unspecified)
            .await
            .unwrap(),
        vec![pair("dave", MEMBER)]
    );
    // A MEMBER may not add.
    assert_eq!(
        code(add_members(&mut gb, &ch, &["erin"], MemberRole::Member).await),
        Code::PermissionDenied
    );
    // Only an OWNER adds owners.
    assert_eq!(
        code(add_members(&mut gc, &ch, &["frank"], MemberRole::Owner).await),
        Code::PermissionDenied
    );
    assert_eq!(
        add_members(&mut ga, &ch, &["gina"], MemberRole::Owner)
            .await
            .unwrap(),
        vec![pair("gina", OWNER)]
    );
    // Users already members are left as they are and not listed.
    assert_eq!(
        add_members(&mut ga, &ch, &["bob", "hank"], MemberRole::Admin)
            .await
            .unwrap(),
        vec![pair("hank", ADMIN)]
    );
    let ms: HashSet<(String, i32)> = members(&mut gb, &ch).await.into_iter().collect();
    let want: HashSet<(String, i32)> = [
        pair("alice", OWNER),
        pair("bob", MEMBER),
        pair("carol", ADMIN),
        pair("dave", MEMBER),
        pair("gina", OWNER),
        pair("hank", ADMIN),
    ]
    .into_iter()
    .collect();
    assert_eq!(ms, want);
    // A new member sees the group.
    let mut gd = server.groups(&token("dave")).await;
    assert!(get_group(&mut gd, &ch).await.is_ok());
    server.stop().await;
}

async fn remove_member_and_leave(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob", "carol", "dave"]).await;
    let mut ga = server.groups(&token("alice")).await;
    let mut gb = server.groups(&token("bob")).await;
    let mut gc = server.groups(&token("carol")).await;
    let mut gd = server.groups(&token("dave")).await;
    set_role(&mut ga, &ch, "carol", MemberRole::Admin)
        .await
        .expect("promote");

    // A plain member may not remove another.
    assert_eq!(
        code(remove_member(&mut gb, &ch, "dave").await),
        Code::PermissionDenied
    );
    // A manager removes.
    remove_member(&mut gc, &ch, "dave")
        .await
        .expect("admin removes");
    assert_eq!(code(get_group(&mut gd, &ch).await), Code::NotFound);
    // A member leaves.
    remove_member(&mut gb, &ch, "bob")
        .await
        .expect("bob leaves");
    assert_eq!(code(get_group(&mut gb, &ch).await), Code::NotFound);
    assert_eq!(
        members(&mut ga, &ch).await,
        vec![pair("alice", OWNER), pair("carol", ADMIN)]
    );
    // The last OWNER cannot leave.
    let st = remove_member(&mut ga, &ch, "alice").await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(get_group(&mut ga, &ch).await.is_ok());
    // With another owner, they can.
    set_role(&mut ga, &ch, "carol", MemberRole::Owner)
        .await
        .expect("second owner");
    remove_member(&mut ga, &ch, "alice")
        .await
        .expect("alice leaves");
    assert_eq!(members(&mut gc, &ch).await, vec![pair("carol", OWNER)]);
    assert_eq!(code(get_group(&mut ga, &ch).await), Code::NotFound);
    server.stop().await;
}

async fn list_members_paging(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &[]).await;
    let mut ga = server.groups(&token("alice")).await;
    // Joined in an order that is not alphabetical.
    let joiners = ["zoe", "yan", "xia", "walt"];
    for u in joiners {
        tokio::time::sleep(Duration::from_millis(3)).await;
        add_members(&mut ga, &ch, &[u], MemberRole::Member)
            .await
            .expect("add");
    }
    let mut want = vec![pair("alice", OWNER)];
    want.extend(joiners.iter().map(|u| pair(u, MEMBER)));
    assert_eq!(members(&mut ga, &ch).await, want, "join order");

    let mut pages: Vec<Vec<(String, i32)>> = Vec::new();
    let mut tok = String::new();
    loop {
        let r = ga
            .list_members(proto::ListMembersRequest {
                channel_id: ch.clone(),
                page_size: 2,
                page_token: tok.clone(),
            })
            .await
            .expect("page")
            .into_inner();
        assert!(r.members.iter().all(|m| m.join_time.is_some()));
        pages.push(r.members.into_iter().map(|m| (m.user_id, m.role)).collect());
        if r.next_page_token.is_empty() {
            break;
        }
        tok = r.next_page_token;
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(pages.concat(), want);
    server.stop().await;
}

async fn update_member_role(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut ga = server.groups(&token("alice")).await;
    let mut gb = server.groups(&token("bob")).await;

    let m = set_role(&mut ga, &ch, "bob", MemberRole::Admin)
        .await
        .expect("promote");
    assert_eq!((m.user_id.as_str(), m.role), ("bob", ADMIN));
    // An ADMIN may not change roles.
    assert_eq!(
        code(set_role(&mut gb, &ch, "carol", MemberRole::Admin).await),
        Code::PermissionDenied
    );
    // The last OWNER cannot step down.
    assert_eq!(
        code(set_role(&mut ga, &ch, "alice", MemberRole::Member).await),
        Code::FailedPrecondition
    );
    // UNSPECIFIED is not a role.
    assert_eq!(
        code(set_role(&mut ga, &ch, "carol", MemberRole::Unspecified).await),
        Code::InvalidArgument
    );
    // A non-member target → NOT_FOUND.
    assert_eq!(
        code(set_role(&mut ga, &ch, "nobody", MemberRole::Admin).await),
        Code::NotFound
    );
    set_role(&mut ga, &ch, "bob", MemberRole::Owner)
        .await
        .expect("second owner");
    let me = set_role(&mut ga, &ch, "alice", MemberRole::Member)
        .await
        .expect("step down");
    assert_eq!(me.role, MEMBER);
    let ms: HashSet<(String, i32)> = members(&mut gb, &ch).await.into_iter().collect();
    let want: HashSet<(String, i32)> = [
        pair("alice", MEMBER),
        pair("bob", OWNER),
        pair("carol", MEMBER),
    ]
    .into_iter()
    .collect();
    assert_eq!(ms, want);
    // Now alice is a MEMBER and may no longer change roles.
    assert_eq!(
        code(set_role(&mut ga, &ch, "carol", MemberRole::Admin).await),
        Code::PermissionDenied
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

async fn audit_rows_per_change(backend: Backend) {
    let server = TestServer::start(backend).await;
    let before_group = server.db.count("audit_logs").await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut audit = server.db.count("audit_logs").await;
    assert!(audit > before_group, "creating a group writes audit rows");

    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    let m = send(&mut alice, &ch, "audited").await;
    assert_eq!(server.db.count("audit_logs").await, audit + 1, "send");
    audit += 1;

    alice
        .update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: "edited".into(),
            update_mask: mask(&["body"]),
            ..Default::default()
        })
        .await
        .expect("edit");
    assert_eq!(server.db.count("audit_logs").await, audit + 1, "edit");
    audit += 1;

    // A refused change writes nothing.
    assert_eq!(
        code(delete_msg(&mut bob, &m.id).await),
        Code::PermissionDenied
    );
    assert_eq!(server.db.count("audit_logs").await, audit, "refused delete");

    delete_msg(&mut alice, &m.id).await.expect("delete");
    assert_eq!(server.db.count("audit_logs").await, audit + 1, "delete");
    audit += 1;

    // Reads write nothing.
    get_msg(&mut alice, &m.id).await;
    list_all(&mut alice, &ch).await;
    assert_eq!(server.db.count("audit_logs").await, audit, "reads");

    // Group and member changes are audited too.
    let mut ga = server.groups(&token("alice")).await;
    ga.update_group(proto::UpdateGroupRequest {
        channel_id: ch.clone(),
        name: "audited group".into(),
        update_mask: mask(&["name"]),
        ..Default::default()
    })
    .await
    .expect("rename");
    assert_eq!(
        server.db.count("audit_logs").await,
        audit + 1,
        "update group"
    );
    audit += 1;
    add_members(&mut ga, &ch, &["carol"], MemberRole::Member)
        .await
        .expect("add");
    assert_eq!(server.db.count("audit_logs").await, audit + 1, "add member");
    audit += 1;
    set_role(&mut ga, &ch, "carol", MemberRole::Admin)
        .await
        .expect("role");
    assert_eq!(
        server.db.count("audit_logs").await,
        audit + 1,
        "member role"
    );
    audit += 1;
    remove_member(&mut ga, &ch, "carol").await.expect("remove");
    assert_eq!(
        server.db.count("audit_logs").await,
        audit + 1,
        "remove member"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// AUTH_ENFORCE_PERMISSIONS=false
// ---------------------------------------------------------------------------------------------

async fn permissions_off_membership_still_applies(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        Options {
            enforce_permissions: false,
            ..Default::default()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let a = send(&mut alice, &ch, "alice's").await;

    let mut bob = server
        .chat(&token_with("bob", "default", vec![], 3600))
        .await;
    let m = send(&mut bob, &ch, "no keys needed").await;
    assert_eq!(m.sender_id, "bob");
    assert_eq!(list_all(&mut bob, &ch).await.len(), 2);
    let mut gb = server
        .groups(&token_with("bob", "default", vec![], 3600))
        .await;
    assert!(get_group(&mut gb, &ch).await.is_ok());

    // Roles still apply: bob may not edit alice's message.
    let st = bob
        .update_message(proto::UpdateMessageRequest {
            message_id: a.id.clone(),
            body: "hijack".into(),
            update_mask: mask(&["body"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // Membership still applies.
    let mut mallory = server
        .chat(&token_with("mallory", "default", vec![], 3600))
        .await;
    let st = mallory
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "intrude".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let st = mallory
        .get_message(proto::GetMessageRequest {
            message_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert_eq!(count_msgs(&mut alice, &ch).await, 2);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The wrong-caller matrix
// ---------------------------------------------------------------------------------------------

/// The issuer the matrix server requires.
const ISSUER: &str = "good";

/// Adds an `authorization` header when there is a token (none for the "no token" row).
#[derive(Clone)]
struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type MChat = ChatServiceClient<InterceptedService<Channel, Auth>>;
type MGroups = GroupServiceClient<InterceptedService<Channel, Auth>>;

fn clients(conn: &Channel, token: Option<&str>) -> (MChat, MGroups) {
    let auth = Auth(token.map(|t| format!("Bearer {t}").parse().expect("metadata")));
    (
        ChatServiceClient::with_interceptor(conn.clone(), auth.clone()),
        GroupServiceClient::with_interceptor(conn.clone(), auth),
    )
}

fn mint(
    secret: &[u8],
    user: &str,
    tenant: &str,
    perms: Vec<String>,
    ttl: i64,
    issuer: Option<&str>,
) -> String {
    auth::mint_hs256(
        secret,
        &TokenSpec {
            sub: user,
            tenant,
            permissions: perms,
            ttl_seconds: ttl,
            issuer,
            audience: None,
        },
    )
    .expect("mint")
}

/// A good token for the matrix server.
fn good(user: &str, tenant: &str, perms: Vec<String>) -> String {
    mint(SECRET.as_bytes(), user, tenant, perms, 3600, Some(ISSUER))
}

/// An unsigned token (`alg: none`) with otherwise valid claims.
fn alg_none(user: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let header = serde_json::json!({"alg": "none", "typ": "JWT"});
    let claims = serde_json::json!({
        "sub": user,
        "tenantId": "default",
        "permissions": auth::all_permission_names(),
        "iat": now,
        "exp": now + 3600,
        "iss": ISSUER,
    });
    format!(
        "{}.{}.",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string())
    )
}

/// What each matrix call works on: `ch` (alice OWNER, bob MEMBER) with alice's message `msg`,
/// and `ch2` (alice only) as a forward target.
struct Fixture {
    ch: String,
    ch2: String,
    msg: String,
}

async fn fixture(conn: &Channel) -> Fixture {
    let alice = good("alice", "default", auth::all_permission_names());
    let (mut chat, mut groups) = clients(conn, Some(&alice));
    let mk = |members: Vec<String>| proto::CreateGroupRequest {
        name: "matrix".into(),
        member_ids: members,
        ..Default::default()
    };
    let ch = groups
        .create_group(mk(vec!["bob".into()]))
        .await
        .expect("fixture group")
        .into_inner()
        .channel
        .expect("channel")
        .id;
    let ch2 = groups
        .create_group(mk(vec![]))
        .await
        .expect("fixture group 2")
        .into_inner()
        .channel
        .expect("channel")
        .id;
    let msg = chat
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            body: "fixture".into(),
            ..Default::default()
        })
        .await
        .expect("fixture message")
        .into_inner()
        .message
        .expect("message")
        .id;
    Fixture { ch, ch2, msg }
}

/// RPC name, permission key, whether it works on a channel (non-member / other-tenant rows).
const MATRIX: &[(&str, &str, bool)] = &[
    ("SendMessage", "CreateMessage", true),
    ("GetMessage", "ViewMessage", true),
    ("ListMessages", "ViewMessage", true),
    ("UpdateMessage", "UpdateMessage", true),
    ("DeleteMessage", "DeleteMessage", true),
    ("ForwardMessage", "CreateMessage", true),
    ("MarkRead", "UpdateMessageRecipient", true),
    ("ListMessageRecipients", "ViewMessageRecipient", true),
    ("SetFavorite", "UpdateMessageRecipient", true),
    ("GetUnreadCounts", "ViewMessage", false),
    ("CountMessages", "ViewMessage", true),
    ("Subscribe", "ViewMessage", true),
    ("CreateGroup", "CreateGroup", false),
    ("GetGroup", "ViewGroup", true),
    ("ListGroups", "ViewGroup", false),
    ("UpdateGroup", "UpdateGroup", true),
    ("DeleteGroup", "DeleteGroup", true),
    ("AddMembers", "UpdateGroup", true),
    ("RemoveMember", "UpdateGroup", true),
    ("ListMembers", "ViewGroup", true),
    ("UpdateMemberRole", "UpdateGroup", true),
];

/// Performs `rpc` with a request that succeeds for alice (OWNER of `fx.ch`, sender of `fx.msg`).
/// Subscribe reports its error on the call or as the first stream item.
async fn perform(rpc: &str, fx: &Fixture, clients: (MChat, MGroups)) -> Result<(), Status> {
    let (mut c, mut g) = clients;
    let ch = fx.ch.clone();
    let msg = fx.msg.clone();
    match rpc {
        "SendMessage" => c
            .send_message(proto::SendMessageRequest {
                channel_id: ch,
                body: "matrix".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetMessage" => c
            .get_message(proto::GetMessageRequest { message_id: msg })
            .await
            .map(drop),
        "ListMessages" => c
            .list_messages(proto::ListMessagesRequest {
                channel_id: ch,
                ..Default::default()
            })
            .await
            .map(drop),
        "UpdateMessage" => c
            .update_message(proto::UpdateMessageRequest {
                message_id: msg,
                body: "edited".into(),
                update_mask: mask(&["body"]),
                ..Default::default()
            })
            .await
            .map(drop),
        "DeleteMessage" => c
            .delete_message(proto::DeleteMessageRequest { message_id: msg })
            .await
            .map(drop),
        "ForwardMessage" => c
            .forward_message(proto::ForwardMessageRequest {
                message_id: msg,
                channel_id: fx.ch2.clone(),
                recipient_id: String::new(),
            })
            .await
            .map(drop),
        "MarkRead" => c
            .mark_read(proto::MarkReadRequest {
                channel_id: ch,
                sequence: 1,
            })
            .await
            .map(drop),
        "ListMessageRecipients" => c
            .list_message_recipients(proto::ListMessageRecipientsRequest { message_id: msg })
            .await
            .map(drop),
        "SetFavorite" => c
            .set_favorite(proto::SetFavoriteRequest {
                message_id: msg,
                favorite: true,
            })
            .await
            .map(drop),
        "GetUnreadCounts" => c
            .get_unread_counts(proto::GetUnreadCountsRequest {})
            .await
            .map(drop),
        "CountMessages" => c
            .count_messages(proto::CountMessagesRequest { channel_id: ch })
            .await
            .map(drop),
        "Subscribe" => {
            let req = proto::SubscribeRequest {
                channel_ids: vec![ch.clone()],
                cursors: [(ch, 0)].into_iter().collect(),
            };
            let mut stream = c.subscribe(req).await?.into_inner();
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(_))) => Ok(()),
                Ok(Ok(None)) => Err(Status::unknown("the stream ended without any item")),
                Ok(Err(s)) => Err(s),
                Err(_) => Err(Status::deadline_exceeded("no first item within 5 s")),
            }
        }
        "CreateGroup" => g
            .create_group(proto::CreateGroupRequest {
                name: "matrix new".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetGroup" => g
            .get_group(proto::GetGroupRequest { channel_id: ch })
            .await
            .map(drop),
        "ListGroups" => g
            .list_groups(proto::ListGroupsRequest::default())
            .await
            .map(drop),
        "UpdateGroup" => g
            .update_group(proto::UpdateGroupRequest {
                channel_id: ch,
                name: "renamed".into(),
                update_mask: mask(&["name"]),
                ..Default::default()
            })
            .await
            .map(drop),
        "DeleteGroup" => g
            .delete_group(proto::DeleteGroupRequest { channel_id: ch })
            .await
            .map(drop),
        "AddMembers" => g
            .add_members(proto::AddMembersRequest {
                channel_id: ch,
                user_ids: vec!["dave".into()],
                role: MemberRole::Member as i32,
            })
            .await
            .map(drop),
        "RemoveMember" => g
            .remove_member(proto::RemoveMemberRequest {
                channel_id: ch,
                user_id: "bob".into(),
            })
            .await
            .map(drop),
        "ListMembers" => g
            .list_members(proto::ListMembersRequest {
                channel_id: ch,
                ..Default::default()
            })
            .await
            .map(drop),
        "UpdateMemberRole" => g
            .update_member_role(proto::UpdateMemberRoleRequest {
                channel_id: ch,
                user_id: "bob".into(),
                role: MemberRole::Admin as i32,
            })
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    }
}

/// One row of the matrix: a label, the token (None = no header), the expected code and, for
/// UNAUTHENTICATED, a word the message must contain (which check failed).
struct Row {
    label: &'static str,
    token: Option<String>,
    want: Code,
    says: Option<&'static str>,
}

fn row(label: &'static str, token: Option<String>, want: Code, says: Option<&'static str>) -> Row {
    Row {
        label,
        token,
        want,
        says,
    }
}

async fn wrong_caller_matrix(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        Options {
            issuer: Some(ISSUER.into()),
            ..Default::default()
        },
    )
    .await;
    let conn = server.channel().await;
    let all = auth::all_permission_names;
    let mut failures = Vec::new();
    let mut checked = 0;
    for &(rpc, key, on_channel) in MATRIX {
        let mut fx = fixture(&conn).await;
        let mut rows = vec![
            row("no token", None, Code::Unauthenticated, None),
            row(
                "malformed token",
                Some("not-a-jwt".into()),
                Code::Unauthenticated,
                Some("malformed"),
            ),
            row(
                "expired token (ttl -120)",
                Some(mint(
                    SECRET.as_bytes(),
                    "alice",
                    "default",
                    all(),
                    -120,
                    Some(ISSUER),
                )),
                Code::Unauthenticated,
                Some("expired"),
            ),
            row(
                "wrong signature",
                Some(mint(
                    b"another-secret-fedcba9876543210",
                    "alice",
                    "default",
                    all(),
                    3600,
                    Some(ISSUER),
                )),
                Code::Unauthenticated,
                Some("signature"),
            ),
            row(
                "alg none",
                Some(alg_none("alice")),
                Code::Unauthenticated,
                None,
            ),
            row(
                "wrong issuer",
                Some(mint(
                    SECRET.as_bytes(),
                    "alice",
                    "default",
                    all(),
                    3600,
                    Some("evil"),
                )),
                Code::Unauthenticated,
                Some("issuer"),
            ),
            row(
                "missing permission key",
                Some(good("alice", "default", all_but(key))),
                Code::PermissionDenied,
                None,
            ),
        ];
        if on_channel {
            rows.push(row(
                "non-member",
                Some(good("mallory", "default", all())),
                Code::NotFound,
                None,
            ));
            rows.push(row(
                "same user id, other tenant",
                Some(good("alice", "other", all())),
                Code::NotFound,
                None,
            ));
        }
        // Control: the same call succeeds for the right caller (last, as it may change state).
        rows.push(row(
            "owner (control)",
            Some(good("alice", "default", all())),
            Code::Ok,
            None,
        ));
        for r in rows {
            checked += 1;
            let res = perform(rpc, &fx, clients(&conn, r.token.as_deref())).await;
            let (got, message) = match &res {
                Ok(()) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_owned()),
            };
            if got != r.want {
                failures.push(format!(
                    "{rpc} / {}: expected {:?}, got {got:?} ({message})",
                    r.label, r.want
                ));
                if got == Code::Ok {
                    // A call that should have failed may have changed the fixture: start over,
                    // so later rows (and the control) still test what they say.
                    fx = fixture(&conn).await;
                }
                continue;
            }
            if let Some(word) = r.says {
                if !message.to_lowercase().contains(word) {
                    failures.push(format!(
                        "{rpc} / {}: message {message:?} does not say {word:?}",
                        r.label
                    ));
                }
            }
            if message.contains(SECRET) {
                failures.push(format!("{rpc} / {}: message leaks the secret", r.label));
            }
        }
    }
    assert!(checked > 180, "the matrix ran ({checked} rows)");
    assert!(
        failures.is_empty(),
        "{} of {checked} matrix rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.stop().await;
}

/// DESIGN §2: "`iss` must equal `JWT_ISSUER` when set", so with an issuer configured a token
/// without any `iss` claim is refused, on every RPC.
async fn issuer_required_when_configured(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        Options {
            issuer: Some(ISSUER.into()),
            ..Default::default()
        },
    )
    .await;
    let conn = server.channel().await;
    let no_iss = mint(
        SECRET.as_bytes(),
        "alice",
        "default",
        auth::all_permission_names(),
        3600,
        None,
    );
    let mut failures = Vec::new();
    for &(rpc, _, _) in MATRIX {
        let fx = fixture(&conn).await;
        let got = code(perform(rpc, &fx, clients(&conn, Some(&no_iss))).await);
        if got != Code::Unauthenticated {
            failures.push(format!("{rpc}: expected Unauthenticated, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "a token without `iss` was accepted by a server with JWT_ISSUER set:\n{}",
        failures.join("\n")
    );
    server.stop().await;
}

/// The matrix server is only strict because it is configured so: a default server accepts
/// tokens without `iss`, and still refuses the other bad tokens.
async fn default_server_token_checks(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let req = || proto::CountMessagesRequest {
        channel_id: ch.clone(),
    };
    let mut ok = server.chat(&token("alice")).await;
    assert_eq!(code(ok.count_messages(req()).await), Code::Ok);
    let mut raw = server.raw_chat().await;
    assert_eq!(code(raw.count_messages(req()).await), Code::Unauthenticated);
    let mut rawg = server.raw_groups().await;
    assert_eq!(
        code(rawg.list_groups(proto::ListGroupsRequest::default()).await),
        Code::Unauthenticated
    );
    let expired = token_with("alice", "default", auth::all_permission_names(), -120);
    let mut c = server.chat(&expired).await;
    assert_eq!(code(c.count_messages(req()).await), Code::Unauthenticated);
    // Within the 30 s leeway a just-expired token still works.
    let lenient = token_with("alice", "default", auth::all_permission_names(), -5);
    let mut c = server.chat(&lenient).await;
    assert_eq!(code(c.count_messages(req()).await), Code::Ok);
    let mut c = server.chat(&alg_none("alice")).await;
    assert_eq!(code(c.count_messages(req()).await), Code::Unauthenticated);
    server.stop().await;
}

on_every_backend!(
    send_and_get_message,
    direct_channel_once_per_pair,
    threads,
    idempotent_client_message_id,
    list_messages_paging,
    list_messages_only_for_members,
    update_message,
    delete_message,
    forward_message,
    mark_read_forward_only,
    recipients_and_favorites,
    unread_counts,
    create_get_update_group,
    list_groups_paging,
    delete_group,
    add_members_roles,
    remove_member_and_leave,
    list_members_paging,
    update_member_role,
    audit_rows_per_change,
    permissions_off_membership_still_applies,
    wrong_caller_matrix,
    issuer_required_when_configured,
    default_server_token_checks,
);
