//! Repository conformance: the same suite against every database backend, through the store
//! traits directly (no gRPC), including the races the API cannot force reliably.

mod common;

use std::sync::Arc;

use chat_service::store::{
    self, Actor, AttachmentRow, BatchMessage, ChannelRow, CommitPaths, DownloadRow, Inserted,
    MessagePatch, MessageRow, NewMessage, Role, Store, StoreError, StoreResult, UploadRow,
};
use common::*;

async fn open(backend: Backend) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(backend).await;
    let s = store::connect(&db.url, db.schema.as_deref(), true)
        .await
        .expect("connect");
    (db, s)
}

fn actor<'a>(user: &'a str) -> Actor<'a> {
    Actor {
        tenant_id: "t1",
        user_id: user,
    }
}

fn enc<T>(_: &T, seq: i64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

fn new_group(id: &str) -> ChannelRow {
    let now = store::now_micros();
    ChannelRow {
        id: id.into(),
        tenant_id: "t1".into(),
        kind: store::KIND_GROUP.into(),
        name: "g".into(),
        description: String::new(),
        channel_type: String::new(),
        direct_key: None,
        last_sequence: 0,
        create_time: now,
        update_time: now,
    }
}

fn msg(channel: &str, body: &str, key: Option<&str>) -> NewMessage {
    NewMessage {
        channel_id: channel.into(),
        body: body.into(),
        subject: String::new(),
        parent_message_id: None,
        attachment_ids: Vec::new(),
        client_message_id: key.map(str::to_owned),
        forwarded_from_message_id: None,
    }
}

async fn group_with(s: &Arc<dyn Store>, members: &[&str]) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
    let (ch, added) = s
        .create_group(actor("owner"), new_group(&id), &members, &enc)
        .await
        .expect("group");
    assert_eq!(ch.last_sequence, added.len() as i64);
    id
}

async fn sequences_are_gap_free_under_concurrency(backend: Backend) {
    let (_db, s) = open(backend).await;
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let ch = group_with(&s, &refs).await;
    let mut tasks = Vec::new();
    for u in users.clone() {
        let s = s.clone();
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                match s
                    .insert_message(actor(&u), msg(&ch, &format!("{u}-{i}"), None), &enc)
                    .await
                    .expect("insert")
                {
                    Inserted::New(row, payload) => {
                        assert_eq!(
                            payload,
                            row.sequence.to_be_bytes().to_vec(),
                            "the encoder saw the final sequence"
                        );
                        seqs.push(row.sequence)
                    }
                    Inserted::Existing(_) => panic!("no key, no dedup"),
                }
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    assert_eq!(
        all,
        (10..10 + 200).collect::<Vec<i64>>(),
        "9 member events, then 200 messages"
    );
    let events = s.events(&ch, 0, i64::MAX, 1000).await.expect("events");
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=209).collect::<Vec<i64>>());
    let page = s.events(&ch, 100, 105, 1000).await.expect("range");
    assert_eq!(
        page.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        vec![101, 102, 103, 104, 105]
    );
    assert_eq!(
        s.channel("t1", &ch).await.expect("channel").last_sequence,
        209
    );
}

async fn idempotent_insert_races_give_one_message(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            match s
                .insert_message(actor("owner"), msg(&ch, "once", Some("k1")), &enc)
                .await
                .expect("insert")
            {
                Inserted::New(r, _) | Inserted::Existing(r) => r.id,
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every caller got the same message");
    assert_eq!(db.count("messages").await, 1);
    assert_eq!(
        s.channel("t1", &ch).await.expect("ch").last_sequence,
        2,
        "no sequence burnt for duplicates"
    );
}

async fn direct_channel_races_give_one_channel(backend: Backend) {
    let (db, s) = open(backend).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (me, peer) = if i % 2 == 0 {
                ("ann", "ben")
            } else {
                ("ben", "ann")
            };
            s.direct_channel(actor(me), peer, &enc)
                .await
                .expect("direct")
                .0
                .id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(db.count("channels").await, 1);
    assert_eq!(db.count("members").await, 2);
    let found = s
        .find_direct_channel(actor("ben"), "ann")
        .await
        .expect("find")
        .expect("exists");
    assert_eq!(found.id, ids[0]);
    assert!(s
        .find_direct_channel(actor("ben"), "cat")
        .await
        .expect("find")
        .is_none());
}

async fn tenancy_is_enforced_by_every_lookup(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["bob"]).await;
    let m = match s
        .insert_message(actor("bob"), msg(&ch, "hi", None), &enc)
        .await
        .expect("insert")
    {
        Inserted::New(r, _) => r,
        Inserted::Existing(_) => panic!("new"),
    };
    assert!(matches!(
        s.channel("t2", &ch).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.message("t2", &m.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.member("t2", &ch, "bob").await.expect("member").is_none());
    assert!(s
        .memberships("t2", "bob")
        .await
        .expect("memberships")
        .is_empty());
    let other = Actor {
        tenant_id: "t2",
        user_id: "bob",
    };
    assert!(matches!(
        s.insert_message(other, msg(&ch, "x", None), &enc).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.update_message(other, &m.id, MessagePatch::default(), &enc)
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn non_member_insert_writes_nothing(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &[]).await;
    let before = db.counts().await;
    assert!(matches!(
        s.insert_message(actor("stranger"), msg(&ch, "x", None), &enc)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.insert_message(
            actor("owner"),
            NewMessage {
                attachment_ids: vec![uuid::Uuid::now_v7().to_string()],
                ..msg(&ch, "x", None)
            },
            &enc
        )
        .await,
        Err(StoreError::Unlinkable(0))
    ));
    assert_eq!(db.counts().await, before);
    assert_eq!(
        s.channel("t1", &ch).await.expect("ch").last_sequence,
        1,
        "a rolled-back send burns no sequence"
    );
}

async fn edits_check_versions_and_write_events_and_audit(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &[]).await;
    let m = match s
        .insert_message(actor("owner"), msg(&ch, "v1", None), &enc)
        .await
        .expect("insert")
    {
        Inserted::New(r, _) => r,
        Inserted::Existing(_) => panic!("new"),
    };
    let audit = db.count("audit_logs").await;
    let patch = MessagePatch {
        body: Some("v2".into()),
        subject: None,
        expected_version: Some(m.version),
    };
    let changed = s
        .update_message(actor("owner"), &m.id, patch, &enc)
        .await
        .expect("update");
    assert_eq!(changed.row.body, "v2");
    assert_eq!(changed.row.version, m.version + 1);
    assert_eq!(changed.row.sequence, m.sequence);
    assert_eq!(changed.sequence, m.sequence + 1);
    let stale = MessagePatch {
        body: Some("v3".into()),
        subject: None,
        expected_version: Some(m.version),
    };
    assert!(matches!(
        s.update_message(actor("owner"), &m.id, stale, &enc).await,
        Err(StoreError::Stale)
    ));
    let deleted = s
        .delete_message(actor("owner"), &m.id, &enc)
        .await
        .expect("delete");
    assert!(deleted.row.delete_time.is_some());
    assert!(matches!(
        s.delete_message(actor("owner"), &m.id, &enc).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(db.count("audit_logs").await, audit + 2);
    assert_eq!(
        s.channel("t1", &ch).await.expect("ch").last_sequence,
        deleted.sequence,
        "failed changes burn no sequence"
    );
    assert_eq!(s.count_messages(&ch).await.expect("count"), 0);
}

async fn read_markers_favorites_and_unread(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["bob"]).await;
    let mut last = None;
    for i in 0..3 {
        if let Inserted::New(r, _) = s
            .insert_message(actor("owner"), msg(&ch, &format!("{i}"), None), &enc)
            .await
            .expect("insert")
        {
            last = Some(r);
        }
    }
    let last = last.expect("a message");
    assert_eq!(
        s.unread_counts("t1", "bob").await.expect("unread"),
        vec![(ch.clone(), 3)]
    );
    assert_eq!(
        s.unread_counts("t1", "owner").await.expect("unread"),
        vec![(ch.clone(), 0)]
    );
    assert_eq!(
        s.mark_read(&ch, "bob", last.sequence - 1)
            .await
            .expect("mark"),
        (last.sequence - 1, true)
    );
    assert_eq!(
        s.mark_read(&ch, "bob", 1).await.expect("never back"),
        (last.sequence - 1, false)
    );
    assert_eq!(
        s.mark_read(&ch, "bob", last.sequence - 1)
            .await
            .expect("same again"),
        (last.sequence - 1, false),
        "a marker already there did not move"
    );
    assert_eq!(
        s.unread_counts("t1", "bob").await.expect("unread"),
        vec![(ch.clone(), 1)]
    );
    s.set_favorite("t1", "bob", &last.id, true)
        .await
        .expect("fav");
    s.set_favorite("t1", "bob", &last.id, true)
        .await
        .expect("fav twice is fine");
    let r = s.recipients(&last).await.expect("recipients");
    let bob = r.iter().find(|r| r.user_id == "bob").expect("bob");
    assert!(bob.favorite && !bob.read);
    let owner = r.iter().find(|r| r.user_id == "owner").expect("owner");
    assert!(owner.read && !owner.favorite);
    s.set_favorite("t1", "bob", &last.id, false)
        .await
        .expect("unfav");
    assert!(!s
        .recipients(&last)
        .await
        .expect("r")
        .iter()
        .any(|r| r.favorite));
}

async fn membership_changes_and_listing(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["a"]).await;
    let added = s
        .add_members(
            actor("owner"),
            &ch,
            &["b".into(), "a".into(), "b".into()],
            Role::Admin,
            &enc,
        )
        .await
        .expect("add");
    assert_eq!(added.len(), 1, "existing and repeated users are skipped");
    assert_eq!(added[0].row.role(), Role::Admin);
    assert_eq!(s.owner_count(&ch).await.expect("owners"), 1);
    let first = s.list_members(&ch, None, 2).await.expect("page 1");
    assert_eq!(first.len(), 2);
    let key = first
        .last()
        .map(|m| (m.join_time, m.user_id.as_str()))
        .expect("key");
    let rest = s.list_members(&ch, Some(key), 2).await.expect("page 2");
    assert_eq!(rest.len(), 1);
    let mut all: Vec<String> = first
        .iter()
        .chain(rest.iter())
        .map(|m| m.user_id.clone())
        .collect();
    all.sort();
    assert_eq!(all, vec!["a", "b", "owner"]);
    let removed = s
        .remove_member(actor("owner"), &ch, "a", &enc)
        .await
        .expect("remove");
    assert_eq!(removed.sequence, 4);
    assert!(matches!(
        s.remove_member(actor("owner"), &ch, "a", &enc).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        s.set_role(actor("owner"), &ch, "b", Role::Owner)
            .await
            .expect("role")
            .role(),
        Role::Owner
    );
    assert_eq!(s.owner_count(&ch).await.expect("owners"), 2);
    let gone = s
        .delete_group(actor("owner"), &ch, &enc)
        .await
        .expect("delete group");
    assert_eq!(gone.len(), 2);
    assert!(matches!(
        s.channel("t1", &ch).await,
        Err(StoreError::NotFound)
    ));
    assert!(s
        .list_channels("t1", "b", None, 10)
        .await
        .expect("list")
        .is_empty());
}

/// The head check's read: every existing channel of the list, deleted or not, with its tenant
/// and last sequence; unknown ids are left out; 1,000 ids in one call.
async fn last_sequences_of_any_channels(backend: Backend) {
    let (_db, s) = open(backend).await;
    let quiet = group_with(&s, &[]).await;
    let busy = group_with(&s, &["a", "b"]).await;
    let gone = group_with(&s, &["c"]).await;
    s.delete_group(actor("owner"), &gone, &enc)
        .await
        .expect("delete group");
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut ids = vec![quiet.clone(), busy.clone(), gone.clone(), unknown];
    let mut got = s.last_sequences(&ids).await.expect("heads");
    got.sort();
    let mut want = vec![
        (quiet, "t1".to_owned(), 1),
        (busy, "t1".to_owned(), 3),
        (gone, "t1".to_owned(), 4),
    ];
    want.sort();
    assert_eq!(got, want);
    ids.extend((ids.len()..store::MAX_HEADS_PER_READ).map(|_| uuid::Uuid::now_v7().to_string()));
    assert_eq!(s.last_sequences(&ids).await.expect("1,000 ids").len(), 3);
    assert!(s.last_sequences(&[]).await.expect("none").is_empty());
}

async fn the_last_owner_stays_under_races(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["second"]).await;
    s.set_role(actor("owner"), &ch, "second", Role::Owner)
        .await
        .expect("promote");
    // Both owners leave at once: exactly one may.
    let a = {
        let s = s.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            s.remove_member(actor("owner"), &ch, "owner", &enc)
                .await
                .is_ok()
        })
    };
    let b = {
        let s = s.clone();
        let ch = ch.clone();
        tokio::spawn(async move {
            s.remove_member(actor("second"), &ch, "second", &enc)
                .await
                .is_ok()
        })
    };
    let (a, b) = (a.await.expect("a"), b.await.expect("b"));
    assert!(a ^ b, "exactly one owner left (a={a}, b={b})");
    assert_eq!(s.owner_count(&ch).await.expect("owners"), 1);
    let last = if a { "second" } else { "owner" };
    assert!(matches!(
        s.set_role(actor(last), &ch, last, Role::Member).await,
        Err(StoreError::LastOwner)
    ));
    assert!(matches!(
        s.remove_member(actor(last), &ch, last, &enc).await,
        Err(StoreError::LastOwner)
    ));
}

async fn concurrent_add_members_skip_each_other(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let s = s.clone();
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            s.add_members(
                actor("owner"),
                &ch,
                &["x".into(), "y".into()],
                Role::Member,
                &enc,
            )
            .await
            .expect("add")
            .len()
        }));
    }
    let mut added = 0;
    for t in tasks {
        added += t.await.expect("task");
    }
    assert_eq!(added, 2);
    assert_eq!(db.count("members").await, 3);
}

