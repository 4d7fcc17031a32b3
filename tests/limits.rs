//! Limits that protect the service from one client (README "Limits"), on every backend: each
//! call past a limit gets RESOURCE_EXHAUSTED (with `google.rpc.RetryInfo` for rates) and
//! changes nothing, another user's calls meanwhile succeed, and memory stays bounded when a
//! client opens streams without end. Also the unary deadline and HTTP/2 concurrent streams.

mod common;

use std::time::Duration;

use chat_service::cli::Bearer;
use chat_service::limits::LimitSettings;
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::upload_attachment_request::Data;
use chat_service::proto::{self};
use chat_service::server::ServeOptions;
use common::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Guards against a hang, not a speed assertion.
const WAIT: Duration = Duration::from_secs(20);

type Files = AttachmentServiceClient<InterceptedService<Channel, Bearer>>;

async fn files(server: &TestServer, user: &str) -> Files {
    AttachmentServiceClient::with_interceptor(
        server.channel().await,
        Bearer::new(&token(user)).expect("bearer"),
    )
}

async fn start(backend: Backend, limits: LimitSettings) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            limits,
            ..Default::default()
        },
    )
    .await
}

fn exhausted(s: &Status, what: &str) {
    assert_eq!(s.code(), Code::ResourceExhausted, "{what}: {s:?}");
}

/// The RetryInfo delay of a status, if it has one.
fn retry_after(s: &Status) -> Option<Duration> {
    s.get_details_retry_info().and_then(|r| r.retry_delay)
}

fn to(channel: &str, body: &str) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        channel_id: channel.into(),
        body: body.into(),
        ..Default::default()
    }
}

/// Sends past the per-user rate are RESOURCE_EXHAUSTED with RetryInfo and store nothing; the
/// other user sends meanwhile; other writes have a bucket of their own. The buckets refill one
/// token per 1,000 s here, so nothing refills during the test however slow the machine.
async fn send_and_write_rates(backend: Backend) {
    let server = start(
        backend,
        LimitSettings {
            sends_per_second: 0.001,
            sends_burst: 5,
            writes_per_second: 0.001,
            // CreateGroup takes one.
            writes_burst: 3,
            ..LimitSettings::unlimited()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let mut bob = server.chat(&token("bob")).await;
    for i in 0..5 {
        send(&mut alice, &ch, &format!("burst {i}")).await;
    }
    let before = server.db.counts().await;
    let s = alice
        .send_message(to(&ch, "one too many"))
        .await
        .expect_err("past the burst");
    exhausted(&s, "sixth send");
    let wait = retry_after(&s).expect("RetryInfo on a rate limit");
    assert!(
        wait > Duration::from_secs(900) && wait <= Duration::from_secs(1000),
        "the wait for the next token: {wait:?}"
    );
    assert_eq!(
        server.db.counts().await,
        before,
        "a refused send stores nothing"
    );
    let m = send(&mut bob, &ch, "bob is not limited by alice").await;
    let s = alice
        .forward_message(proto::ForwardMessageRequest {
            message_id: m.id,
            channel_id: ch.clone(),
            recipient_id: String::new(),
        })
        .await
        .expect_err("forwarding shares the send bucket");
    exhausted(&s, "forward");
    // Writes: the first two pass, the third waits for a token; sends do not draw on it.
    let mut groups = server.groups(&token("alice")).await;
    let rename = |name: &str| proto::UpdateGroupRequest {
        channel_id: ch.clone(),
        name: name.into(),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name".into()],
        }),
        ..Default::default()
    };
    groups.update_group(rename("a")).await.expect("write 1");
    groups.update_group(rename("b")).await.expect("write 2");
    let s = groups.update_group(rename("c")).await.expect_err("write 3");
    exhausted(&s, "third write");
    assert!(retry_after(&s).is_some());
    server.stop().await;
}

