//! AttachmentService on local disk and on a real S3-compatible server (moto, started by
//! `scripts/test`): streamed and resumable uploads, downloads with resume, limits, cleanup of
//! failed uploads, access rules, download records, the sweep, and real files from the machine.

mod common;

use std::time::Duration;

use bytes::Bytes;
use chat_service::blob::Blobs;
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::{self, download_attachment_response, upload_attachment_request};
use common::*;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

type Client = AttachmentServiceClient<InterceptedService<Channel, chat_service::cli::Bearer>>;

const MIB: usize = 1024 * 1024;

/// Where the bytes go, and which database holds the rows.
#[derive(Debug, Clone, Copy)]
enum Storage {
    Local,
    S3,
    LocalOnPostgres,
}

async fn start(storage: Storage, max_upload_bytes: Option<i64>) -> TestServer {
    let mut opts = Options::default();
    if let Some(m) = max_upload_bytes {
        opts.max_upload_bytes = m;
    }
    let backend = match storage {
        Storage::LocalOnPostgres => Backend::Postgres,
        _ => Backend::Sqlite,
    };
    if let Storage::S3 = storage {
        let bucket = std::env::var("CHAT_TEST_S3_BUCKET")
            .expect("CHAT_TEST_S3_BUCKET (and AWS_ENDPOINT_URL): run the tests with ./scripts/test, which starts an S3 server");
        let url = format!("s3://{bucket}/{}", uuid::Uuid::new_v4().simple());
        opts.storage = Some(Blobs::from_url(&url).expect("s3 blobs"));
    }
    TestServer::start_with(backend, opts).await
}

/// Every object in the server's storage (for "nothing left behind" checks); on local disk also
/// any staging file of an unfinished multipart upload.
async fn stored_objects(server: &TestServer) -> usize {
    match &server.opts.storage {
        Some(blobs) => blobs.list("").await.expect("list").len(),
        None => count_files(&server.db.blob_dir()),
    }
}

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

async fn client(server: &TestServer, user: &str) -> Client {
    let channel = server.channel().await;
    AttachmentServiceClient::with_interceptor(
        channel,
        chat_service::cli::Bearer::new(&token(user)).expect("token"),
    )
    .max_decoding_message_size(2 * MIB)
    .max_encoding_message_size(4 * MIB)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn frames(
    meta: proto::AttachmentMetadata,
    bytes: &[u8],
    frame: usize,
) -> Vec<proto::UploadAttachmentRequest> {
    let mut out = vec![proto::UploadAttachmentRequest {
        data: Some(upload_attachment_request::Data::Metadata(meta)),
    }];
    for c in bytes.chunks(frame.max(1)) {
        out.push(proto::UploadAttachmentRequest {
            data: Some(upload_attachment_request::Data::Chunk(
                Bytes::copy_from_slice(c),
            )),
        });
    }
    out
}

fn meta(channel: &str, name: &str, bytes: &[u8]) -> proto::AttachmentMetadata {
    proto::AttachmentMetadata {
        channel_id: channel.into(),
        file_name: name.into(),
        content_type: "application/octet-stream".into(),
        size_bytes: bytes.len() as i64,
        sha256: sha(bytes),
    }
}

async fn upload(
    c: &mut Client,
    m: proto::AttachmentMetadata,
    bytes: &[u8],
) -> Result<proto::Attachment, tonic::Status> {
    let reqs = frames(m, bytes, MIB);
    c.upload_attachment(futures::stream::iter(reqs))
        .await
        .map(|r| r.into_inner().attachment.expect("attachment"))
}

/// Downloads from `offset`; returns (metadata, bytes).
async fn download(
    c: &mut Client,
    id: &str,
    offset: i64,
) -> Result<(proto::Attachment, Vec<u8>), tonic::Status> {
    let mut s = c
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: id.into(),
            offset,
        })
        .await?
        .into_inner();
    let mut head = None;
    let mut out = Vec::new();
    while let Some(frame) = s.message().await? {
        match frame.data {
            Some(download_attachment_response::Data::Attachment(a)) => {
                assert!(
                    head.is_none() && out.is_empty(),
                    "metadata comes first, once"
                );
                head = Some(a);
            }
            Some(download_attachment_response::Data::Chunk(b)) => {
                assert!(b.len() <= MIB);
                out.extend_from_slice(&b)
            }
            None => panic!("empty frame"),
        }
    }
    Ok((head.expect("metadata frame"), out))
}