fn batched(user: &str, channel: &str, body: &str, key: Option<&str>) -> BatchMessage {
    BatchMessage {
        tenant_id: "t1".into(),
        user_id: user.into(),
        msg: msg(channel, body, key),
    }
}

/// The (channel, sequence, body) of a new message at `i`; its payload is the test encoder's.
fn new_message(outcomes: &[StoreResult<Inserted>], i: usize) -> (String, i64, String) {
    match &outcomes[i] {
        Ok(Inserted::New(row, payload)) => {
            assert_eq!(payload, &row.sequence.to_be_bytes().to_vec());
            (row.channel_id.clone(), row.sequence, row.body.clone())
        }
        other => panic!("{i}: {other:?}"),
    }
}

fn assert_not_found(outcomes: &[StoreResult<Inserted>], positions: &[usize]) {
    for &i in positions {
        assert!(
            matches!(outcomes[i], Err(StoreError::NotFound)),
            "{i}: {:?}",
            outcomes[i]
        );
    }
}

/// The channel's events are exactly sequences 1..=last.
async fn assert_events_gap_free(s: &Arc<dyn Store>, channel: &str, last: i64) {
    let seqs: Vec<i64> = s
        .events(channel, 0, i64::MAX, 100)
        .await
        .expect("events")
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<i64>>());
}

/// Group commit: one transaction, each message its own outcome, as one by one in batch order.
async fn group_commit_gives_each_message_its_own_outcome(backend: Backend) {
    let (db, s) = open(backend).await;
    let a = group_with(&s, &["u1", "u2"]).await; // sequences 1-3 taken by members
    let b = group_with(&s, &["u1"]).await; // 1-2
    let earlier = match s
        .insert_message(actor("u1"), msg(&a, "earlier", Some("k-old")), &enc)
        .await
        .expect("insert")
    {
        Inserted::New(row, _) => row,
        Inserted::Existing(_) => panic!("new"),
    };
    let events_before = db.count("events").await;
    let audits_before = db.count("audit_logs").await;
    let missing = uuid::Uuid::now_v7().to_string();
    let outcomes = s
        .insert_messages(
            vec![
                batched("u1", &a, "a1", None),
                batched("u2", &b, "not a member of b", None),
                batched("u1", &b, "b1", Some("k1")),
                batched("u2", &a, "a2", None),
                batched("u1", &missing, "no such channel", None),
                batched("u1", &a, "repeat of an old key", Some("k-old")),
                batched("u1", &b, "repeat within the batch", Some("k1")),
                batched("u1", &b, "b2", None),
                BatchMessage {
                    tenant_id: "other-tenant".into(),
                    ..batched("u1", &a, "another tenant", None)
                },
            ],
            &enc,
        )
        .await
        .expect("batch");
    let new = |i: usize| new_message(&outcomes, i);
    assert_eq!(new(0), (a.clone(), 5, "a1".into()));
    assert_eq!(new(3), (a.clone(), 6, "a2".into()));
    assert_eq!(new(2), (b.clone(), 3, "b1".into()));
    assert_eq!(new(7), (b.clone(), 4, "b2".into()));
    assert_not_found(&outcomes, &[1, 4, 8]);
    match &outcomes[5] {
        Ok(Inserted::Existing(row)) => assert_eq!(row.id, earlier.id),
        other => panic!("{other:?}"),
    }
    let b1_id = match &outcomes[2] {
        Ok(Inserted::New(row, _)) => row.id.clone(),
        _ => unreachable!(),
    };
    match &outcomes[6] {
        Ok(Inserted::Existing(row)) => assert_eq!(row.id, b1_id),
        other => panic!("{other:?}"),
    }
    // Refused messages took no sequence: both channels stay gap-free.
    assert_eq!(s.channel("t1", &a).await.expect("a").last_sequence, 6);
    assert_eq!(s.channel("t1", &b).await.expect("b").last_sequence, 4);
    for (ch, last) in [(&a, 6), (&b, 4)] {
        assert_events_gap_free(&s, ch, last).await;
    }
    assert_eq!(db.count("events").await, events_before + 4);
    assert_eq!(db.count("audit_logs").await, audits_before + 4);
    // An empty batch is fine.
    assert!(s
        .insert_messages(Vec::new(), &enc)
        .await
        .expect("empty")
        .is_empty());
}

/// The common case (every sender a member, no key stored before), which PostgreSQL commits in
/// one write statement: repeats within the batch, missing channels and another tenant's
/// channel still get their own outcomes, and the sequences stay gap-free.
async fn group_commit_of_members_only(backend: Backend) {
    let (db, s) = open(backend).await;
    let a = group_with(&s, &["u1", "u2"]).await; // sequences 1-3 taken by members
    let b = group_with(&s, &["u1"]).await; // 1-2
    let missing = uuid::Uuid::now_v7().to_string();
    let audits_before = db.count("audit_logs").await;
    let outcomes = s
        .insert_messages(
            vec![
                batched("u2", &a, "a1", Some("k1")),
                batched("u1", &b, "b1", None),
                batched("u2", &a, "a1 again", Some("k1")),
                batched("u1", &missing, "no such channel", None),
                batched("u1", &a, "a2", Some("k1")), // same key, another sender
                BatchMessage {
                    tenant_id: "other-tenant".into(),
                    ..batched("u1", &b, "another tenant", None)
                },
            ],
            &enc,
        )
        .await
        .expect("batch");
    let new = |i: usize| new_message(&outcomes, i);
    assert_eq!(new(0), (a.clone(), 4, "a1".into()));
    assert_eq!(new(4), (a.clone(), 5, "a2".into()));
    assert_eq!(new(1), (b.clone(), 3, "b1".into()));
    match (&outcomes[0], &outcomes[2]) {
        (Ok(Inserted::New(first, _)), Ok(Inserted::Existing(again))) => {
            assert_eq!(first.id, again.id)
        }
        other => panic!("{other:?}"),
    }
    assert_not_found(&outcomes, &[3, 5]);
    for (ch, last) in [(&a, 5), (&b, 3)] {
        assert_eq!(
            s.channel("t1", ch).await.expect("channel").last_sequence,
            last
        );
        assert_events_gap_free(&s, ch, last).await;
    }
    assert_eq!(db.count("messages").await, 3);
    assert_eq!(db.count("audit_logs").await, audits_before + 3);
    // Stored rows are what the outcomes said.
    let stored = s
        .list_messages(("t1", "u2"), &a, None, None, 10)
        .await
        .expect("history");
    let bodies: Vec<&str> = stored.iter().map(|m| m.body.as_str()).collect();
    assert!(
        bodies.contains(&"a1") && bodies.contains(&"a2"),
        "{bodies:?}"
    );
    // Next batches: on PostgreSQL the store now knows both channels' last sequences and
    // commits in one call. A membership change moves `a` on behind its back (sequence 6): the
    // call must notice, write nothing, and leave it to the longer way.
    let next = s
        .insert_messages(vec![batched("u1", &b, "b2", None)], &enc)
        .await
        .expect("batch");
    assert_eq!(new_message(&next, 0), (b.clone(), 4, "b2".into()));
    s.add_members(actor("owner"), &a, &["u3".into()], Role::Member, &enc)
        .await
        .expect("add");
    let next = s
        .insert_messages(
            vec![batched("u3", &a, "a3", None), batched("u1", &b, "b3", None)],
            &enc,
        )
        .await
        .expect("batch");
    assert_eq!(new_message(&next, 0), (a.clone(), 7, "a3".into()));
    assert_eq!(new_message(&next, 1), (b.clone(), 5, "b3".into()));
    assert_events_gap_free(&s, &a, 7).await;
    assert_events_gap_free(&s, &b, 5).await;
    assert_eq!(db.count("messages").await, 6);
    // PostgreSQL took the one call for the first two batches; the third found `a` moved on
    // and went the general way.
    let expected = match backend {
        Backend::Postgres => CommitPaths {
            one_call: 2,
            general: 1,
        },
        // MySQL has no one-call path (PostgreSQL's is a plpgsql function).
        Backend::Sqlite | Backend::Mysql => CommitPaths::default(),
    };
    assert_eq!(s.commit_paths(), expected);
}