/// Open Subscribe streams per user: past the limit RESOURCE_EXHAUSTED (no RetryInfo: only
/// closing one helps); a client opening streams without end holds only the limit's worth
/// (memory bounded); another user subscribes meanwhile; closing one makes room.
async fn open_feeds_per_user(backend: Backend) {
    let server = start(
        backend,
        LimitSettings {
            feeds_per_user: 4,
            ..LimitSettings::unlimited()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let rss_before = rss_kib();
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..500 {
        match alice.subscribe(proto::SubscribeRequest::default()).await {
            Ok(s) => open.push(s.into_inner()),
            Err(s) => {
                exhausted(&s, "feed past the limit");
                assert!(retry_after(&s).is_none(), "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (4, 496));
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
    let mut bob = server.chat(&token("bob")).await;
    let mut bobs = bob
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("another user subscribes")
        .into_inner();
    let m = send(&mut alice, &ch, "still delivered").await;
    let ev = tokio::time::timeout(WAIT, bobs.message())
        .await
        .expect("event")
        .expect("ok")
        .expect("open");
    assert_eq!(ev.sequence, m.sequence);
    drop(open.pop());
    // The server notices the closed stream when its reset arrives.
    let again = tokio::time::timeout(WAIT, async {
        loop {
            match alice.subscribe(proto::SubscribeRequest::default()).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("room after closing one");
    drop(again);
    server.stop().await;
}

fn meta(channel: &str, size: i64) -> proto::AttachmentMetadata {
    proto::AttachmentMetadata {
        channel_id: channel.into(),
        file_name: "f.bin".into(),
        content_type: "application/octet-stream".into(),
        size_bytes: size,
        sha256: String::new(),
    }
}

/// Writes the first byte of a resumable upload.
async fn first_byte(f: &mut Files, upload_id: &str) -> Result<i64, Status> {
    f.upload_chunk(proto::UploadChunkRequest {
        upload_id: upload_id.into(),
        offset: 0,
        chunk: vec![1u8].into(),
    })
    .await
    .map(|r| r.into_inner().committed_bytes)
}

async fn create(f: &mut Files, m: proto::AttachmentMetadata) -> Result<String, Status> {
    f.create_upload(proto::CreateUploadRequest { metadata: Some(m) })
        .await
        .map(|r| r.into_inner().upload_id)
}

/// Unfinished uploads per user, by count and by declared bytes, resumable and streamed; checked
/// so that concurrent CreateUploads cannot pass the limit together; another user uploads
/// meanwhile; completing one makes room. A member removed from the channel can no longer
/// write chunks (UploadChunk checks membership, not only CompleteUpload).
async fn unfinished_uploads_per_user(backend: Backend) {
    let server = start(
        backend,
        LimitSettings {
            unfinished_uploads: 3,
            unfinished_upload_bytes: 10 << 20,
            ..LimitSettings::unlimited()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut alice = files(&server, "alice").await;
    // Twelve at once: exactly three pass.
    let tries = (0..12).map(|_| {
        let mut a = alice.clone();
        let m = meta(&ch, 1);
        async move { create(&mut a, m).await }
    });
    let results = futures::future::join_all(tries).await;
    let ok: Vec<String> = results.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(ok.len(), 3, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        exhausted(r, "fourth unfinished upload");
    }
    assert_eq!(server.db.count("uploads").await, 3);
    // Bytes: bob has room for 10 MiB declared in all.
    let mut bob = files(&server, "bob").await;
    let b1 = create(&mut bob, meta(&ch, 6 << 20)).await.expect("6 MiB");
    let s = create(&mut bob, meta(&ch, 5 << 20))
        .await
        .expect_err("11 MiB");
    exhausted(&s, "declared bytes");
    create(&mut bob, meta(&ch, 4 << 20)).await.expect("10 MiB");
    assert!(!b1.is_empty());
    // Alice completes one (one byte) and has room again.
    first_byte(&mut alice, &ok[0]).await.expect("chunk");
    alice
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: ok[0].clone(),
        })
        .await
        .expect("complete");
    create(&mut alice, meta(&ch, 1)).await.expect("room again");
    // Cancelling one makes room too, and deletes its row and chunks.
    let s = create(&mut alice, meta(&ch, 1))
        .await
        .expect_err("at the limit again");
    exhausted(&s, "at the limit again");
    let uploads = server.db.count("uploads").await;
    first_byte(&mut alice, &ok[1]).await.expect("chunk");
    alice
        .cancel_upload(proto::CancelUploadRequest {
            upload_id: ok[1].clone(),
        })
        .await
        .expect("cancel");
    assert_eq!(server.db.count("uploads").await, uploads - 1);
    assert_eq!(
        server.db.count("upload_chunks").await,
        0,
        "its chunk record went too"
    );
    let s = bob
        .cancel_upload(proto::CancelUploadRequest {
            upload_id: ok[2].clone(),
        })
        .await
        .expect_err("another user's upload");
    assert_eq!(s.code(), Code::NotFound);
    create(&mut alice, meta(&ch, 1))
        .await
        .expect("room after cancelling");

    // Streamed uploads in flight count too: carol holds three open, the fourth is refused.
    let mut carol = files(&server, "carol").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(proto::UploadAttachmentRequest {
            data: Some(Data::Metadata(meta(&ch, 100))),
        })
        .await
        .expect("queue");
        let mut c = carol.clone();
        let call = tokio::spawn(async move {
            c.upload_attachment(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        held.push((tx, call));
    }
    // The three count once the server has read their metadata frames.
    tokio::time::timeout(WAIT, async {
        while server.chat.limits().streamed_uploads("default", "carol").0 < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three streamed uploads in flight");
    let frames = vec![proto::UploadAttachmentRequest {
        data: Some(Data::Metadata(meta(&ch, 1))),
    }];
    let refused = carol
        .upload_attachment(futures::stream::iter(frames))
        .await
        .expect_err("a fourth streamed upload");
    exhausted(&refused, "streamed upload past the limit");
    for (tx, call) in held {
        tx.send(proto::UploadAttachmentRequest {
            data: Some(Data::Chunk(vec![0u8; 100].into())),
        })
        .await
        .expect("chunk");
        drop(tx);
        call.await.expect("join").expect("completed");
    }

    // Membership on every chunk: alice removes carol; carol's open upload stops taking chunks.
    let carol_upload = create(&mut carol, meta(&ch, 2))
        .await
        .expect("carol's upload");
    server
        .groups(&token("alice"))
        .await
        .remove_member(proto::RemoveMemberRequest {
            channel_id: ch.clone(),
            user_id: "carol".into(),
        })
        .await
        .expect("remove carol");
    let s = first_byte(&mut carol, &carol_upload)
        .await
        .expect_err("a removed member writes no chunk");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    server.stop().await;
}

/// Holds the database's write lock (SQLite) or an exclusive lock on `channels` (PostgreSQL
/// `ACCESS EXCLUSIVE`, MySQL `LOCK TABLES … WRITE`) until the returned guard's task is told to
/// stop.
async fn hold_write_lock(db: &TestDb) -> tokio::sync::oneshot::Sender<()> {
    use sqlx::Connection;
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let url = db.url.clone();
    let schema = db.schema.clone();
    let backend = db.backend;
    // A thread and runtime of its own: sqlx's executor bounds do not fit tokio::spawn here.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            match backend {
                Backend::Sqlite => {
                    let mut c = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
                    sqlx::raw_sql("BEGIN IMMEDIATE")
                        .execute(&mut c)
                        .await
                        .expect("lock");
                    let _ = locked_tx.send(());
                    let _ = stop_rx.await;
                    sqlx::raw_sql("ROLLBACK")
                        .execute(&mut c)
                        .await
                        .expect("unlock");
                }
                Backend::Mysql => {
                    let mut c = sqlx::MySqlConnection::connect(&url).await.expect("mysql");
                    sqlx::raw_sql("LOCK TABLES channels WRITE")
                        .execute(&mut c)
                        .await
                        .expect("lock");
                    let _ = locked_tx.send(());
                    let _ = stop_rx.await;
                    sqlx::raw_sql("UNLOCK TABLES")
                        .execute(&mut c)
                        .await
                        .expect("unlock");
                }
                Backend::Postgres => {
                    let mut c = sqlx::PgConnection::connect(&url).await.expect("postgres");
                    let schema = schema.expect("schema");
                    sqlx::raw_sql(&format!(
                        "BEGIN; LOCK TABLE {schema}.channels IN ACCESS EXCLUSIVE MODE"
                    ))
                    .execute(&mut c)
                    .await
                    .expect("lock");
                    let _ = locked_tx.send(());
                    let _ = stop_rx.await;
                    sqlx::raw_sql("ROLLBACK")
                        .execute(&mut c)
                        .await
                        .expect("unlock");
                }
            }
        })
    });
    locked_rx.await.expect("locked");
    stop_tx
}

/// A unary call stuck on a locked database is answered DEADLINE_EXCEEDED at the service's
/// unary timeout (here 1 s); calls that do not touch the lock are unaffected.
async fn unary_calls_have_a_deadline(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        Options {
            serve: ServeOptions {
                unary_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    send(&mut alice, &ch, "before the lock").await;
    let unlock = hold_write_lock(&server.db).await;
    let mut groups = server.groups(&token("alice")).await;
    let s = tokio::time::timeout(
        WAIT,
        groups.create_group(proto::CreateGroupRequest {
            name: "stuck".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("answered at the deadline")
    .expect_err("the database is locked");
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    let _ = unlock.send(());
    server.stop().await;
}

/// HTTP/2 concurrent streams per connection: with a limit of 2 and two feeds open, a third call
/// on the same connection waits (HTTP/2 flow control; it is not refused) while a call on
/// another connection goes through, and it completes once a feed closes.
async fn concurrent_streams_per_connection(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        Options {
            serve: ServeOptions {
                max_concurrent_streams: 2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = server.chat(&token("alice")).await;
    let f1 = alice
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("feed 1")
        .into_inner();
    let _f2 = alice
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("feed 2")
        .into_inner();
    let mut third = alice.clone();
    let ch2 = ch.clone();
    let mut pending = tokio::spawn(async move {
        third
            .count_messages(proto::CountMessagesRequest { channel_id: ch2 })
            .await
    });
    let mut other = server.chat(&token("alice")).await;
    other
        .count_messages(proto::CountMessagesRequest {
            channel_id: ch.clone(),
        })
        .await
        .expect("another connection is not held up");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending)
            .await
            .is_err(),
        "the third stream on the connection waits for a free one"
    );
    drop(f1);
    tokio::time::timeout(WAIT, pending)
        .await
        .expect("runs once a stream closes")
        .expect("join")
        .expect("count");
    server.stop().await;
}

on_every_backend!(
    send_and_write_rates,
    open_feeds_per_user,
    unfinished_uploads_per_user,
    unary_calls_have_a_deadline,
    concurrent_streams_per_connection,
);
