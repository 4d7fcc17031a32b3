//! Live feed: replay + live with no gap or duplicate, resume, edits and deletes, slow readers,
//! concurrent senders, membership changes, heartbeats, token expiry, shutdown.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_service::proto::{self, subscribe_response::Event};
use common::*;
use tonic::{Code, Streaming};

/// Guards against a hang, not a speed assertion.
const WAIT: Duration = Duration::from_secs(20);

async fn subscribe(
    server: &TestServer,
    user: &str,
    channels: &[&str],
    cursors: &[(&str, i64)],
) -> Streaming<proto::SubscribeResponse> {
    let mut c = server.chat(&token(user)).await;
    c.subscribe(proto::SubscribeRequest {
        channel_ids: channels.iter().map(|s| s.to_string()).collect(),
        cursors: cursors.iter().map(|(c, s)| (c.to_string(), *s)).collect(),
    })
    .await
    .expect("subscribe")
    .into_inner()
}

/// The next event that is not a heartbeat.
async fn next(stream: &mut Streaming<proto::SubscribeResponse>) -> proto::SubscribeResponse {
    loop {
        let ev = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event within the wait")
            .expect("stream ok")
            .expect("stream open");
        if !matches!(ev.event, Some(Event::Heartbeat(_))) {
            return ev;
        }
    }
}

fn body(ev: &proto::SubscribeResponse) -> String {
    match &ev.event {
        Some(Event::MessageCreated(m)) => m
            .message
            .as_ref()
            .map(|m| m.body.clone())
            .unwrap_or_default(),
        other => panic!("expected MessageCreated, got {other:?}"),
    }
}

async fn first_conversation(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let m = send(&mut alice, &ch, "hello").await;
    assert_eq!(m.sequence, 3, "two MemberAdded events come first");
    server.stop().await;
}

async fn every_message_in_order(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut feed = subscribe(&server, "bob", &[], &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    for i in 0..50 {
        send(&mut alice, &ch, &format!("m{i}")).await;
    }
    for i in 0..50 {
        let ev = next(&mut feed).await;
        assert_eq!(ev.channel_id, ch);
        assert_eq!(ev.sequence, 3 + i);
        assert_eq!(body(&ev), format!("m{i}"));
    }
}

async fn resume_gives_exactly_the_missed_events(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut feed = subscribe(&server, "bob", &[&ch], &[(&ch, 0)]).await;
    // Replay from 0: the two MemberAdded events, then live messages.
    assert!(matches!(
        next(&mut feed).await.event,
        Some(Event::MemberAdded(_))
    ));
    assert!(matches!(
        next(&mut feed).await.event,
        Some(Event::MemberAdded(_))
    ));
    let first = send(&mut alice, &ch, "one").await;
    let ev = next(&mut feed).await;
    assert_eq!((ev.sequence, body(&ev)), (first.sequence, "one".to_owned()));
    let cursor = ev.sequence;
    drop(feed);

    // While bob is away: two sends, an edit and a delete.
    let two = send(&mut alice, &ch, "two").await;
    let three = send(&mut alice, &ch, "three").await;
    alice
        .update_message(proto::UpdateMessageRequest {
            message_id: two.id.clone(),
            body: "two (edited)".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["body".into()],
            }),
            ..Default::default()
        })
        .await
        .expect("edit");
    alice
        .delete_message(proto::DeleteMessageRequest {
            message_id: three.id.clone(),
        })
        .await
        .expect("delete");

    let mut feed = subscribe(&server, "bob", &[&ch], &[(&ch, cursor)]).await;
    let evs: Vec<_> = [
        next(&mut feed).await,
        next(&mut feed).await,
        next(&mut feed).await,
        next(&mut feed).await,
    ]
    .into();
    let seqs: Vec<i64> = evs.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, vec![cursor + 1, cursor + 2, cursor + 3, cursor + 4]);
    assert_eq!(body(&evs[0]), "two");
    assert_eq!(body(&evs[1]), "three");
    match &evs[2].event {
        Some(Event::MessageUpdated(u)) => assert_eq!(
            u.message.as_ref().map(|m| m.body.as_str()),
            Some("two (edited)")
        ),
        other => panic!("expected MessageUpdated, got {other:?}"),
    }
    match &evs[3].event {
        Some(Event::MessageDeleted(d)) => {
            let m = d.message.as_ref().expect("message");
            assert_eq!(m.id, three.id);
            assert!(m.delete_time.is_some());
            assert_eq!(m.body, "");
        }
        other => panic!("expected MessageDeleted, got {other:?}"),
    }
    // Then live, with no duplicate of anything replayed.
    let four = send(&mut alice, &ch, "four").await;
    let ev = next(&mut feed).await;
    assert_eq!((ev.sequence, body(&ev)), (four.sequence, "four".to_owned()));
    assert_eq!(ev.sequence, cursor + 5);
}