/// Links attachments to a message from `user`.
async fn link(server: &TestServer, user: &str, channel: &str, ids: Vec<String>) -> proto::Message {
    let mut chat = server.chat(&token(user)).await;
    chat.send_message(proto::SendMessageRequest {
        channel_id: channel.into(),
        attachment_ids: ids,
        ..Default::default()
    })
    .await
    .expect("send with attachments")
    .into_inner()
    .message
    .expect("message")
}

async fn round_trips_of_every_size(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = client(&server, "alice").await;
    let mut bob = client(&server, "bob").await;
    // On local disk, past 64 MiB the writer also flushes ahead on a helper thread
    // (`blob::FLUSH_AHEAD_BYTES`); S3 (moto) keeps the smaller size to stay quick.
    let big = match storage {
        Storage::S3 => 50 * MIB + 123,
        _ => chat_service::blob::FLUSH_AHEAD_BYTES as usize + 3 * MIB + 123,
    };
    let sizes = [0, 1, MIB, MIB + 1, big];
    let mut ids = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let bytes = data(*size, i as u8);
        let a = upload(
            &mut alice,
            meta(&ch, &format!("file-{size}.bin"), &bytes),
            &bytes,
        )
        .await
        .expect("upload");
        assert_eq!(a.size_bytes, *size as i64);
        assert_eq!(a.sha256, sha(&bytes), "server-computed sha256");
        assert_eq!(a.message_id, "");
        ids.push((a.id, bytes));
    }
    let msg = link(
        &server,
        "alice",
        &ch,
        ids.iter().map(|(id, _)| id.clone()).collect(),
    )
    .await;
    assert_eq!(
        msg.body, "",
        "a message of attachments alone may have an empty body"
    );
    assert_eq!(msg.attachment_ids.len(), sizes.len());
    for (id, bytes) in &ids {
        let (head, got) = download(&mut bob, id, 0).await.expect("download");
        assert_eq!(head.message_id, msg.id);
        assert_eq!(got.len(), bytes.len());
        assert_eq!(sha(&got), sha(bytes), "same bytes at both ends");
    }
    // Resume a broken download from an offset.
    let (id, bytes) = &ids[4];
    let offset = 17 * MIB as i64 + 5;
    let (_, tail) = download(&mut bob, id, offset).await.expect("resume");
    assert_eq!(tail, bytes[offset as usize..]);
    let (_, nothing) = download(&mut bob, id, bytes.len() as i64)
        .await
        .expect("at end");
    assert!(nothing.is_empty());
    let err = download(&mut bob, id, bytes.len() as i64 + 1)
        .await
        .expect_err("beyond end");
    assert_eq!(err.code(), Code::OutOfRange);
    // A linked attachment cannot be linked again.
    let mut chat = server.chat(&token("alice")).await;
    let again = chat
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            attachment_ids: vec![ids[0].0.clone()],
            ..Default::default()
        })
        .await
        .expect_err("linked already");
    assert_eq!(again.code(), Code::InvalidArgument);
    assert_eq!(violations(&again), vec!["attachment_ids[0]"]);
}