/// Concurrent batches over the same channels, listed in different orders: no deadlock, no gap.
async fn concurrent_group_commits_interleave_without_gaps(backend: Backend) {
    let (_db, s) = open(backend).await;
    let channels: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(group_with(&s, &["u1"]).await); // sequences 1-2
        }
        v
    };
    let mut tasks = Vec::new();
    for t in 0..6 {
        let (s, channels) = (s.clone(), channels.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                let batch: Vec<BatchMessage> = (0..8)
                    .map(|k| {
                        let ch = &channels[(k + t + round) % channels.len()];
                        batched("u1", ch, &format!("{t}-{round}-{k}"), None)
                    })
                    .rev()
                    .collect();
                for o in s.insert_messages(batch, &enc).await.expect("batch") {
                    assert!(matches!(o, Ok(Inserted::New(..))), "{o:?}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mut total = 0;
    for ch in &channels {
        let last = s.channel("t1", ch).await.expect("channel").last_sequence;
        let seqs: Vec<i64> = s
            .events(ch, 0, i64::MAX, 1000)
            .await
            .expect("events")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(seqs, (1..=last).collect::<Vec<i64>>());
        total += last - 2;
    }
    assert_eq!(total, 6 * 10 * 8);
}

/// `chat_append_messages` (PostgreSQL's one-call group commit) writes a batch only when every
/// channel is at the expected last sequence and every sender is a member with no stored key;
/// otherwise it says which check failed and writes nothing.
#[tokio::test]
async fn postgres_append_function_writes_all_or_nothing() {
    let (db, s) = open(Backend::Postgres).await;
    let ch = group_with(&s, &["u1"]).await; // last sequence 2
    let schema = db.schema.clone().expect("schema");
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pg");
    let append = |sender: &'static str, key: Option<&'static str>, expected: i64, id: &str| {
        let (ch, schema, id) = (ch.clone(), schema.clone(), id.to_owned());
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(&format!(
                "SELECT {schema}.chat_append_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                 $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            ))
            .bind(vec![id.clone()])
            .bind(vec!["t1"])
            .bind(vec![ch.clone()])
            .bind(vec![sender])
            .bind(vec!["hello"])
            .bind(vec![""])
            .bind(vec![None::<String>])
            .bind(vec![key])
            .bind(vec![None::<String>])
            .bind(vec![expected + 1])
            .bind(vec![vec![1u8]])
            .bind(vec![format!("audit-{id}")])
            .bind(vec![Some("{}")])
            .bind(vec![ch.clone()])
            .bind(vec![expected + 1])
            .bind(1i64)
            .bind(vec!["t1"])
            .bind(vec![expected])
            .fetch_one(&pool)
            .await
            .expect("call")
        }
    };
    let (messages, events, audits) = (
        db.count("messages").await,
        db.count("events").await,
        db.count("audit_logs").await,
    );
    // 1: the caller's last sequence is stale; 2: a message would be refused; 0: written.
    assert_eq!(append("u1", None, 1, "m-stale").await, 1);
    assert_eq!(append("u9", None, 2, "m-stranger").await, 2, "not a member");
    assert_eq!(db.count("messages").await, messages);
    assert_eq!(db.count("events").await, events);
    assert_eq!(append("u1", Some("k1"), 2, "m-1").await, 0);
    assert_eq!(
        append("u1", Some("k1"), 3, "m-again").await,
        2,
        "key stored"
    );
    assert_eq!(
        s.channel("t1", &ch).await.expect("channel").last_sequence,
        3
    );
    assert_eq!(db.count("messages").await, messages + 1);
    assert_eq!(db.count("audit_logs").await, audits + 1);
    assert_events_gap_free(&s, &ch, 3).await;
}

/// A lone sender whose removal commits while the send waits for the channel lock is refused:
/// membership is read after the lock, in a statement of its own (a sub-select in the locking
/// UPDATE would keep PostgreSQL's snapshot from before the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_commit_sees_a_removal_that_committed_during_its_lock_wait() {
    let (db, s) = open(Backend::Postgres).await;
    let ch = group_with(&s, &["u1"]).await;
    // A first batch, so the store knows the channel's last sequence (3) and the next batch
    // takes the one-call path, whose check must also come after the lock.
    let first = s
        .insert_messages(vec![batched("u1", &ch, "before my removal", None)], &enc)
        .await
        .expect("batch");
    assert_eq!(
        new_message(&first, 0),
        (ch.clone(), 3, "before my removal".into())
    );
    let schema = db.schema.clone().expect("schema");
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pg");
    let mut remover = pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "SELECT id FROM {schema}.channels WHERE id = $1 FOR UPDATE"
    ))
    .bind(&ch)
    .execute(&mut *remover)
    .await
    .expect("lock");
    sqlx::query(&format!(
        "DELETE FROM {schema}.members WHERE channel_id = $1 AND user_id = 'u1'"
    ))
    .bind(&ch)
    .execute(&mut *remover)
    .await
    .expect("remove");
    let send = {
        let (s, ch) = (s.clone(), ch.clone());
        tokio::spawn(async move {
            s.insert_messages(vec![batched("u1", &ch, "after my removal", None)], &enc)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!send.is_finished(), "the send waits for the channel lock");
    remover.commit().await.expect("commit");
    let outcome = send.await.expect("task").expect("batch");
    assert!(
        matches!(outcome[0], Err(StoreError::NotFound)),
        "{outcome:?}"
    );
    let last = s.channel("t1", &ch).await.expect("channel").last_sequence;
    assert_eq!(last, 3, "no sequence taken");
    assert_eq!(db.count("messages").await, 1);
    // The first batch was one call; the refused one ended on the general path.
    assert_eq!(
        s.commit_paths(),
        CommitPaths {
            one_call: 1,
            general: 1
        }
    );
}

// Attachments, resumable uploads and downloads: every `AttachmentStore` method.

/// An unlinked attachment of `uploader` in `channel` (tenant t1), made `age_micros` ago, with
/// a file name of 4-byte, right-to-left and combining characters.
fn attachment_row(channel: &str, uploader: &str, age_micros: i64) -> AttachmentRow {
    let id = uuid::Uuid::now_v7().to_string();
    AttachmentRow {
        storage_key: format!("a/{id}"),
        id,
        tenant_id: "t1".into(),
        channel_id: channel.into(),
        message_id: None,
        uploader_id: uploader.into(),
        file_name: "notes 📎 שלום e\u{301}.txt".into(),
        content_type: "text/plain; charset=utf-8".into(),
        size_bytes: 3,
        sha256: "ab".repeat(32),
        create_time: store::now_micros() - age_micros,
    }
}

/// Stores an unlinked attachment of `uploader` in `channel`; returns its id.
async fn attach(s: &Arc<dyn Store>, uploader: &str, channel: &str, age_micros: i64) -> String {
    s.insert_attachment(
        actor(uploader),
        attachment_row(channel, uploader, age_micros),
    )
    .await
    .expect("insert attachment")
    .id
}

/// A resumable upload of `size` bytes by `uploader` (tenant t1), begun `age_micros` ago.
fn upload_row(channel: &str, uploader: &str, size: i64, age_micros: i64) -> UploadRow {
    UploadRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: "t1".into(),
        channel_id: channel.into(),
        uploader_id: uploader.into(),
        file_name: "photo 🌄.jpg".into(),
        content_type: "image/jpeg".into(),
        size_bytes: size,
        sha256: String::new(),
        committed_bytes: 0,
        create_time: store::now_micros() - age_micros,
    }
}

/// Records an upload with no quota to speak of; returns its id.
async fn begin_upload(s: &Arc<dyn Store>, row: UploadRow) -> String {
    let id = row.id.clone();
    let refused = s
        .create_upload(row, i64::MAX, i64::MAX)
        .await
        .expect("create upload");
    assert_eq!(refused, None);
    id
}

/// Sends a message as `user` in `channel` that links `attachments`.
async fn send_linking(
    s: &Arc<dyn Store>,
    user: &str,
    channel: &str,
    attachments: &[&str],
) -> StoreResult<MessageRow> {
    let msg = NewMessage {
        attachment_ids: attachments.iter().map(|a| a.to_string()).collect(),
        ..msg(channel, "see attached", None)
    };
    match s.insert_message(actor(user), msg, &enc).await? {
        Inserted::New(row, _) => Ok(row),
        Inserted::Existing(row) => panic!("no key, no repeat: {row:?}"),
    }
}

/// Rows as JSON, for whole-row comparisons.
fn json<T: serde::Serialize>(row: &T) -> serde_json::Value {
    serde_json::to_value(row).expect("json")
}

fn attachment_ids(rows: &[AttachmentRow]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

fn upload_ids(rows: &[UploadRow]) -> Vec<&str> {
    let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids
}

/// An attachment is found in its own tenant only, by its exact id; storing one needs the
/// uploader to be a member of the live channel; stores and deletes write an audit row each,
/// refusals write nothing.
async fn attachments_are_tenant_scoped_and_audited(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1", "u2"]).await;
    let audits = db.count("audit_logs").await;
    let want = attachment_row(&ch, "u1", 0);
    let stored = s
        .insert_attachment(actor("u1"), want.clone())
        .await
        .expect("insert");
    assert_eq!(json(&stored), json(&want));
    let read = s.attachment("t1", &want.id).await.expect("read");
    assert_eq!(json(&read), json(&want), "every field back byte for byte");
    assert_eq!(db.count("audit_logs").await, audits + 1);
    let missing = uuid::Uuid::now_v7().to_string();
    for (tenant, id) in [
        ("t2", want.id.as_str()),
        ("t1 ", want.id.as_str()),
        ("T1", want.id.as_str()),
        ("t1", missing.as_str()),
    ] {
        assert!(
            matches!(s.attachment(tenant, id).await, Err(StoreError::NotFound)),
            "{tenant:?} {id}"
        );
    }

    // Not a member (an id that differs by a trailing space is another user), or a deleted group.
    let dead = group_with(&s, &["u1"]).await;
    s.delete_group(actor("owner"), &dead, &enc)
        .await
        .expect("delete group");
    let (rows, audits) = (db.count("attachments").await, db.count("audit_logs").await);
    for (user, channel) in [("stranger", &ch), ("u1 ", &ch), ("u1", &dead)] {
        let r = s
            .insert_attachment(actor(user), attachment_row(channel, user, 0))
            .await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{user:?}: {r:?}");
    }
    assert_eq!(db.count("attachments").await, rows);
    assert_eq!(db.count("audit_logs").await, audits);

    // Deleted only within its tenant, once; the row comes back.
    let other_tenant = Actor {
        tenant_id: "t2",
        user_id: "u1",
    };
    assert!(matches!(
        s.delete_attachment(other_tenant, &want.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.attachment("t1", &want.id).await.is_ok(), "still there");
    let deleted = s
        .delete_attachment(actor("u2"), &want.id)
        .await
        .expect("delete");
    assert_eq!(json(&deleted), json(&want));
    assert!(matches!(
        s.attachment("t1", &want.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.delete_attachment(actor("u2"), &want.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(db.count("attachments").await, rows - 1);
    assert_eq!(db.count("audit_logs").await, audits + 1);
    assert_eq!(
        db.count_where(
            "audit_logs",
            "table_name = 'attachments' AND operation = 'delete' AND actor_id = 'u2'"
        )
        .await,
        1
    );
}

/// A viewer sees the attachments linked to live messages and their own unlinked ones, newest
/// first, by page, or one message's; links are made only to the sender's unlinked attachments
/// of the same channel, all of a message's or none.
async fn attachment_lists_show_linked_and_own_unlinked(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1", "u2"]).await;
    let other = group_with(&s, &["u1"]).await;
    let a1 = attach(&s, "u1", &ch, 0).await; // stays unlinked
    let a2 = attach(&s, "u2", &ch, 0).await; // stays unlinked
    let a3 = attach(&s, "u1", &ch, 0).await; // linked to m1
    let a4 = attach(&s, "u1", &ch, 0).await; // linked to m2, which is deleted
    let elsewhere = attach(&s, "u1", &other, 0).await;
    let audits = db.count("audit_logs").await;
    let m1 = send_linking(&s, "u1", &ch, &[&a3]).await.expect("link a3");
    let linked: Vec<String> = serde_json::from_str(&m1.attachment_ids).expect("json array");
    assert_eq!(linked, vec![a3.clone()]);
    assert_eq!(
        db.count("audit_logs").await,
        audits + 2,
        "the message and the link"
    );
    let m2 = send_linking(&s, "u1", &ch, &[&a4]).await.expect("link a4");
    s.delete_message(actor("u1"), &m2.id, &enc)
        .await
        .expect("delete m2");
    let counts = db.counts().await;
    for bad in [&a2, &a3, &elsewhere] {
        // Another uploader's, linked already, another channel's: the message is refused and
        // a1, linked first, stays unlinked.
        let r = send_linking(&s, "u1", &ch, &[&a1, bad]).await;
        assert!(matches!(r, Err(StoreError::Unlinkable(1))), "{bad}: {r:?}");
    }
    assert_eq!(db.counts().await, counts, "refused links write nothing");
    let got = s.attachment("t1", &a3).await.expect("a3");
    assert_eq!(got.message_id.as_deref(), Some(m1.id.as_str()));
    assert_eq!(s.attachment("t1", &a1).await.expect("a1").message_id, None);

    let list = |viewer: &'static str, message: Option<String>, before: Option<String>, limit| {
        let (s, ch) = (s.clone(), ch.clone());
        async move {
            s.list_attachments(&ch, message.as_deref(), viewer, before.as_deref(), limit)
                .await
                .expect("list")
        }
    };
    assert_eq!(
        attachment_ids(&list("u1", None, None, 10).await),
        [&a3, &a1]
    );
    assert_eq!(
        attachment_ids(&list("u2", None, None, 10).await),
        [&a3, &a2]
    );
    assert_eq!(
        attachment_ids(&list("u1 ", None, None, 10).await),
        [&a3],
        "another user's unlinked attachments stay hidden"
    );
    assert_eq!(attachment_ids(&list("u1", None, None, 1).await), [&a3]);
    assert_eq!(
        attachment_ids(&list("u1", None, Some(a3.clone()), 10).await),
        [&a1]
    );
    assert!(list("u1", None, Some(a1.clone()), 10).await.is_empty());
    assert_eq!(
        attachment_ids(&list("u2", Some(m1.id.clone()), None, 10).await),
        [&a3]
    );
    assert!(list("u1", Some(m2.id.clone()), None, 10).await.is_empty());
    assert!(list("u1", Some(m1.id.clone()), Some(a3.clone()), 10)
        .await
        .is_empty());
    let there = s
        .list_attachments(&other, None, "u1", None, 10)
        .await
        .expect("list other");
    assert_eq!(attachment_ids(&there), [&elsewhere]);
}

/// The sweep's queries find unlinked attachments past their age and every attachment of a
/// deleted group; sweeping deletes one (audited as `system:sweep`) only while it is still
/// unlinked or its group deleted.
async fn the_sweep_takes_only_what_nobody_can_reach(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1"]).await;
    let dead = group_with(&s, &["u1"]).await;
    let minute = 60_000_000;
    let old = attach(&s, "u1", &ch, 10 * minute).await;
    let fresh = attach(&s, "u1", &ch, 0).await;
    let old_linked = attach(&s, "u1", &ch, 10 * minute).await;
    send_linking(&s, "u1", &ch, &[&old_linked])
        .await
        .expect("link");
    let dead_unlinked = attach(&s, "u1", &dead, 0).await;
    let dead_linked = attach(&s, "u1", &dead, 0).await;
    send_linking(&s, "u1", &dead, &[&dead_linked])
        .await
        .expect("link");
    let cutoff = store::now_micros() - 5 * minute;
    let unlinked = s.unlinked_before(cutoff, 100).await.expect("unlinked");
    assert_eq!(attachment_ids(&unlinked), [&old]);
    assert!(s
        .attachments_of_deleted_channels(100)
        .await
        .expect("none")
        .is_empty());
    s.delete_group(actor("owner"), &dead, &enc)
        .await
        .expect("delete group");
    let mut of_deleted = s
        .attachments_of_deleted_channels(100)
        .await
        .expect("deleted");
    of_deleted.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(attachment_ids(&of_deleted), [&dead_unlinked, &dead_linked]);
    assert_eq!(
        s.attachments_of_deleted_channels(1)
            .await
            .expect("limit")
            .len(),
        1
    );
    let now = store::now_micros() + 1;
    assert_eq!(s.unlinked_before(now, 100).await.expect("all").len(), 3);
    assert_eq!(s.unlinked_before(now, 1).await.expect("limit").len(), 1);

    let audits = db.count("audit_logs").await;
    assert!(!s.sweep_attachment(&old_linked).await.expect("linked"));
    // Linked after the sweep listed it: kept.
    send_linking(&s, "u1", &ch, &[&fresh]).await.expect("link");
    assert!(!s.sweep_attachment(&fresh).await.expect("linked meanwhile"));
    assert_eq!(
        db.count("audit_logs").await,
        audits + 2,
        "the message and the link"
    );
    for id in [&old, &dead_unlinked, &dead_linked] {
        assert!(s.sweep_attachment(id).await.expect("sweep"), "{id}");
        assert!(matches!(
            s.attachment("t1", id).await,
            Err(StoreError::NotFound)
        ));
        assert!(!s.sweep_attachment(id).await.expect("again"), "once");
    }
    assert!(!s
        .sweep_attachment(&uuid::Uuid::now_v7().to_string())
        .await
        .expect("missing"));
    assert_eq!(
        db.count_where(
            "audit_logs",
            "actor_id = 'system:sweep' AND operation = 'delete'"
        )
        .await,
        3
    );
    assert_eq!(db.count("audit_logs").await, audits + 5);
    assert_eq!(
        db.count("attachments").await,
        2,
        "the two linked in the live group"
    );
    assert!(s.unlinked_before(now, 100).await.expect("left").is_empty());
    assert!(s
        .attachments_of_deleted_channels(100)
        .await
        .expect("left")
        .is_empty());
}

/// The upload quota counts one uploader's unfinished uploads (by exact tenant and user id),
/// and concurrent calls cannot pass it together: of many at once, exactly as many as fit
/// are recorded; the refused ones learn the count and bytes that stopped them.
async fn the_upload_quota_holds_under_concurrency(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1", "u2"]).await;
    // At most 5 open: 2 now, then 8 at once, of which 3 fit.
    for _ in 0..2 {
        let r = s.create_upload(upload_row(&ch, "u1", 10, 0), 5, 1000).await;
        assert_eq!(r.expect("create"), None);
    }
    let race = |user: &'static str, max_open: i64, max_bytes: i64| {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (s, ch) = (s.clone(), ch.clone());
            tasks.push(tokio::spawn(async move {
                s.create_upload(upload_row(&ch, user, 10, 0), max_open, max_bytes)
                    .await
                    .expect("create")
            }));
        }
        async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        }
    };
    let outcomes = race("u1", 5, 1000).await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_none()).count(),
        3,
        "{outcomes:?}"
    );
    for refused in outcomes.iter().flatten() {
        assert_eq!(*refused, (5, 50));
    }
    // At most 25 bytes declared: 8 at once of 10 bytes each, of which 2 fit.
    let outcomes = race("u2", 100, 25).await;
    assert_eq!(
        outcomes.iter().filter(|o| o.is_none()).count(),
        2,
        "{outcomes:?}"
    );
    for refused in outcomes.iter().flatten() {
        assert_eq!(*refused, (2, 20));
    }
    assert_eq!(db.count("uploads").await, 5 + 2);
    // Exactly at the byte limit is fine; one more byte is not.
    assert_eq!(
        s.create_upload(upload_row(&ch, "u2", 5, 0), 100, 25)
            .await
            .expect("to the limit"),
        None
    );
    assert_eq!(
        s.create_upload(upload_row(&ch, "u2", 1, 0), 100, 25)
            .await
            .expect("past it"),
        Some((3, 25))
    );
    // Other uploaders have quotas of their own: another tenant's u1, and "u1 ".
    let other_tenant = UploadRow {
        tenant_id: "t2".into(),
        ..upload_row(&ch, "u1", 10, 0)
    };
    assert_eq!(
        s.create_upload(other_tenant, 1, 10).await.expect("t2"),
        None
    );
    assert_eq!(
        s.create_upload(upload_row(&ch, "u1 ", 10, 0), 1, 10)
            .await
            .expect("u1 with a space"),
        None
    );
    // A finished upload no longer counts.
    let full = s.create_upload(upload_row(&ch, "u1", 10, 0), 5, 1000).await;
    assert_eq!(full.expect("full"), Some((5, 50)));
    let some_upload = s
        .uploads_before(store::now_micros() + 1, 100)
        .await
        .expect("uploads")
        .into_iter()
        .find(|u| u.uploader_id == "u1" && u.tenant_id == "t1")
        .expect("one of u1's");
    s.delete_upload(&some_upload.id).await.expect("delete");
    let freed = s.create_upload(upload_row(&ch, "u1", 10, 0), 5, 1000).await;
    assert_eq!(freed.expect("room again"), None);
}

/// A resumable upload: its row in its tenant only; chunks committed by compare-and-set on
/// `committed_bytes`, one winner per offset however many try at once; keys in offset order;
/// completed into an attachment once, by a member only; deleted with its chunks.
async fn resumable_uploads_commit_each_chunk_once(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1"]).await;
    let want = UploadRow {
        sha256: "cd".repeat(32),
        ..upload_row(&ch, "u1", 12, 0)
    };
    let id = begin_upload(&s, want.clone()).await;
    assert_eq!(json(&s.upload("t1", &id).await.expect("read")), json(&want));
    let missing = uuid::Uuid::now_v7().to_string();
    for (tenant, id) in [
        ("t2", id.as_str()),
        ("t1 ", id.as_str()),
        ("t1", missing.as_str()),
    ] {
        assert!(
            matches!(s.upload(tenant, id).await, Err(StoreError::NotFound)),
            "{tenant:?} {id}"
        );
    }
    // Bytes 0..9, then a retry of the same chunk and a chunk at the wrong offset: refused.
    assert!(s.commit_chunk(&id, 0, 9, "z-0").await.expect("first"));
    assert!(!s.commit_chunk(&id, 0, 9, "z-0-retry").await.expect("retry"));
    assert!(!s.commit_chunk(&id, 5, 12, "wrong").await.expect("gap"));
    assert!(!s
        .commit_chunk(&missing, 0, 1, "none")
        .await
        .expect("missing"));
    // Bytes 9..10 from six tries at once: one wins.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (s, id) = (s.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("y-9-{i}");
            s.commit_chunk(&id, 9, 10, &key)
                .await
                .expect("commit")
                .then_some(key)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.expect("task"));
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(s.commit_chunk(&id, 10, 12, "x-10").await.expect("last"));
    assert_eq!(s.upload("t1", &id).await.expect("read").committed_bytes, 12);
    // Offset order (0, 9, 10), not the keys' or the offsets' text order.
    assert_eq!(
        s.chunk_keys(&id).await.expect("keys"),
        vec!["z-0".to_owned(), winners[0].clone(), "x-10".to_owned()]
    );

    // Completing needs the uploader to be a member still; a refusal keeps the upload.
    let counts = (db.count("attachments").await, db.count("audit_logs").await);
    let attachment = AttachmentRow {
        id: id.clone(),
        storage_key: format!("a/{id}"),
        size_bytes: 12,
        sha256: want.sha256.clone(),
        ..attachment_row(&ch, "u1", 0)
    };
    let stranger = AttachmentRow {
        uploader_id: "stranger".into(),
        ..attachment.clone()
    };
    assert!(matches!(
        s.complete_upload(actor("stranger"), &id, stranger).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.upload("t1", &id).await.is_ok(), "kept");
    assert_eq!(s.chunk_keys(&id).await.expect("keys").len(), 3, "kept");
    assert_eq!(
        (db.count("attachments").await, db.count("audit_logs").await),
        counts
    );
    let done = s
        .complete_upload(actor("u1"), &id, attachment.clone())
        .await
        .expect("complete");
    assert_eq!(json(&done), json(&attachment));
    assert_eq!(
        json(&s.attachment("t1", &id).await.expect("attachment")),
        json(&attachment)
    );
    assert!(matches!(
        s.upload("t1", &id).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.chunk_keys(&id).await.expect("keys").is_empty());
    assert_eq!(db.count("audit_logs").await, counts.1 + 1);
    assert!(matches!(
        s.complete_upload(actor("u1"), &id, attachment).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(db.count("attachments").await, counts.0 + 1, "once");

    // Deleting an upload deletes its chunk records; deleting nothing is fine, and says so
    // (two nodes' sweeps count each upload once).
    let other = begin_upload(&s, upload_row(&ch, "u1", 4, 0)).await;
    assert!(s.commit_chunk(&other, 0, 2, "w-0").await.expect("chunk"));
    assert!(s.delete_upload(&other).await.expect("delete"));
    assert!(matches!(
        s.upload("t1", &other).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.chunk_keys(&other).await.expect("keys").is_empty());
    assert_eq!(db.count("upload_chunks").await, 0);
    assert!(!s.delete_upload(&other).await.expect("again"));
    assert_eq!(db.count("uploads").await, 0);
}

/// The sweep's upload queries: uploads begun before a time, and every unfinished upload of a
/// deleted group whatever its age.
async fn the_sweep_finds_stale_uploads_and_those_of_deleted_groups(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["u1"]).await;
    let dead = group_with(&s, &["u1"]).await;
    let minute = 60_000_000;
    let old = begin_upload(&s, upload_row(&ch, "u1", 1, 10 * minute)).await;
    let fresh = begin_upload(&s, upload_row(&ch, "u1", 1, 0)).await;
    let orphan = begin_upload(&s, upload_row(&dead, "u1", 1, 0)).await;
    let cutoff = store::now_micros() - 5 * minute;
    assert_eq!(
        upload_ids(&s.uploads_before(cutoff, 100).await.expect("old")),
        [&old]
    );
    assert!(s
        .uploads_of_deleted_channels(100)
        .await
        .expect("none")
        .is_empty());
    s.delete_group(actor("owner"), &dead, &enc)
        .await
        .expect("delete group");
    assert_eq!(
        upload_ids(&s.uploads_of_deleted_channels(100).await.expect("orphans")),
        [&orphan]
    );
    let now = store::now_micros() + 1;
    let mut all = vec![&old, &fresh, &orphan];
    all.sort();
    assert_eq!(
        upload_ids(&s.uploads_before(now, 100).await.expect("all")),
        all
    );
    assert_eq!(s.uploads_before(now, 2).await.expect("limit").len(), 2);
    s.delete_upload(&orphan).await.expect("sweep");
    assert!(s
        .uploads_of_deleted_channels(100)
        .await
        .expect("gone")
        .is_empty());
}

/// Download records: written when a download starts, finished with the bytes sent and whether
/// it reached the end, listed per attachment newest first, by page.
async fn download_records_are_kept_per_attachment(backend: Backend) {
    let (_db, s) = open(backend).await;
    let ch = group_with(&s, &["u1"]).await;
    let a = attach(&s, "u1", &ch, 0).await;
    let b = attach(&s, "u1", &ch, 0).await;
    let record = |attachment: &str, user: &str| DownloadRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: "t1".into(),
        attachment_id: attachment.into(),
        user_id: user.into(),
        download_time: store::now_micros(),
        bytes_sent: 0,
        completed: 0,
    };
    let rows = [
        record(&a, "u1"),
        record(&a, "ann 👩‍💻"),
        record(&b, "u1"),
        record(&a, "u1"),
    ];
    for r in &rows {
        s.insert_download(r.clone()).await.expect("insert");
    }
    let (d1, d2, other, d3) = (&rows[0], &rows[1], &rows[2], &rows[3]);
    s.finish_download(&d2.id, 123, true).await.expect("finish");
    s.finish_download(&d1.id, 5, false).await.expect("finish");
    s.finish_download(&uuid::Uuid::now_v7().to_string(), 1, true)
        .await
        .expect("no such record: nothing to do");
    let fields = |rows: Vec<DownloadRow>| -> Vec<(String, String, String, String, i64, i64, i64)> {
        rows.into_iter()
            .map(|r| {
                (
                    r.id,
                    r.tenant_id,
                    r.attachment_id,
                    r.user_id,
                    r.download_time,
                    r.bytes_sent,
                    r.completed,
                )
            })
            .collect()
    };
    let want = |r: &DownloadRow, bytes_sent: i64, completed: i64| {
        (
            r.id.clone(),
            r.tenant_id.clone(),
            r.attachment_id.clone(),
            r.user_id.clone(),
            r.download_time,
            bytes_sent,
            completed,
        )
    };
    assert_eq!(
        fields(s.list_downloads(&a, None, 10).await.expect("list")),
        vec![want(d3, 0, 0), want(d2, 123, 1), want(d1, 5, 0)]
    );
    assert_eq!(
        fields(s.list_downloads(&a, None, 1).await.expect("page 1")),
        vec![want(d3, 0, 0)]
    );
    assert_eq!(
        fields(
            s.list_downloads(&a, Some(&d3.id), 10)
                .await
                .expect("page 2")
        ),
        vec![want(d2, 123, 1), want(d1, 5, 0)]
    );
    assert!(s
        .list_downloads(&a, Some(&d1.id), 10)
        .await
        .expect("past the end")
        .is_empty());
    assert_eq!(
        fields(s.list_downloads(&b, None, 10).await.expect("other")),
        vec![want(other, 0, 0)]
    );
}

/// Tenant ids, user ids and client_message_ids are compared exactly: ids that differ only by
/// a trailing space or by case are different tenants, users and keys.
async fn ids_compare_exactly(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["bob", "bob ", "Bob"]).await;
    assert_eq!(db.count("members").await, 4, "owner and three users");
    for user in ["bob", "bob ", "Bob"] {
        let m = s
            .member("t1", &ch, user)
            .await
            .expect("member")
            .expect(user);
        assert_eq!(m.user_id, user);
    }
    assert!(s
        .member("t1", &ch, "bob  ")
        .await
        .expect("member")
        .is_none());
    assert!(matches!(
        s.channel("t1 ", &ch).await,
        Err(StoreError::NotFound)
    ));
    assert!(s.memberships("t1 ", "bob").await.expect("none").is_empty());
    let mut ids = Vec::new();
    for (user, key) in [("bob", "k"), ("bob ", "k"), ("bob", "k "), ("bob", "K")] {
        match s
            .insert_message(actor(user), msg(&ch, "hi", Some(key)), &enc)
            .await
            .expect("insert")
        {
            Inserted::New(row, _) => {
                assert_eq!(
                    (row.sender_id.as_str(), row.client_message_id.as_deref()),
                    (user, Some(key))
                );
                ids.push(row.id);
            }
            Inserted::Existing(row) => panic!("{user:?} {key:?} is new, not {row:?}"),
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    // Direct channels of pairs that differ by a space are different channels.
    let (a, _) = s
        .direct_channel(actor("ann"), "bob", &enc)
        .await
        .expect("direct");
    let (b, _) = s
        .direct_channel(actor("ann"), "bob ", &enc)
        .await
        .expect("direct");
    assert_ne!(a.id, b.id);
    let found = s
        .find_direct_channel(actor("bob "), "ann")
        .await
        .expect("find")
        .expect("exists");
    assert_eq!(found.id, b.id);
}

/// The largest values the service accepts (src/domain/validate.rs, src/auth.rs) are stored
/// whole and come back byte for byte: 255-byte tenant and user ids, the direct channel of two
/// such users, names, descriptions, labels, subjects and file names at their limits in 4-byte
/// and combining characters, a 100-byte client_message_id, and a 32 KiB body of control
/// characters, whose audit JSON (each byte escaped as `\u00XX`) is six times as long.
async fn the_largest_accepted_values_are_stored_whole(backend: Backend) {
    use chat_service::auth::MAX_CLAIM_ID_BYTES;
    use chat_service::domain::validate::{
        MAX_BODY_BYTES, MAX_CHANNEL_TYPE_CHARS, MAX_CLIENT_MESSAGE_ID_BYTES,
        MAX_CONTENT_TYPE_BYTES, MAX_DESCRIPTION_CHARS, MAX_FILE_NAME_CHARS, MAX_NAME_CHARS,
        MAX_SUBJECT_CHARS, MAX_USER_ID_BYTES,
    };
    let (db, s) = open(backend).await;
    let long_id = |c: &str, last: &str, bytes: usize| {
        let id = c.repeat(bytes - last.len()) + last;
        assert_eq!(id.len(), bytes);
        id
    };
    let tenant = long_id("t", "ש", MAX_CLAIM_ID_BYTES);
    let owner = long_id("o", "😀", MAX_USER_ID_BYTES);
    let peer = long_id("p", "é", MAX_USER_ID_BYTES);
    let me = Actor {
        tenant_id: &tenant,
        user_id: &owner,
    };
    let id = uuid::Uuid::now_v7().to_string();
    let group = ChannelRow {
        tenant_id: tenant.clone(),
        name: "😀".repeat(MAX_NAME_CHARS),
        description: "🇮🇱".repeat(MAX_DESCRIPTION_CHARS / 2),
        channel_type: "e\u{301}".repeat(MAX_CHANNEL_TYPE_CHARS / 2),
        ..new_group(&id)
    };
    s.create_group(me, group.clone(), std::slice::from_ref(&peer), &enc)
        .await
        .expect("group");
    let got = s.channel(&tenant, &id).await.expect("channel");
    assert_eq!(
        (
            &got.tenant_id,
            &got.name,
            &got.description,
            &got.channel_type
        ),
        (
            &group.tenant_id,
            &group.name,
            &group.description,
            &group.channel_type
        )
    );
    assert_eq!(
        s.member(&tenant, &id, &peer)
            .await
            .expect("member")
            .expect("peer")
            .user_id,
        peer
    );
    let (direct, _) = s.direct_channel(me, &peer, &enc).await.expect("direct");
    let key = store::direct_key(&tenant, &owner, &peer);
    assert_eq!(key.len(), 3 * MAX_USER_ID_BYTES + 2);
    assert_eq!(direct.direct_key.as_deref(), Some(key.as_str()));
    let back = Actor {
        tenant_id: &tenant,
        user_id: &peer,
    };
    let found = s
        .find_direct_channel(back, &owner)
        .await
        .expect("find")
        .expect("exists");
    assert_eq!(found.id, direct.id);

    let audits = db.count("audit_logs").await;
    let body = "\u{1}".repeat(MAX_BODY_BYTES);
    let client_key = "k".repeat(MAX_CLIENT_MESSAGE_ID_BYTES - 4) + "😀";
    let new = NewMessage {
        subject: "😀".repeat(MAX_SUBJECT_CHARS),
        ..msg(&direct.id, &body, Some(client_key.as_str()))
    };
    let row = match s
        .insert_message(me, new.clone(), &enc)
        .await
        .expect("insert")
    {
        Inserted::New(row, _) => row,
        Inserted::Existing(row) => panic!("new, not {row:?}"),
    };
    let stored = s.message(&tenant, &row.id).await.expect("message");
    assert_eq!(json(&stored), json(&row));
    assert_eq!(stored.body, body);
    assert_eq!(stored.subject, new.subject);
    assert_eq!(
        stored.client_message_id.as_deref(),
        Some(client_key.as_str())
    );
    assert_eq!(stored.sender_id, owner);
    match s.insert_message(me, new, &enc).await.expect("again") {
        Inserted::Existing(again) => assert_eq!(again.id, row.id),
        Inserted::New(..) => panic!("the long key was matched"),
    }
    // An edit writes both long versions into one audit row.
    let edited_body = "\u{1f}".repeat(MAX_BODY_BYTES);
    let patch = MessagePatch {
        body: Some(edited_body.clone()),
        ..Default::default()
    };
    let edited = s
        .update_message(me, &row.id, patch, &enc)
        .await
        .expect("edit");
    assert_eq!(edited.row.body, edited_body);
    let page = s
        .list_messages((&tenant, &peer), &direct.id, None, None, 10)
        .await
        .expect("history");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].body, edited_body);
    assert_eq!(db.count("audit_logs").await, audits + 2);

    // Attachments, uploads and downloads with the longest names and ids.
    let attachment = AttachmentRow {
        tenant_id: tenant.clone(),
        uploader_id: owner.clone(),
        file_name: "😀".repeat(MAX_FILE_NAME_CHARS),
        content_type: "a".repeat(MAX_CONTENT_TYPE_BYTES),
        ..attachment_row(&direct.id, &owner, 0)
    };
    s.insert_attachment(me, attachment.clone())
        .await
        .expect("attachment");
    assert_eq!(
        json(&s.attachment(&tenant, &attachment.id).await.expect("read")),
        json(&attachment)
    );
    let upload = UploadRow {
        tenant_id: tenant.clone(),
        file_name: attachment.file_name.clone(),
        content_type: attachment.content_type.clone(),
        ..upload_row(&direct.id, &owner, 1, 0)
    };
    assert_eq!(
        s.create_upload(upload.clone(), 1, 1).await.expect("upload"),
        None
    );
    assert_eq!(
        json(&s.upload(&tenant, &upload.id).await.expect("read")),
        json(&upload)
    );
    let download = DownloadRow {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: tenant.clone(),
        attachment_id: attachment.id.clone(),
        user_id: peer.clone(),
        download_time: store::now_micros(),
        bytes_sent: 0,
        completed: 0,
    };
    s.insert_download(download).await.expect("download");
    let listed = s
        .list_downloads(&attachment.id, None, 10)
        .await
        .expect("downloads");
    assert_eq!(
        (listed[0].tenant_id.as_str(), listed[0].user_id.as_str()),
        (tenant.as_str(), peer.as_str())
    );
}

on_every_backend!(
    group_commit_gives_each_message_its_own_outcome,
    group_commit_of_members_only,
    concurrent_group_commits_interleave_without_gaps,
    sequences_are_gap_free_under_concurrency,
    idempotent_insert_races_give_one_message,
    direct_channel_races_give_one_channel,
    tenancy_is_enforced_by_every_lookup,
    non_member_insert_writes_nothing,
    edits_check_versions_and_write_events_and_audit,
    read_markers_favorites_and_unread,
    encoded_history_equals_the_converted_rows,
    membership_changes_and_listing,
    last_sequences_of_any_channels,
    the_last_owner_stays_under_races,
    concurrent_add_members_skip_each_other,
    attachments_are_tenant_scoped_and_audited,
    attachment_lists_show_linked_and_own_unlinked,
    the_sweep_takes_only_what_nobody_can_reach,
    the_upload_quota_holds_under_concurrency,
    resumable_uploads_commit_each_chunk_once,
    the_sweep_finds_stale_uploads_and_those_of_deleted_groups,
    download_records_are_kept_per_attachment,
    ids_compare_exactly,
    the_largest_accepted_values_are_stored_whole,
);

/// Upgrading a SQLite database made before migration 0003 (which rebuilds `events` clustered on
/// its key and makes two message indexes partial) keeps every stored event byte for byte, in
/// order, and the upgraded store goes on appending after them.
#[tokio::test]
async fn sqlite_upgrade_keeps_every_event() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
    use std::str::FromStr;

    let db = TestDb::new(Backend::Sqlite).await;
    // The migrations before 0003, as an older release shipped them.
    let old = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir("migrations/sqlite").expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.as_str() < "0003" {
            std::fs::copy(&path, old.path().join(&name)).expect("copy");
        }
    }
    let options = SqliteConnectOptions::from_str(&db.url)
        .expect("url")
        .create_if_missing(true);
    let pool = SqlitePool::connect_with(options).await.expect("sqlite");
    sqlx::migrate::Migrator::new(old.path())
        .await
        .expect("old migrations")
        .run(&pool)
        .await
        .expect("run old migrations");
    let payload = |ch: &str, seq: i64| format!("{ch}/{seq}").into_bytes();
    for ch in ["c1", "c2"] {
        for seq in 1..=300 {
            sqlx::query("INSERT INTO events (channel_id, sequence, payload) VALUES ($1, $2, $3)")
                .bind(ch)
                .bind(seq)
                .bind(payload(ch, seq))
                .execute(&pool)
                .await
                .expect("old event");
        }
    }
    pool.close().await;

    let s = store::connect(&db.url, None, true).await.expect("upgrade");
    for ch in ["c1", "c2"] {
        let rows = s.events(ch, 0, i64::MAX, 1000).await.expect("events");
        let got: Vec<(i64, Vec<u8>)> = rows.into_iter().map(|r| (r.sequence, r.payload)).collect();
        let want: Vec<(i64, Vec<u8>)> = (1..=300).map(|seq| (seq, payload(ch, seq))).collect();
        assert_eq!(got, want, "{ch}");
    }
    // New writes land after the old ones, in the rebuilt table.
    let ch = group_with(&s, &["u1"]).await;
    s.insert_message(actor("u1"), msg(&ch, "after the upgrade", None), &enc)
        .await
        .expect("send");
    assert_events_gap_free(&s, &ch, 3).await;
    assert_eq!(db.count("events").await, 603);
}

/// A SQLite batch that fails after its BEGIN (here an INSERT refused by a trigger) writes
/// nothing: the transaction, run by hand so BEGIN and COMMIT share commands with other
/// statements, is rolled back by closing its connection; the next batch gets a fresh one and
/// takes the sequences the failed batch did not keep.
#[tokio::test]
async fn sqlite_failed_batch_writes_nothing_and_the_next_one_commits() {
    let (db, s) = open(Backend::Sqlite).await;
    let ch = group_with(&s, &["u1"]).await; // sequences 1-2
    let pool = sqlx::SqlitePool::connect(&db.url).await.expect("sqlite");
    sqlx::query(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON audit_logs \
         WHEN NEW.after_json LIKE '%boom%' BEGIN SELECT RAISE(ABORT, 'boom'); END",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    pool.close().await;
    let counts = db.counts().await;
    let failed = s
        .insert_messages(
            vec![
                batched("u1", &ch, "fine", None),
                batched("u1", &ch, "boom", None),
            ],
            &enc,
        )
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(db.counts().await, counts, "nothing written");
    assert_eq!(
        s.channel("t1", &ch).await.expect("channel").last_sequence,
        2
    );
    let outcomes = s
        .insert_messages(
            vec![
                batched("u1", &ch, "after 1", None),
                batched("u1", &ch, "after 2", None),
            ],
            &enc,
        )
        .await
        .expect("next batch");
    assert_eq!(new_message(&outcomes, 0), (ch.clone(), 3, "after 1".into()));
    assert_eq!(new_message(&outcomes, 1), (ch.clone(), 4, "after 2".into()));
    assert_events_gap_free(&s, &ch, 4).await;
}

/// Asserts that the page `list_messages_encoded` writes straight from the rows is byte for
/// byte what prost makes of `list_messages`' rows converted, and that a response carrying it
/// decodes to the converted messages.
async fn assert_encoded_page(
    s: &Arc<dyn Store>,
    viewer: (&str, &str),
    channel: &str,
    parent: Option<&str>,
    before: Option<i64>,
    limit: i64,
) {
    use chat_service::domain::convert::into_message;
    use chat_service::page::EncodedMessages;
    use chat_service::proto;
    use prost::Message as _;

    let case = format!("{parent:?} {before:?} {limit}");
    let got: EncodedMessages = s
        .list_messages_encoded(
            viewer,
            channel,
            parent,
            before,
            limit,
            chat_service::page::write_message,
        )
        .await
        .expect("encoded")
        .into();
    let rows = s
        .list_messages(viewer, channel, parent, before, limit)
        .await
        .expect("rows");
    let messages: Vec<proto::Message> = rows.into_iter().map(into_message).collect();
    let mut want = EncodedMessages::default();
    for m in &messages {
        want.push(m);
    }
    assert_eq!(got.as_bytes(), want.as_bytes(), "{case}");
    assert_eq!(got.len(), messages.len(), "{case}");
    assert_eq!(got.last_sequence(), messages.last().map(|m| m.sequence));
    let response = proto::ListMessagesResponse {
        encoded_messages: got,
        next_page_token: "token".into(),
        ..Default::default()
    };
    let bytes = response.encode_to_vec();
    assert_eq!(response.encoded_len(), bytes.len());
    let decoded = proto::ListMessagesResponse::decode(bytes.as_slice()).expect("decode");
    assert_eq!(decoded.messages, messages, "{case}");
    assert_eq!(decoded.next_page_token, "token");
}

/// History pages written in wire form straight from the rows are byte for byte what prost
/// makes of the converted rows, for every kind of message (scripts and emoji, subject, reply,
/// key, forward, edit, attachment ids with escapes and empty ones, unparsable attachment
/// text), whole pages and cut ones, threads and continuation.
async fn encoded_history_equals_the_converted_rows(backend: Backend) {
    let (db, s) = open(backend).await;
    let ch = group_with(&s, &["u1", "u2"]).await;
    let mut ids: Vec<String> = Vec::new();
    for (i, body) in ["שלום 👋🏽", "e\u{301}t\u{e9} 日本語", "", "x"]
        .iter()
        .enumerate()
    {
        let mut m = msg(&ch, body, (i == 1).then_some("key-1"));
        if i == 0 {
            m.subject = "topic ✓".into();
        }
        if i >= 2 {
            m.parent_message_id = Some(ids[0].clone());
        }
        if i == 3 {
            m.forwarded_from_message_id = Some(ids[1].clone());
        }
        match s.insert_message(actor("u1"), m, &enc).await.expect("send") {
            Inserted::New(row, _) => ids.push(row.id),
            other => panic!("{other:?}"),
        }
    }
    s.update_message(
        actor("u1"),
        &ids[1],
        MessagePatch {
            body: Some("edited".into()),
            ..Default::default()
        },
        &enc,
    )
    .await
    .expect("edit");
    db.execute(&format!(
        r#"UPDATE messages SET attachment_ids = '["a\u00e9", "", "x"]' WHERE id = '{}';
           UPDATE messages SET attachment_ids = 'not json' WHERE id = '{}'"#,
        ids[0], ids[2]
    ))
    .await;
    let last = s.channel("t1", &ch).await.expect("channel").last_sequence;
    for (parent, before, limit) in [
        (None, None, 50),
        (None, None, 2),
        (None, Some(last - 1), 2),
        (Some(ids[0].as_str()), None, 10),
        (Some(ids[0].as_str()), None, 1),
    ] {
        assert_encoded_page(&s, ("t1", "u2"), &ch, parent, before, limit).await;
    }
    let page = s
        .list_messages(("t1", "u2"), &ch, None, None, 50)
        .await
        .expect("rows");
    assert_eq!(page.len(), 4);
    let attachments = |id: &str| {
        page.iter()
            .find(|m| m.id == id)
            .map(|m| chat_service::domain::convert::into_message(m.clone()).attachment_ids)
            .expect("listed")
    };
    assert_eq!(attachments(&ids[0]), ["a\u{e9}", "", "x"]);
    assert!(attachments(&ids[2]).is_empty());
    // A non-member gets an empty page.
    let none = s
        .list_messages_encoded(
            ("t1", "u9"),
            &ch,
            None,
            None,
            10,
            chat_service::page::write_message,
        )
        .await
        .expect("non-member");
    assert!(none.is_empty());
}

/// History pages on SQLite go through the store's own read-only connections to the file,
/// except for an in-memory database, which only sqlx's connections share: there they must
/// still come back, whole pages, threads and keyset continuation alike.
#[tokio::test]
async fn sqlite_in_memory_database_serves_history() {
    let s = store::connect("sqlite::memory:", None, true)
        .await
        .expect("connect");
    let ch = group_with(&s, &["u1", "u2"]).await;
    let batch = (0..5)
        .map(|i| batched("u1", &ch, &format!("m{i}"), None))
        .collect();
    let outcomes = s.insert_messages(batch, &enc).await.expect("batch");
    let root = match &outcomes[0] {
        Ok(Inserted::New(row, _)) => row.clone(),
        other => panic!("{other:?}"),
    };
    let page = s
        .list_messages(("t1", "u2"), &ch, None, None, 3)
        .await
        .expect("history");
    let bodies: Vec<&str> = page.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["m4", "m3", "m2"]);
    let rest = s
        .list_messages(("t1", "u2"), &ch, None, Some(page[2].sequence), 10)
        .await
        .expect("next page");
    let bodies: Vec<&str> = rest.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["m1", "m0"]);
    let mut reply = batched("u2", &ch, "reply", None);
    reply.msg.parent_message_id = Some(root.id.clone());
    s.insert_messages(vec![reply], &enc).await.expect("reply");
    let thread = s
        .list_messages(("t1", "u1"), &ch, Some(&root.id), None, 10)
        .await
        .expect("thread");
    assert_eq!(thread.len(), 1);
    assert_eq!(thread[0].body, "reply");
    // A non-member sees nothing.
    let none = s
        .list_messages(("t1", "u9"), &ch, None, None, 10)
        .await
        .expect("non-member");
    assert!(none.is_empty());
    // Pages in wire form come through sqlx here.
    assert_encoded_page(&s, ("t1", "u2"), &ch, None, None, 3).await;
    assert_encoded_page(&s, ("t1", "u1"), &ch, Some(&root.id), None, 10).await;
}

/// Storage trouble is `StoreError::Unavailable` (answered UNAVAILABLE, retryable), never
/// `Internal` (a bug), from real errors of each database: SQLite's full database
/// (SQLITE_FULL, 13; `max_page_count` stands in for a full disk) and its extended I/O codes
/// (778 = SQLITE_IOERR_WRITE); PostgreSQL's too many connections (53300, a role with a
/// connection limit of 0), a connection terminated under a session (57P01), a read-only
/// transaction (25006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_are_unavailable() {
    let unavailable = |e: sqlx::Error, what: &str| match StoreError::from(e) {
        StoreError::Unavailable(_) => {}
        other => panic!("{what}: {other:?}"),
    };
    // SQLite: a database that cannot grow.
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("full.db"))
        .create_if_missing(true)
        .pragma("max_page_count", "8");
    let pool = sqlx::SqlitePool::connect_with(opts).await.expect("sqlite");
    sqlx::query("CREATE TABLE t (b BLOB)")
        .execute(&pool)
        .await
        .expect("create");
    let full = sqlx::query("INSERT INTO t VALUES (zeroblob(1000000))")
        .execute(&pool)
        .await
        .expect_err("the database is full");
    unavailable(full, "SQLITE_FULL");
    for code in [5, 6, 8, 10, 13, 14, 778, 266, 522, 1034] {
        assert!(store::sqlite_unavailable(code), "SQLite code {code}");
    }
    for code in [1, 11, 19, 2067, 787] {
        assert!(
            !store::sqlite_unavailable(code),
            "SQLite code {code} is a bug"
        );
    }
    // PostgreSQL.
    let url = postgres_url();
    let admin = sqlx::PgPool::connect(&url).await.expect("postgres");
    let role = format!("r_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .execute(&admin)
        .await
        .expect("create role");
    let base = url.rsplit_once('@').map(|(_, host)| host).expect("url");
    // One connection, not a pool (which would retry until its acquire timeout).
    let refused =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("postgres://{role}@{base}"))
            .await;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&admin)
        .await
        .expect("drop role");
    unavailable(refused.expect_err("connection limit 0"), "53300");

    let mut conn = admin.acquire().await.expect("conn");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .expect("pid");
    sqlx::query("SET default_transaction_read_only = on")
        .execute(&mut *conn)
        .await
        .expect("read only");
    let ro = sqlx::query("CREATE TEMP TABLE t (i int)")
        .execute(&mut *conn)
        .await
        .expect_err("read-only transaction");
    unavailable(ro, "25006");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&admin)
        .await
        .expect("terminate");
    let gone = sqlx::query("SELECT 1")
        .execute(&mut *conn)
        .await
        .expect_err("terminated");
    unavailable(gone, "terminated connection");
    for s in [
        "08006", "53100", "53300", "58030", "57P01", "57P03", "25006", "40001", "40P01",
    ] {
        assert!(store::postgres_unavailable(s), "SQLSTATE {s}");
    }
    for s in ["23505", "42P01", "22001", "XX000"] {
        assert!(!store::postgres_unavailable(s), "SQLSTATE {s} is a bug");
    }
}