async fn edit_and_delete_arrive_live(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut feed = subscribe(&server, "bob", &[], &[]).await;
    let m = send(&mut alice, &ch, "typo").await;
    let edited = alice
        .update_message(proto::UpdateMessageRequest {
            message_id: m.id.clone(),
            body: "fixed".into(),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["body".into()],
            }),
            etag: m.etag.clone(),
            ..Default::default()
        })
        .await
        .expect("edit")
        .into_inner()
        .message
        .expect("message");
    alice
        .delete_message(proto::DeleteMessageRequest {
            message_id: m.id.clone(),
        })
        .await
        .expect("delete");
    assert_eq!(body(&next(&mut feed).await), "typo");
    let ev = next(&mut feed).await;
    match ev.event {
        Some(Event::MessageUpdated(u)) => {
            let u = u.message.expect("message");
            assert_eq!(u.body, "fixed");
            assert_eq!(u.etag, edited.etag);
            assert_eq!(
                u.sequence, m.sequence,
                "a message keeps the sequence of its creation"
            );
        }
        other => panic!("expected MessageUpdated, got {other:?}"),
    }
    assert_eq!(ev.sequence, m.sequence + 1);
    let ev = next(&mut feed).await;
    assert!(matches!(ev.event, Some(Event::MessageDeleted(_))));
    assert_eq!(ev.sequence, m.sequence + 2);
}

/// A server whose hub queues at most 4 events per feed: a reader falls behind at once.
async fn server_with_small_hub_queue(backend: Backend) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            feed_buffer: 4,
            ..Default::default()
        },
    )
    .await
}