async fn refused_uploads_leave_nothing(storage: Storage) {
    let server = start(storage, Some(3 * MIB as i64)).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = client(&server, "alice").await;
    let bytes = data(2 * MIB + 10, 7);
    // Fewer bytes than declared.
    let mut m = meta(&ch, "short.bin", &bytes);
    m.size_bytes += 1;
    let e = upload(&mut alice, m, &bytes).await.expect_err("short");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(violations(&e).contains(&"metadata.size_bytes".to_owned()));
    // More bytes than declared.
    let mut m = meta(&ch, "long.bin", &bytes);
    m.size_bytes -= 1;
    assert_eq!(
        upload(&mut alice, m, &bytes)
            .await
            .expect_err("long")
            .code(),
        Code::InvalidArgument
    );
    // Wrong sha256.
    let mut m = meta(&ch, "sha.bin", &bytes);
    m.sha256 = sha(b"something else");
    let e = upload(&mut alice, m, &bytes).await.expect_err("sha");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(violations(&e).contains(&"metadata.sha256".to_owned()));
    // Declared over the limit: refused at the first frame.
    let big = proto::AttachmentMetadata {
        size_bytes: 10 * MIB as i64,
        sha256: String::new(),
        ..meta(&ch, "big.bin", &[])
    };
    let e = upload(&mut alice, big, &[])
        .await
        .expect_err("over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Lying about the size: refused at the frame that crosses the limit, before the rest is sent.
    let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = pulled.clone();
    let liar = proto::AttachmentMetadata {
        size_bytes: 2 * MIB as i64,
        sha256: String::new(),
        ..meta(&ch, "liar.bin", &[])
    };
    let chunk = Bytes::from(data(MIB, 1));
    let frames = futures::stream::iter(0..100).map(move |i| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        proto::UploadAttachmentRequest {
            data: Some(if i == 0 {
                upload_attachment_request::Data::Metadata(liar.clone())
            } else {
                upload_attachment_request::Data::Chunk(chunk.clone())
            }),
        }
    });
    let e = alice.upload_attachment(frames).await.expect_err("liar");
    assert!(
        matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{e:?}"
    );
    assert!(
        pulled.load(std::sync::atomic::Ordering::SeqCst) < 100,
        "refused before the whole file was sent"
    );
    // Bad metadata.
    for (name, field) in [
        ("", "metadata.file_name"),
        ("bell\u{7}.txt", "metadata.file_name"),
        ("nul\u{0}.txt", "metadata.file_name"),
    ] {
        let e = upload(&mut alice, meta(&ch, name, b"x"), b"x")
            .await
            .expect_err("bad name");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(violations(&e), vec![field.to_owned()]);
    }
    // Frames over 1 MiB are refused.
    let e = alice
        .upload_attachment(futures::stream::iter(frames_of(&ch, 2 * MIB)))
        .await
        .expect_err("2 MiB frame");
    assert!(
        matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{e:?}"
    );
    // Nothing kept: no row, no object (aborts may finish just after the reply).
    assert_eq!(server.db.count("attachments").await, 0);
    settle(&server, 0).await;
}

fn frames_of(ch: &str, frame: usize) -> Vec<proto::UploadAttachmentRequest> {
    let bytes = data(frame, 3);
    frames(meta(ch, "f.bin", &bytes), &bytes, frame)
}

/// Waits (bounded) until storage holds exactly `n` objects, then asserts it.
async fn settle(server: &TestServer, n: usize) {
    for _ in 0..50 {
        if stored_objects(server).await == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored_objects(server).await, n, "objects in storage");
}

