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