async fn slow_reader_catches_up_from_storage(backend: Backend) {
    let server = server_with_small_hub_queue(backend).await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut slow = subscribe(&server, "bob", &[], &[]).await;
    let mut fast = subscribe(&server, "carol", &[], &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    let n = 600;
    // The slow reader reads nothing while all of this is sent: the sends must all complete.
    let sender = tokio::spawn(async move {
        for i in 0..n {
            send(&mut alice, &ch, &format!("m{i}")).await;
        }
    });
    // The fast reader keeps up meanwhile.
    for i in 0..n {
        assert_eq!(body(&next(&mut fast).await), format!("m{i}"));
    }
    tokio::time::timeout(WAIT, sender)
        .await
        .expect("senders not blocked")
        .expect("sender");
    let mut last = 3; // three MemberAdded events come first
    for i in 0..n {
        let ev = next(&mut slow).await;
        assert_eq!(ev.sequence, last + 1, "no gap, no duplicate");
        last = ev.sequence;
        assert_eq!(body(&ev), format!("m{i}"));
    }
}

/// A slow reader following a busy channel and a quiet one: the quiet channel's event, which the
/// hub could not queue, reaches the reader while the busy channel keeps flowing. (Whether the
/// hub's queue stays non-empty while the reader reads, the case the feed's lag check before
/// each `select!` is for, is up to the scheduler; what this pins down is that a miss on one
/// channel is caught up from storage while another channel's live events arrive.)
async fn quiet_channel_catches_up_while_a_busy_one_floods(backend: Backend) {
    let server = server_with_small_hub_queue(backend).await;
    let busy = group(&server, "alice", &["bob"]).await;
    let quiet = group(&server, "alice", &["bob"]).await;
    let mut feed = subscribe(&server, "bob", &[], &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    // Fill everything between the hub and bob (HTTP/2 windows and buffers, the feed's outbox,
    // then the hub's queue of 4) from the busy channel, then send the quiet one's only message.
    let big = "x".repeat(30_000);
    for i in 0..200 {
        send(&mut alice, &busy, &format!("busy {i} {big}")).await;
    }
    send(&mut alice, &quiet, "quiet").await;
    // Keep the busy channel flooding, from several senders, while bob reads.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..4 {
        let (stop, busy, big) = (stop.clone(), busy.clone(), big.clone());
        let mut c = server.chat(&token("alice")).await;
        flood.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                send(&mut c, &busy, &format!("flood {i} {big}")).await;
                i += 1;
            }
        }));
    }
    let mut last_busy = 0;
    let mut seen_quiet = false;
    for _ in 0..5_000 {
        let ev = next(&mut feed).await;
        if ev.channel_id == quiet && body(&ev) == "quiet" {
            seen_quiet = true;
            break;
        }
        if ev.channel_id == busy {
            assert!(ev.sequence > last_busy, "busy channel in order");
            last_busy = ev.sequence;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood sender");
    }
    assert!(
        seen_quiet,
        "the quiet channel's message did not arrive within 5,000 events of the busy one"
    );
}

async fn concurrent_senders_get_gap_free_sequences(backend: Backend) {
    let server = TestServer::start(backend).await;
    let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let ch = group(&server, "owner", &refs).await;
    let mut feed = subscribe(&server, "owner", &[&ch], &[]).await;
    let per_sender = 10;
    let mut tasks = Vec::new();
    for u in &users {
        let mut c = server.chat(&token(u)).await;
        let ch = ch.clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..per_sender {
                seqs.push(send(&mut c, &ch, &format!("{u}:{i}")).await.sequence);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("sender"));
    }
    all.sort();
    let first = 22; // 21 MemberAdded events, then messages
    let expected: Vec<i64> = (first..first + 20 * per_sender).collect();
    assert_eq!(all, expected, "gap-free, no duplicates");
    // The feed sees them in sequence order, and each sender's messages in its own order.
    let mut per_user: HashMap<String, i64> = HashMap::new();
    for s in expected {
        let ev = next(&mut feed).await;
        assert_eq!(ev.sequence, s);
        let b = body(&ev);
        let (u, i) = b.split_once(':').expect("user:i");
        let i: i64 = i.parse().expect("i");
        let prev = per_user.insert(u.to_owned(), i).unwrap_or(-1);
        assert_eq!(i, prev + 1);
    }
}

async fn channels_joined_and_left_while_open(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut feed = subscribe(&server, "bob", &[], &[]).await;
    // A group made with bob after the feed opened starts flowing, from bob's join on.
    let ch = group(&server, "alice", &["bob"]).await;
    let ev = next(&mut feed).await;
    assert_eq!(ev.channel_id, ch);
    match &ev.event {
        Some(Event::MemberAdded(a)) => {
            assert_eq!(a.member.as_ref().map(|m| m.user_id.as_str()), Some("bob"))
        }
        other => panic!("expected MemberAdded, got {other:?}"),
    }
    let mut alice = server.chat(&token("alice")).await;
    send(&mut alice, &ch, "welcome").await;
    assert_eq!(body(&next(&mut feed).await), "welcome");
    // A direct message made after the feed opened flows too.
    alice
        .send_message(proto::SendMessageRequest {
            recipient_id: "bob".into(),
            body: "psst".into(),
            ..Default::default()
        })
        .await
        .expect("direct");
    let mut saw_direct = false;
    for _ in 0..3 {
        let ev = next(&mut feed).await;
        if let Some(Event::MessageCreated(m)) = &ev.event {
            assert_eq!(m.message.as_ref().map(|m| m.body.as_str()), Some("psst"));
            saw_direct = true;
            break;
        }
    }
    assert!(saw_direct);
    // Removal stops the channel's events (after the removal event itself).
    let mut g = server.groups(&token("alice")).await;
    g.remove_member(proto::RemoveMemberRequest {
        channel_id: ch.clone(),
        user_id: "bob".into(),
    })
    .await
    .expect("remove");
    let ev = next(&mut feed).await;
    assert!(matches!(ev.event, Some(Event::MemberRemoved(_))));
    send(&mut alice, &ch, "bob cannot see this").await;
    alice
        .send_message(proto::SendMessageRequest {
            recipient_id: "bob".into(),
            body: "but this".into(),
            ..Default::default()
        })
        .await
        .expect("direct");
    assert_eq!(body(&next(&mut feed).await), "but this");
}

