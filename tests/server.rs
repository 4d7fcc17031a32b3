//! What is served beside the chat API on the same port, without a token: health and
//! reflection (v1 and v1alpha, so `grpcurl list` works with old and new grpcurl).

mod common;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_need_no_token() {
    let server = TestServer::start(Backend::Sqlite).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "chat.v1.ChatService",
        "chat.v1.GroupService",
        "chat.v1.AttachmentService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut r1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = r1
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("v1")
        .into_inner();
    let names: Vec<String> = match resp
        .message()
        .await
        .expect("v1 answer")
        .and_then(|r| r.message_response)
    {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected {other:?}"),
    };
    for s in [
        "chat.v1.ChatService",
        "chat.v1.GroupService",
        "chat.v1.AttachmentService",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} in {names:?}");
    }

    let mut ra = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut resp = ra
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .expect("v1alpha")
        .into_inner();
    let answer = resp
        .message()
        .await
        .expect("v1alpha answer")
        .and_then(|r| r.message_response);
    assert!(
        matches!(answer, Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(ref l)) if l.service.iter().any(|s| s.name == "chat.v1.ChatService")),
        "{answer:?}"
    );
}

/// Shutdown ends every open stream within the drain period: a health `Watch` (gRPC client-side
/// health checking keeps one per connection and never cancels it) hears NOT_SERVING and ends,
/// a download its client stopped reading and a live feed end too, and `serve` returns.
async fn shutdown_ends_every_open_stream(backend: Backend) {
    use chat_service::proto::attachment_service_client::AttachmentServiceClient;
    use chat_service::proto::{self, upload_attachment_request::Data};
    let server = TestServer::start_with(
        backend,
        Options {
            serve: chat_service::server::ServeOptions {
                drain_period: std::time::Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let wait = std::time::Duration::from_secs(20);
    let ch = group(&server, "alice", &["bob"]).await;
    let bearer = chat_service::cli::Bearer::new(&token("alice")).expect("bearer");
    let mut files = AttachmentServiceClient::with_interceptor(server.channel().await, bearer);
    // 8 MiB: far more than the HTTP/2 windows hold, so the download stays open unread.
    let bytes = vec![7u8; 8 << 20];
    let mut frames = vec![proto::UploadAttachmentRequest {
        data: Some(Data::Metadata(proto::AttachmentMetadata {
            channel_id: ch.clone(),
            file_name: "big.bin".into(),
            content_type: "application/octet-stream".into(),
            size_bytes: bytes.len() as i64,
            sha256: String::new(),
        })),
    }];
    for c in bytes.chunks(1 << 20) {
        frames.push(proto::UploadAttachmentRequest {
            data: Some(Data::Chunk(c.to_vec().into())),
        });
    }
    let attachment = files
        .upload_attachment(futures::stream::iter(frames))
        .await
        .expect("upload")
        .into_inner()
        .attachment
        .expect("attachment");
    let mut download = files
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: attachment.id,
            offset: 0,
        })
        .await
        .expect("download")
        .into_inner();
    download
        .message()
        .await
        .expect("first frame")
        .expect("open");

    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch ok").expect("open");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut feed = server
        .chat(&token("bob"))
        .await
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();

    tokio::time::timeout(wait, server.stop())
        .await
        .expect("serve returns although clients hold streams open");

    let mut statuses = Vec::new();
    let watch_end = loop {
        match tokio::time::timeout(wait, watch.message())
            .await
            .expect("watch ends")
        {
            Ok(Some(r)) => statuses.push(r.status),
            Ok(None) => break None,
            Err(s) => break Some(s.code()),
        }
    };
    assert_eq!(
        statuses,
        [ServingStatus::NotServing as i32],
        "the watch hears NOT_SERVING before it ends ({watch_end:?})"
    );
    let feed_end = tokio::time::timeout(wait, feed.message())
        .await
        .expect("feed ends");
    assert!(
        matches!(feed_end, Ok(None)),
        "feeds end cleanly: {feed_end:?}"
    );
    // The download was cut: it ends (UNAVAILABLE, or the connection closing) before its end.
    let mut got = 0usize;
    let end = loop {
        match tokio::time::timeout(wait, download.message())
            .await
            .expect("download ends")
        {
            Ok(Some(f)) => {
                if let Some(proto::download_attachment_response::Data::Chunk(b)) = f.data {
                    got += b.len();
                }
            }
            Ok(None) => break None,
            Err(s) => break Some(s.code()),
        }
    };
    assert!(
        matches!(
            end,
            Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
        ),
        "download cut at shutdown, after {got} bytes: {end:?}"
    );
}

on_every_backend!(shutdown_ends_every_open_stream);