/// The MySQL migrations make PostgreSQL's tables and columns (and `upload_locks`, which the
/// MySQL store locks for the upload quota) as InnoDB tables whose text is utf8mb4 in the binary
/// collation. The largest accepted values fit whole, and identities (user and tenant ids,
/// direct keys) compare byte for byte: utf8mb4_bin alone would take 'bob ' for 'bob'.
#[tokio::test]
async fn mysql_migrations_make_the_postgres_schema_byte_exact() {
    use sqlx::Connection;
    let db = TestDb::new(Backend::Mysql).await;
    let mut c = sqlx::MySqlConnection::connect(&db.url)
        .await
        .expect("mysql");
    sqlx::migrate!("migrations/mysql")
        .run(&mut c)
        .await
        .expect("migrations");
    let tables: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT TABLE_NAME, ENGINE, TABLE_COLLATION FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> '_sqlx_migrations'",
    )
    .fetch_all(&mut c)
    .await
    .expect("tables");
    assert_eq!(tables.len(), 11, "{tables:?}");
    for (table, engine, collation) in &tables {
        assert_eq!(
            (engine.as_str(), collation.as_str()),
            ("InnoDB", "utf8mb4_bin"),
            "{table}"
        );
    }
    let columns: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME, COLLATION_NAME \
         FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> '_sqlx_migrations'",
    )
    .fetch_all(&mut c)
    .await
    .expect("columns");
    for (table, column, charset, collation) in &columns {
        if charset.is_some() {
            assert_eq!(
                (charset.as_deref(), collation.as_deref()),
                (Some("utf8mb4"), Some("utf8mb4_bin")),
                "{table}.{column}"
            );
        }
    }
    let mut mysql: Vec<(String, String)> = columns
        .into_iter()
        .filter(|(table, ..)| table != "upload_locks")
        .map(|(table, column, ..)| (table, column))
        .collect();
    mysql.sort();

    // The same tables and columns as PostgreSQL's.
    let pg = TestDb::new(Backend::Postgres).await;
    let schema = pg.schema.clone().expect("schema");
    store::connect(&pg.url, Some(&schema), true)
        .await
        .expect("postgres migrations")
        .close()
        .await;
    let pool = sqlx::PgPool::connect(&pg.url).await.expect("pg");
    let mut postgres: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name <> '_sqlx_migrations'",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .expect("pg columns");
    pool.close().await;
    postgres.sort();
    assert_eq!(mysql, postgres);

    // The largest accepted values, whole, with the strictness the store must run with.
    sqlx::query("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')")
        .execute(&mut c)
        .await
        .expect("strict");
    let ch = uuid::Uuid::now_v7().to_string();
    let tenant = "t".repeat(253) + "ש";
    let user = "u".repeat(251) + "😀";
    let direct_key = format!("{tenant}\n{user}\n{user}");
    let (name, description, label) = ("😀".repeat(100), "🇮🇱".repeat(500), "e\u{301}".repeat(50));
    sqlx::query(
        "INSERT INTO channels (id, tenant_id, kind, name, description, channel_type, \
         direct_key, create_time, update_time) VALUES (?, ?, 'direct', ?, ?, ?, ?, 1, 1)",
    )
    .bind(&ch)
    .bind(&tenant)
    .bind(&name)
    .bind(&description)
    .bind(&label)
    .bind(&direct_key)
    .execute(&mut c)
    .await
    .expect("channel");
    let body = "\u{1}".repeat(32 * 1024);
    let subject = "😀".repeat(200);
    let key = "k".repeat(96) + "😀";
    let message = uuid::Uuid::now_v7().to_string();
    let attachment_ids = serde_json::to_string(
        &(0..32)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect::<Vec<_>>(),
    )
    .expect("json");
    sqlx::query(
        "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
         attachment_ids, client_message_id, sequence, create_time) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 1)",
    )
    .bind(&message)
    .bind(&tenant)
    .bind(&ch)
    .bind(&user)
    .bind(&body)
    .bind(&subject)
    .bind(&attachment_ids)
    .bind(&key)
    .execute(&mut c)
    .await
    .expect("message");
    let audit_json = serde_json::json!({ "body": body, "subject": subject }).to_string();
    assert!(audit_json.len() > 6 * 32 * 1024, "{}", audit_json.len());
    sqlx::query(
        "INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, actor_id, \
         before_json, after_json, create_time) VALUES (?, ?, 'update', 'members', ?, ?, ?, ?, 1)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&tenant)
    .bind(format!("{ch}/{user}"))
    .bind(&user)
    .bind(&audit_json)
    .bind(&audit_json)
    .execute(&mut c)
    .await
    .expect("audit");
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    sqlx::query("INSERT INTO events (channel_id, sequence, payload) VALUES (?, 1, ?)")
        .bind(&ch)
        .bind(&payload)
        .execute(&mut c)
        .await
        .expect("event");
    let file_name = "😀".repeat(255);
    let content_type = "a".repeat(255);
    sqlx::query(
        "INSERT INTO attachments (id, tenant_id, channel_id, uploader_id, file_name, \
         content_type, size_bytes, sha256, storage_key, create_time) \
         VALUES (?, ?, ?, ?, ?, ?, 1, ?, 'a/x', 1)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&tenant)
    .bind(&ch)
    .bind(&user)
    .bind(&file_name)
    .bind(&content_type)
    .bind("ab".repeat(32))
    .execute(&mut c)
    .await
    .expect("attachment");
    // Read back as bytes (sqlx takes binary-collated text for bytes).
    for (sql, want) in [
        ("SELECT tenant_id FROM channels", tenant.as_bytes()),
        ("SELECT name FROM channels", name.as_bytes()),
        ("SELECT description FROM channels", description.as_bytes()),
        ("SELECT channel_type FROM channels", label.as_bytes()),
        ("SELECT direct_key FROM channels", direct_key.as_bytes()),
        ("SELECT sender_id FROM messages", user.as_bytes()),
        ("SELECT body FROM messages", body.as_bytes()),
        ("SELECT subject FROM messages", subject.as_bytes()),
        (
            "SELECT attachment_ids FROM messages",
            attachment_ids.as_bytes(),
        ),
        ("SELECT client_message_id FROM messages", key.as_bytes()),
        ("SELECT after_json FROM audit_logs", audit_json.as_bytes()),
        ("SELECT payload FROM events", &payload),
        ("SELECT file_name FROM attachments", file_name.as_bytes()),
        (
            "SELECT content_type FROM attachments",
            content_type.as_bytes(),
        ),
    ] {
        let got: Vec<u8> = sqlx::query_scalar(sql).fetch_one(&mut c).await.expect(sql);
        assert!(got == want, "{sql}: not the bytes stored");
    }

    // Identities that differ by a trailing space are different rows.
    for member in ["bob", "bob "] {
        sqlx::query(
            "INSERT INTO members (channel_id, tenant_id, user_id, role, join_time, \
             join_sequence) VALUES (?, 't1', ?, 'member', 1, 1)",
        )
        .bind(&ch)
        .bind(member)
        .execute(&mut c)
        .await
        .expect(member);
    }
    for pair in ["t1\nann\nbob", "t1\nann\nbob "] {
        sqlx::query(
            "INSERT INTO channels (id, tenant_id, kind, direct_key, create_time, update_time) \
             VALUES (?, 't1', 'direct', ?, 1, 1)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(pair)
        .execute(&mut c)
        .await
        .expect(pair);
    }
    for (sql, arg, want) in [
        ("SELECT COUNT(*) FROM members WHERE user_id = ?", "bob", 1),
        ("SELECT COUNT(*) FROM members WHERE user_id = ?", "bob  ", 0),
        (
            "SELECT COUNT(*) FROM channels WHERE tenant_id = ?",
            "t1 ",
            0,
        ),
        (
            "SELECT COUNT(*) FROM channels WHERE direct_key = ?",
            "t1\nann\nbob",
            1,
        ),
        (
            "SELECT COUNT(*) FROM upload_locks WHERE uploader_id = ?",
            "x",
            0,
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sql)
            .bind(arg)
            .fetch_one(&mut c)
            .await
            .expect(sql);
        assert_eq!(n, want, "{sql} {arg:?}");
    }
    c.close().await.expect("close");
}