async fn delete_group_ends_its_feed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut feed = subscribe(&server, "bob", &[&ch], &[]).await;
    let mut g = server.groups(&token("alice")).await;
    g.delete_group(proto::DeleteGroupRequest {
        channel_id: ch.clone(),
    })
    .await
    .expect("delete");
    let mut removed_me = false;
    loop {
        match tokio::time::timeout(WAIT, feed.message())
            .await
            .expect("ends")
        {
            Ok(Some(ev)) => {
                if let Some(Event::MemberRemoved(r)) = ev.event {
                    removed_me |= r.member.map(|m| m.user_id == "bob").unwrap_or(false);
                }
            }
            Ok(None) => break,
            Err(s) => panic!("expected a clean end, got {s:?}"),
        }
    }
    assert!(removed_me);
    // The channel is gone for everyone.
    let status = subscribe_err(&server, "bob", &ch).await;
    assert_eq!(status, Code::NotFound);
}

async fn subscribe_err(server: &TestServer, user: &str, ch: &str) -> Code {
    let mut c = server.chat(&token(user)).await;
    match c
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![ch.to_owned()],
            cursors: HashMap::new(),
        })
        .await
    {
        Ok(mut s) => s.get_mut().message().await.expect_err("an error").code(),
        Err(s) => s.code(),
    }
}

async fn cursor_beyond_end_is_out_of_range(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut c = server.chat(&token("bob")).await;
    let err = c
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![],
            cursors: [(ch.clone(), 3)].into(),
        })
        .await
        .expect_err("beyond");
    assert_eq!(err.code(), Code::OutOfRange);
    // At the end exactly is fine.
    let mut s = c
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![],
            cursors: [(ch.clone(), 2)].into(),
        })
        .await
        .expect("at end")
        .into_inner();
    let mut alice = server.chat(&token("alice")).await;
    send(&mut alice, &ch, "next").await;
    assert_eq!(next(&mut s).await.sequence, 3);
}

/// A server whose feeds send a heartbeat every 300 ms.
async fn server_with_fast_heartbeat(backend: Backend) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            heartbeat: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
}