async fn cancelled_upload_leaves_nothing(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &[]).await;
    let mut alice = client(&server, "alice").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let m = proto::AttachmentMetadata {
        size_bytes: 20 * MIB as i64,
        sha256: String::new(),
        ..meta(&ch, "cancel.bin", &[])
    };
    tx.send(proto::UploadAttachmentRequest {
        data: Some(upload_attachment_request::Data::Metadata(m)),
    })
    .await
    .expect("meta");
    let call = tokio::spawn(async move {
        alice
            .upload_attachment(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let chunk = Bytes::from(data(MIB, 9));
    for _ in 0..8 {
        tx.send(proto::UploadAttachmentRequest {
            data: Some(upload_attachment_request::Data::Chunk(chunk.clone())),
        })
        .await
        .expect("chunk");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort(); // the client goes away mid-upload
    drop(tx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.db.count("attachments").await, 0);
    settle(&server, 0).await;
}

/// A client that goes away after its last frame, while the server may be closing, committing
/// or recording the upload: the upload runs in a task of its own, so it ends consistent either
/// way, with an attachment row and its object, or neither; never an object no row names.
/// Rounds cancel at several delays so some land during the commit.
async fn client_gone_after_the_last_frame_leaves_no_orphan(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &[]).await;
    let bytes = data(16 * MIB, 5);
    for delay_ms in [0, 5, 20, 50, 100] {
        let mut alice = client(&server, "alice").await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let call = tokio::spawn(async move {
            alice
                .upload_attachment(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        for frame in frames(meta(&ch, "late.bin", &bytes), &bytes, MIB) {
            tx.send(frame).await.expect("frame");
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        call.abort();
    }
    let mut consistent = false;
    for _ in 0..50 {
        let rows = server.db.count("attachments").await;
        if rows as usize == stored_objects(&server).await {
            consistent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = server.db.count("attachments").await;
    eprintln!("{rows} of 5 cancelled uploads were recorded");
    assert!(
        consistent,
        "{rows} attachment rows, {} objects",
        stored_objects(&server).await
    );
    // Whatever was recorded is whole.
    let mut alice = client(&server, "alice").await;
    let listed = alice
        .list_attachments(proto::ListAttachmentsRequest {
            channel_id: ch.clone(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .attachments;
    assert_eq!(listed.len() as i64, rows);
    for a in listed {
        let (_, got) = download(&mut alice, &a.id, 0).await.expect("download");
        assert_eq!(sha(&got), sha(&bytes));
    }
}

async fn resumable_upload_survives_a_restart(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let bytes = data(3 * MIB + 77, 4);
    let mut alice = client(&server, "alice").await;
    let up = alice
        .create_upload(proto::CreateUploadRequest {
            metadata: Some(meta(&ch, "resumable.bin", &bytes)),
        })
        .await
        .expect("create")
        .into_inner()
        .upload_id;
    let first = alice
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: 0,
            chunk: Bytes::copy_from_slice(&bytes[..MIB]),
        })
        .await
        .expect("chunk 1")
        .into_inner();
    assert_eq!(first.committed_bytes, MIB as i64);
    // The server restarts mid-upload.
    let server = server.restart().await;
    let mut alice = client(&server, "alice").await;
    // A wrong offset says where to resume.
    let e = alice
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: 0,
            chunk: Bytes::copy_from_slice(&bytes[..10]),
        })
        .await
        .expect_err("wrong offset");
    assert_eq!(e.code(), Code::FailedPrecondition);
    use tonic_types::StatusExt;
    let info = e.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("committed_bytes").map(String::as_str),
        Some("1048576")
    );
    // Completing early is refused.
    let e = alice
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: up.clone(),
        })
        .await
        .expect_err("early");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Bob cannot touch Alice's upload.
    let mut bob = client(&server, "bob").await;
    let e = bob
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: MIB as i64,
            chunk: Bytes::from_static(b"x"),
        })
        .await
        .expect_err("not his");
    assert_eq!(e.code(), Code::NotFound);
    let mut offset = MIB;
    while offset < bytes.len() {
        let end = (offset + MIB).min(bytes.len());
        let r = alice
            .upload_chunk(proto::UploadChunkRequest {
                upload_id: up.clone(),
                offset: offset as i64,
                chunk: Bytes::copy_from_slice(&bytes[offset..end]),
            })
            .await
            .expect("chunk")
            .into_inner();
        assert_eq!(r.committed_bytes, end as i64);
        offset = end;
    }
    let a = alice
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: up.clone(),
        })
        .await
        .expect("complete")
        .into_inner()
        .attachment
        .expect("attachment");
    assert_eq!(a.sha256, sha(&bytes));
    link(&server, "alice", &ch, vec![a.id.clone()]).await;
    let (_, got) = download(&mut bob, &a.id, 0).await.expect("download");
    assert_eq!(sha(&got), sha(&bytes));
    settle(&server, 1).await; // the chunks are gone, the attachment stays
    assert_eq!(server.db.count("uploads").await, 0);
}

async fn access_rules_and_download_records(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &["bob", "carol"]).await;
    let mut alice = client(&server, "alice").await;
    // Large enough that a reader stopping after two frames cannot have been sent it all
    // (transport buffers hold a few MiB).
    let bytes = data(24 * MIB, 5);
    let a = upload(&mut alice, meta(&ch, "../../etc/passwd", &bytes), &bytes)
        .await
        .expect("upload");
    assert_eq!(a.file_name, "../../etc/passwd", "the name is metadata only");
    // Unlinked: only the uploader sees it.
    let mut bob = client(&server, "bob").await;
    assert_eq!(
        download(&mut bob, &a.id, 0)
            .await
            .expect_err("unlinked")
            .code(),
        Code::NotFound
    );
    let msg = link(&server, "alice", &ch, vec![a.id.clone()]).await;
    // Outsiders: a non-member, and the same user id in another tenant.
    let mut mallory = client(&server, "mallory").await;
    assert_eq!(
        download(&mut mallory, &a.id, 0)
            .await
            .expect_err("non-member")
            .code(),
        Code::NotFound
    );
    let channel = server.channel().await;
    let other = token_with(
        "bob",
        "other",
        chat_service::auth::all_permission_names(),
        3600,
    );
    let mut other = AttachmentServiceClient::with_interceptor(
        channel,
        chat_service::cli::Bearer::new(&other).expect("t"),
    );
    assert_eq!(
        download(&mut other, &a.id, 0)
            .await
            .expect_err("other tenant")
            .code(),
        Code::NotFound
    );
    // A full download and a partial one.
    let (_, got) = download(&mut bob, &a.id, 0).await.expect("full");
    assert_eq!(got.len(), bytes.len());
    let mut carol = client(&server, "carol").await;
    let mut partial = carol
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: a.id.clone(),
            offset: 0,
        })
        .await
        .expect("partial")
        .into_inner();
    partial.message().await.expect("head").expect("frame");
    partial.message().await.expect("chunk").expect("frame");
    drop(partial); // carol stops midway
    let mut records = Vec::new();
    for _ in 0..50 {
        records = alice
            .list_attachment_downloads(proto::ListAttachmentDownloadsRequest {
                attachment_id: a.id.clone(),
                ..Default::default()
            })
            .await
            .expect("records")
            .into_inner()
            .downloads;
        if records
            .iter()
            .any(|r| r.user_id == "carol" && r.bytes_sent > 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bob_rec = records
        .iter()
        .find(|r| r.user_id == "bob")
        .expect("bob's record");
    assert!(bob_rec.completed);
    assert_eq!(bob_rec.bytes_sent, bytes.len() as i64);
    let carol_rec = records
        .iter()
        .find(|r| r.user_id == "carol")
        .expect("carol's record");
    assert!(!carol_rec.completed);
    assert!(
        carol_rec.bytes_sent > 0 && carol_rec.bytes_sent < bytes.len() as i64,
        "{carol_rec:?}"
    );
    // Only the uploader (or a manager) sees the records.
    let e = bob
        .list_attachment_downloads(proto::ListAttachmentDownloadsRequest {
            attachment_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("bob is a plain member");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Listing by channel and by message.
    let by_msg = bob
        .list_attachments(proto::ListAttachmentsRequest {
            message_id: msg.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        by_msg
            .attachments
            .iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>(),
        vec![a.id.clone()]
    );
    // After the message is deleted, the attachment is no longer served.
    let mut chat = server.chat(&token("alice")).await;
    chat.delete_message(proto::DeleteMessageRequest {
        message_id: msg.id.clone(),
    })
    .await
    .expect("delete");
    assert_eq!(
        download(&mut bob, &a.id, 0)
            .await
            .expect_err("deleted message")
            .code(),
        Code::NotFound
    );
    let e = bob
        .get_attachment(proto::GetAttachmentRequest {
            attachment_id: a.id.clone(),
        })
        .await
        .expect_err("get");
    assert_eq!(e.code(), Code::NotFound);
    // Deleting an attachment removes its bytes.
    let b = upload(&mut alice, meta(&ch, "gone.bin", b"bye"), b"bye")
        .await
        .expect("upload");
    settle(&server, 2).await;
    let e = bob
        .delete_attachment(proto::DeleteAttachmentRequest {
            attachment_id: b.id.clone(),
        })
        .await
        .expect_err("not bob's");
    assert_eq!(
        e.code(),
        Code::NotFound,
        "unlinked uploads are invisible to others"
    );
    alice
        .delete_attachment(proto::DeleteAttachmentRequest {
            attachment_id: b.id.clone(),
        })
        .await
        .expect("delete");
    settle(&server, 1).await;
}

/// An unfinished resumable upload of 10 bytes with its first 5 stored, in `channel`.
async fn half_upload(c: &mut Client, channel: &str) {
    let up = c
        .create_upload(proto::CreateUploadRequest {
            metadata: Some(meta(channel, "half.bin", &[0u8; 10])),
        })
        .await
        .expect("create")
        .into_inner()
        .upload_id;
    c.upload_chunk(proto::UploadChunkRequest {
        upload_id: up,
        offset: 0,
        chunk: Bytes::from_static(&[0u8; 5]),
    })
    .await
    .expect("chunk");
}

async fn sweep_removes_unlinked_and_unfinished(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &[]).await;
    let mut alice = client(&server, "alice").await;
    let kept = upload(&mut alice, meta(&ch, "kept.bin", b"kept"), b"kept")
        .await
        .expect("upload");
    link(&server, "alice", &ch, vec![kept.id.clone()]).await;
    upload(&mut alice, meta(&ch, "orphan.bin", b"orphan"), b"orphan")
        .await
        .expect("upload");
    half_upload(&mut alice, &ch).await;
    settle(&server, 3).await;
    // On local disk, what a server killed mid-write leaves: a staging file beside an object,
    // which no listing shows. One last written two hours ago, one just now.
    let staging = server.opts.storage.is_none().then(|| {
        let dir = server.db.blob_dir().join("a");
        let (old, new) = (dir.join("killed#123"), dir.join("writing#456"));
        std::fs::write(&old, b"half").expect("write");
        std::fs::write(&new, b"half").expect("write");
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(two_hours_ago))
            .expect("set mtime");
        (old, new)
    });
    // Nothing is old enough yet.
    let now = chat_service::store::now_micros();
    assert_eq!(
        server.chat.sweep(now - 3_600_000_000).await.expect("sweep"),
        (0, 0)
    );
    if let Some((old, new)) = &staging {
        assert!(
            !old.exists(),
            "a staging file older than the cutoff is removed"
        );
        assert!(
            new.exists(),
            "a recent one (a write still going on) is kept"
        );
        std::fs::remove_file(new).expect("remove");
    }
    // Everything unlinked is, a moment from now.
    assert_eq!(
        server.chat.sweep(now + 1_000_000).await.expect("sweep"),
        (1, 1)
    );
    assert_eq!(server.db.count("attachments").await, 1);
    assert_eq!(server.db.count("uploads").await, 0);
    settle(&server, 1).await;
}

/// A deleted group's attachments, linked or not, and its unfinished uploads are swept at once (rows, with an audit row,
/// and bytes): nobody can reach or delete them any more. Another group's stay.
async fn sweep_removes_a_deleted_groups_attachments(storage: Storage) {
    let server = start(storage, None).await;
    let doomed = group(&server, "alice", &["bob"]).await;
    let kept = group(&server, "alice", &[]).await;
    let mut alice = client(&server, "alice").await;
    let linked = upload(
        &mut alice,
        meta(&doomed, "linked.bin", b"linked"),
        b"linked",
    )
    .await
    .expect("upload");
    link(&server, "alice", &doomed, vec![linked.id.clone()]).await;
    upload(&mut alice, meta(&doomed, "loose.bin", b"loose"), b"loose")
        .await
        .expect("upload");
    half_upload(&mut alice, &doomed).await;
    let other = upload(&mut alice, meta(&kept, "other.bin", b"other"), b"other")
        .await
        .expect("upload");
    link(&server, "alice", &kept, vec![other.id.clone()]).await;
    settle(&server, 4).await;
    server
        .groups(&token("alice"))
        .await
        .delete_group(proto::DeleteGroupRequest {
            channel_id: doomed.clone(),
        })
        .await
        .expect("delete group");
    let audits = server.db.count("audit_logs").await;
    // Nothing unlinked is old enough: only the deleted group's two attachments and its
    // unfinished upload go.
    let now = chat_service::store::now_micros();
    assert_eq!(
        server.chat.sweep(now - 3_600_000_000).await.expect("sweep"),
        (2, 1)
    );
    assert_eq!(server.db.count("uploads").await, 0);
    assert_eq!(server.db.count("attachments").await, 1);
    assert_eq!(
        server.db.count("audit_logs").await,
        audits + 2,
        "each audited"
    );
    settle(&server, 1).await;
    let mut bytes = Vec::new();
    let (_, got) = download(&mut alice, &other.id, 0)
        .await
        .expect("the other group's");
    bytes.extend(got);
    assert_eq!(bytes, b"other");
    assert_eq!(
        server.chat.sweep(now - 3_600_000_000).await.expect("sweep"),
        (0, 0),
        "nothing more"
    );
}

/// Real files of several types from the machine, linked to one message; another member
/// downloads each and gets the same bytes.
async fn real_files_from_the_machine(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = client(&server, "alice").await;
    let mut ids = Vec::new();
    for (ext, content_type) in [
        ("pdf", "application/pdf"),
        ("png", "image/png"),
        ("gz", "application/gzip"),
    ] {
        let path = find_file("/usr/share/doc", ext)
            .unwrap_or_else(|| panic!("no .{ext} file under /usr/share/doc"));
        let bytes = std::fs::read(&path).expect("read");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_owned();
        let m = proto::AttachmentMetadata {
            content_type: content_type.into(),
            ..meta(&ch, &name, &bytes)
        };
        let a = upload(&mut alice, m, &bytes).await.expect("upload");
        assert_eq!(a.content_type, content_type);
        ids.push((a.id, bytes));
    }
    link(
        &server,
        "alice",
        &ch,
        ids.iter().map(|(id, _)| id.clone()).collect(),
    )
    .await;
    let mut bob = client(&server, "bob").await;
    for (id, bytes) in &ids {
        let (_, got) = download(&mut bob, id, 0).await.expect("download");
        assert_eq!(&got, bytes);
    }
}

fn find_file(dir: &str, ext: &str) -> Option<std::path::PathBuf> {
    let mut stack = vec![std::path::PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|e| e.to_str()) == Some(ext)
                && std::fs::metadata(&p)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false)
            {
                return Some(p);
            }
        }
    }
    None
}