async fn read_markers_and_heartbeats_are_live_only(backend: Backend) {
    let server = server_with_fast_heartbeat(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let m = send(&mut alice, &ch, "read me").await;
    let mut feed = subscribe(&server, "alice", &[], &[]).await;
    let mut bob = server.chat(&token("bob")).await;
    bob.mark_read(proto::MarkReadRequest {
        channel_id: ch.clone(),
        sequence: m.sequence,
    })
    .await
    .expect("mark");
    let ev = next(&mut feed).await;
    assert_eq!(ev.sequence, 0);
    match ev.event {
        Some(Event::ReadMarkerUpdated(r)) => {
            assert_eq!((r.user_id.as_str(), r.read_sequence), ("bob", m.sequence))
        }
        other => panic!("expected ReadMarkerUpdated, got {other:?}"),
    }
    let hb = tokio::time::timeout(WAIT, feed.message())
        .await
        .expect("heartbeat")
        .expect("ok")
        .expect("open");
    assert!(matches!(hb.event, Some(Event::Heartbeat(_))));
    assert_eq!(hb.sequence, 0);
}

/// MarkRead publishes a ReadMarkerUpdated only when the marker moves: 41 calls that leave it
/// where it is (the same sequence again, or a lower one) once gave 41 events to every
/// subscriber of the channel.
async fn mark_read_publishes_only_a_real_move(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let m1 = send(&mut alice, &ch, "one").await;
    let m2 = send(&mut alice, &ch, "two").await;
    let mut feed = subscribe(&server, "alice", &[&ch], &[]).await;
    let mut bob = server.chat(&token("bob")).await;
    for seq in std::iter::once(m2.sequence)
        .chain(std::iter::repeat_n(m2.sequence, 20))
        .chain(std::iter::repeat_n(m1.sequence, 20))
    {
        let r = bob
            .mark_read(proto::MarkReadRequest {
                channel_id: ch.clone(),
                sequence: seq,
            })
            .await
            .expect("mark")
            .into_inner();
        assert_eq!(r.read_sequence, m2.sequence, "never back");
    }
    let m3 = send(&mut alice, &ch, "three").await;
    let ev = next(&mut feed).await;
    assert!(
        matches!(&ev.event, Some(Event::ReadMarkerUpdated(r)) if r.read_sequence == m2.sequence),
        "{ev:?}"
    );
    let ev = next(&mut feed).await;
    assert_eq!(
        (body(&ev), ev.sequence),
        ("three".to_owned(), m3.sequence),
        "no event for the 40 calls that moved nothing"
    );
}

/// A feed of all the user's channels on a token that expires in `ttl` seconds.
async fn subscribe_expiring(
    server: &TestServer,
    user: &str,
    ttl: i64,
) -> Streaming<proto::SubscribeResponse> {
    let permissions = chat_service::auth::all_permission_names();
    let mut c = server
        .chat(&token_with(user, "default", permissions, ttl))
        .await;
    c.subscribe(proto::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner()
}

async fn stream_ends_unauthenticated_when_token_expires(backend: Backend) {
    let server = TestServer::start(backend).await;
    group(&server, "alice", &["bob"]).await;
    let mut feed = subscribe_expiring(&server, "bob", 2).await;
    let end = loop {
        match tokio::time::timeout(WAIT, feed.message())
            .await
            .expect("ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without UNAUTHENTICATED"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated);
    assert!(end.message().contains("expired"));
}

/// A feed's one timer serves both heartbeats and token expiry, and is re-armed after each
/// heartbeat: after a burst of 400 live events the feed still sends heartbeats, then ends with
/// UNAUTHENTICATED when the token expires. (The unit tests in `src/domain/feed.rs` cover a
/// timer first polled with the task's budget spent.)
async fn timer_fires_after_a_live_burst(backend: Backend) {
    let server = server_with_fast_heartbeat(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    // Room for the burst on a loaded CI machine; the test then waits out the rest.
    let ttl = 12;
    let mut feed = subscribe_expiring(&server, "bob", ttl).await;
    let opened = std::time::Instant::now();
    let mut senders = Vec::new();
    for s in 0..4 {
        let mut alice = server.chat(&token("alice")).await;
        let ch = ch.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..100 {
                send(&mut alice, &ch, &format!("burst {s}/{i}")).await;
            }
        }));
    }
    let mut got = 0;
    while got < 400 {
        let ev = next(&mut feed).await;
        assert!(body(&ev).starts_with("burst "));
        got += 1;
    }
    for s in senders {
        s.await.expect("sender");
    }
    assert!(
        opened.elapsed() < Duration::from_secs(ttl as u64 - 2),
        "the burst took too long to leave time for the heartbeat check"
    );
    let hb = tokio::time::timeout(WAIT, feed.message())
        .await
        .expect("a heartbeat after the burst")
        .expect("ok")
        .expect("open");
    assert!(matches!(hb.event, Some(Event::Heartbeat(_))), "{hb:?}");
    let end = loop {
        match tokio::time::timeout(WAIT, feed.message())
            .await
            .expect("ends at expiry")
        {
            Ok(Some(ev)) => assert!(matches!(ev.event, Some(Event::Heartbeat(_))), "{ev:?}"),
            Ok(None) => panic!("ended without UNAUTHENTICATED"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated);
}

/// A client that stops reading holds no hub registration past its token's expiry: its stream
/// is not polled, so the hub drops the feed when it cannot queue for it any more; reading
/// again, the client hears UNAUTHENTICATED.
async fn stalled_reader_leaves_the_hub_when_its_token_expires(backend: Backend) {
    let server = server_with_small_hub_queue(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    // Long enough to fill the pipe on a loaded CI machine (200 sends of 30 KB took over 2 s
    // there); the test then waits out the rest.
    let ttl = 10;
    let opened = std::time::Instant::now();
    let mut feed = subscribe_expiring(&server, "bob", ttl).await;
    let hub = server.chat.hub().clone();
    let mut alice = server.chat(&token("alice")).await;
    // Bob reads nothing: fill the HTTP/2 windows, the feed's outbox and the hub's queue.
    let big = "x".repeat(30_000);
    for i in 0..200 {
        send(&mut alice, &ch, &format!("before {i} {big}")).await;
    }
    assert_eq!(
        hub.followed_channels(),
        1,
        "registered while the token lasts"
    );
    // `exp` is in whole seconds: a second more than the TTL is past it.
    let expired_at = opened + Duration::from_secs(ttl as u64 + 1);
    tokio::time::sleep(expired_at.saturating_duration_since(std::time::Instant::now())).await;
    send(&mut alice, &ch, "after expiry").await;
    assert_eq!(hub.followed_channels(), 0, "dropped once expired and full");
    let end = loop {
        match tokio::time::timeout(WAIT, feed.message())
            .await
            .expect("ends")
        {
            Ok(Some(ev)) => assert_ne!(body(&ev), "after expiry", "nothing after expiry"),
            Ok(None) => panic!("ended without UNAUTHENTICATED"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated);
}

/// A token that expired a moment ago is still let in (30 s leeway), but the feed sends nothing
/// after its `exp`: a replay from cursor 0, however fast the client reads, ends at once with
/// UNAUTHENTICATED and no event.
async fn no_replay_after_the_token_expired(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    for i in 0..40 {
        send(&mut alice, &ch, &format!("m{i}")).await;
    }
    let mut c = server
        .chat(&token_with(
            "bob",
            "default",
            chat_service::auth::all_permission_names(),
            -2,
        ))
        .await;
    let mut feed = c
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![ch.clone()],
            cursors: [(ch, 0)].into(),
        })
        .await
        .expect("subscribe within the leeway")
        .into_inner();
    let first = tokio::time::timeout(WAIT, feed.message())
        .await
        .expect("an answer");
    match first {
        Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "{s:?}"),
        Ok(ev) => panic!("expected UNAUTHENTICATED before any event, got {ev:?}"),
    }
}

/// Every legal `exp` works on Subscribe as on unary calls: 10^19 (an instant overflow once
/// made the feed task panic and reset the stream) and fractional seconds (RFC 7519
/// NumericDate; once read as 0, "token expired", while unary calls accepted the token).
async fn subscribe_accepts_every_legal_exp(backend: Backend) {
    let server = server_with_fast_heartbeat(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let before = send(&mut alice, &ch, "before").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for exp in [
        serde_json::json!(10_000_000_000_000_000_000u64),
        serde_json::json!(now + 3600.25),
        serde_json::json!(now + 60.5),
    ] {
        let claims = serde_json::json!({
            "sub": "bob",
            "tenantId": "default",
            "permissions": chat_service::auth::all_permission_names(),
            "exp": exp,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("sign");
        let mut c = server.chat(&token).await;
        c.count_messages(proto::CountMessagesRequest {
            channel_id: ch.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("exp {exp}: unary call refused: {s:?}"));
        let mut feed = c
            .subscribe(proto::SubscribeRequest {
                channel_ids: vec![ch.clone()],
                cursors: [(ch.clone(), before.sequence - 1)].into(),
            })
            .await
            .unwrap_or_else(|s| panic!("exp {exp}: subscribe refused: {s:?}"))
            .into_inner();
        assert_eq!(body(&next(&mut feed).await), "before", "exp {exp}: replay");
        // Still open a heartbeat later (300 ms): not ended as expired, not reset.
        let hb = tokio::time::timeout(WAIT, feed.message())
            .await
            .expect("a heartbeat");
        match hb {
            Ok(Some(ev)) => assert!(matches!(ev.event, Some(Event::Heartbeat(_))), "{ev:?}"),
            other => panic!("exp {exp}: the feed ended: {other:?}"),
        }
    }
}

async fn shutdown_closes_feeds_cleanly(backend: Backend) {
    let server = TestServer::start(backend).await;
    group(&server, "alice", &["bob"]).await;
    let mut feed = subscribe(&server, "bob", &[], &[]).await;
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("graceful shutdown does not hang");
    let end = tokio::time::timeout(WAIT, feed.message())
        .await
        .expect("feed ends");
    assert!(matches!(end, Ok(None)), "clean end, got {end:?}");
}

async fn replay_across_removal_and_rejoin(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut g = server.groups(&token("alice")).await;
    let before = send(&mut alice, &ch, "before").await;
    g.remove_member(proto::RemoveMemberRequest {
        channel_id: ch.clone(),
        user_id: "bob".into(),
    })
    .await
    .expect("remove");
    send(&mut alice, &ch, "while bob is out").await;
    g.add_members(proto::AddMembersRequest {
        channel_id: ch.clone(),
        user_ids: vec!["bob".into()],
        role: 0,
    })
    .await
    .expect("re-add");
    send(&mut alice, &ch, "after").await;
    // Bob resumes from before his removal, following all his channels.
    let mut feed = subscribe(&server, "bob", &[], &[(&ch, before.sequence)]).await;
    assert!(matches!(
        next(&mut feed).await.event,
        Some(Event::MemberRemoved(_))
    ));
    assert!(matches!(
        next(&mut feed).await.event,
        Some(Event::MemberAdded(_))
    ));
    assert_eq!(
        body(&next(&mut feed).await),
        "after",
        "nothing from while bob was out"
    );
    send(&mut alice, &ch, "live").await;
    assert_eq!(
        body(&next(&mut feed).await),
        "live",
        "the channel is still followed"
    );
}

async fn stalled_reader_does_not_block_shutdown(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &["bob"]).await;
    // Bob opens a feed and never reads it.
    let _feed = subscribe(&server, "bob", &[], &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    let big = "x".repeat(4000);
    for _ in 0..300 {
        send(&mut alice, &ch, &big).await;
    }
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("shutdown is not held up by a stalled reader");
}

on_every_backend!(
    first_conversation,
    every_message_in_order,
    resume_gives_exactly_the_missed_events,
    edit_and_delete_arrive_live,
    slow_reader_catches_up_from_storage,
    quiet_channel_catches_up_while_a_busy_one_floods,
    concurrent_senders_get_gap_free_sequences,
    channels_joined_and_left_while_open,
    delete_group_ends_its_feed,
    cursor_beyond_end_is_out_of_range,
    read_markers_and_heartbeats_are_live_only,
    stream_ends_unauthenticated_when_token_expires,
    timer_fires_after_a_live_burst,
    stalled_reader_leaves_the_hub_when_its_token_expires,
    no_replay_after_the_token_expired,
    subscribe_accepts_every_legal_exp,
    mark_read_publishes_only_a_real_move,
    shutdown_closes_feeds_cleanly,
    replay_across_removal_and_rejoin,
    stalled_reader_does_not_block_shutdown,
);