async fn resumable_edge_cases(storage: Storage) {
    let server = start(storage, Some(4 * MIB as i64)).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let other = group(&server, "bob", &["alice"]).await;
    let mut alice = client(&server, "alice").await;
    let create = |m: proto::AttachmentMetadata| proto::CreateUploadRequest { metadata: Some(m) };
    // Zero bytes: create and complete.
    let up = alice
        .create_upload(create(meta(&ch, "empty.txt", b"")))
        .await
        .expect("create")
        .into_inner()
        .upload_id;
    let a = alice
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: up.clone(),
        })
        .await
        .expect("complete")
        .into_inner();
    let a = a.attachment.expect("attachment");
    assert_eq!((a.size_bytes, a.sha256.as_str()), (0, sha(b"").as_str()));
    // A retried CompleteUpload gives the same attachment.
    let again = alice
        .complete_upload(proto::CompleteUploadRequest { upload_id: up })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(again.attachment.map(|x| x.id), Some(a.id.clone()));
    // Over the limit at CreateUpload; chunks over 1 MiB; chunks past the declared size.
    let big = proto::AttachmentMetadata {
        size_bytes: 5 * MIB as i64,
        ..meta(&ch, "big", b"")
    };
    assert_eq!(
        alice
            .create_upload(create(big))
            .await
            .expect_err("big")
            .code(),
        Code::ResourceExhausted
    );
    let bytes = data(10, 1);
    let up = alice
        .create_upload(create(meta(&ch, "ten.bin", &bytes)))
        .await
        .expect("create")
        .into_inner()
        .upload_id;
    let e = alice
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: 0,
            chunk: Bytes::from(data(MIB + 1, 2)),
        })
        .await
        .expect_err("chunk over 1 MiB");
    assert_eq!(
        (e.code(), violations(&e)),
        (Code::InvalidArgument, vec!["chunk".to_owned()])
    );
    let e = alice
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: 0,
            chunk: Bytes::from(data(11, 2)),
        })
        .await
        .expect_err("past the declared size");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Wrong content at completion: refused and nothing kept.
    let mut wrong = bytes.clone();
    wrong[0] ^= 1;
    alice
        .upload_chunk(proto::UploadChunkRequest {
            upload_id: up.clone(),
            offset: 0,
            chunk: Bytes::from(wrong),
        })
        .await
        .expect("chunk");
    let e = alice
        .complete_upload(proto::CompleteUploadRequest {
            upload_id: up.clone(),
        })
        .await
        .expect_err("sha");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(server.db.count("uploads").await, 0);
    let e = alice
        .complete_upload(proto::CompleteUploadRequest { upload_id: up })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    // Linking is refused for another channel's or another uploader's attachment.
    let x = upload(&mut alice, meta(&other, "x.bin", b"x"), b"x")
        .await
        .expect("upload");
    let mut chat = server.chat(&token("alice")).await;
    let e = chat
        .send_message(proto::SendMessageRequest {
            channel_id: ch.clone(),
            attachment_ids: vec![x.id.clone()],
            ..Default::default()
        })
        .await
        .expect_err("other channel");
    assert_eq!(violations(&e), vec!["attachment_ids[0]"]);
    let mut bob_chat = server.chat(&token("bob")).await;
    let e = bob_chat
        .send_message(proto::SendMessageRequest {
            channel_id: other.clone(),
            attachment_ids: vec![x.id.clone()],
            ..Default::default()
        })
        .await
        .expect_err("other uploader");
    assert_eq!(violations(&e), vec!["attachment_ids[0]"]);
    // Linking writes an audit row for the attachment.
    let audit = server.db.count("audit_logs").await;
    let m = link(&server, "alice", &other, vec![x.id.clone()]).await;
    assert_eq!(
        server.db.count("audit_logs").await,
        audit + 2,
        "the message and the link"
    );
    assert_eq!(m.attachment_ids, vec![x.id]);
}

async fn list_shows_only_what_the_caller_may_see(storage: Storage) {
    let server = start(storage, None).await;
    let ch = group(&server, "alice", &["bob"]).await;
    let mut alice = client(&server, "alice").await;
    let mut bob = client(&server, "bob").await;
    let mut linked = Vec::new();
    for i in 0..3u8 {
        let a = upload(&mut alice, meta(&ch, &format!("l{i}"), &[i]), &[i])
            .await
            .expect("upload");
        link(&server, "alice", &ch, vec![a.id.clone()]).await;
        linked.push(a.id);
        // Alice's unlinked uploads in between are hers alone.
        upload(&mut alice, meta(&ch, &format!("u{i}"), &[i]), &[i])
            .await
            .expect("upload");
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = bob
            .list_attachments(proto::ListAttachmentsRequest {
                channel_id: ch.clone(),
                page_size: 2,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        seen.extend(page.attachments.into_iter().map(|a| a.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    linked.reverse();
    assert_eq!(
        seen, linked,
        "bob sees the linked ones, newest first, across pages"
    );
    let mine = alice
        .list_attachments(proto::ListAttachmentsRequest {
            channel_id: ch.clone(),
            page_size: 200,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(mine.attachments.len(), 6);
    let e = bob
        .list_attachments(proto::ListAttachmentsRequest {
            channel_id: ch.clone(),
            page_token: "bm9wZQ".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut mallory = client(&server, "mallory").await;
    let e = mallory
        .list_attachments(proto::ListAttachmentsRequest {
            channel_id: ch.clone(),
            ..Default::default()
        })
        .await
        .expect_err("non-member");
    assert_eq!(e.code(), Code::NotFound);
}

macro_rules! on_every_storage {
    ($($name:ident),* $(,)?) => {
        mod local {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Storage::Local).await } )*
        }
        mod s3 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Storage::S3).await } )*
        }
        mod local_on_postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Storage::LocalOnPostgres).await } )*
        }
    };
}

on_every_storage!(
    round_trips_of_every_size,
    refused_uploads_leave_nothing,
    cancelled_upload_leaves_nothing,
    client_gone_after_the_last_frame_leaves_no_orphan,
    resumable_upload_survives_a_restart,
    access_rules_and_download_records,
    sweep_removes_unlinked_and_unfinished,
    sweep_removes_a_deleted_groups_attachments,
    real_files_from_the_machine,
    resumable_edge_cases,
    list_shows_only_what_the_caller_may_see,
);
