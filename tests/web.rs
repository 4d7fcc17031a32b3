//! grpc-web and CORS on the gRPC port: the tonic client over grpc-web on HTTP/1.1 (unary and a
//! live Subscribe), CORS preflight for allowed and refused origins, and the exposed `grpc-*`
//! headers that let a browser see an error's real code. The browser itself is tested from
//! `clients/typescript` (Chromium via Playwright).

mod common;

use bytes::Bytes;
use chat_service::proto;
use chat_service::proto::chat_service_client::ChatServiceClient;
use chat_service::server::{AllowedOrigins, ServeOptions};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::metadata::MetadataValue;

const PAGE: &str = "http://page.example:8080";

async fn server_allowing(origins: &str) -> TestServer {
    TestServer::start_with(
        Backend::Sqlite,
        Options {
            serve: ServeOptions {
                cors_allowed_origins: origins.parse().expect("origins"),
            },
            ..Options::default()
        },
    )
    .await
}

/// One plain HTTP/1.1 request; returns status, headers and the whole body.
async fn http1(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).expect("request"))
        .await
        .expect("http/1.1 request");
    assert_eq!(resp.version(), http::Version::HTTP_11);
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A grpc-web frame of an encoded message.
fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_answers_allowed_origin_only() {
    let server = server_allowing(&format!("{PAGE}, https://other.example")).await;
    let preflight = |origin: &'static str| {
        let server = &server;
        async move {
            http1(
                server,
                "OPTIONS",
                "/chat.v1.ChatService/SendMessage",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    (
                        "access-control-request-headers",
                        "authorization,content-type,x-grpc-web,x-user-agent",
                    ),
                ],
                Vec::new(),
            )
            .await
        }
    };
    let (status, h, _) = preflight(PAGE).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), PAGE);
    let allowed = header(&h, "access-control-allow-headers");
    for needed in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
    ] {
        assert!(allowed.contains(needed), "{needed} missing from {allowed}");
    }
    assert!(header(&h, "access-control-allow-methods").contains("POST"));
    assert_eq!(header(&h, "access-control-max-age"), "86400");

    // Not on the list: no Access-Control-Allow-Origin, so the browser refuses the call.
    let (_, h, _) = preflight("http://evil.example").await;
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    // An origin that only starts like an allowed one is refused too (exact match).
    let (_, h, _) = preflight("http://page.example:80801").await;
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_origins_configured_means_no_cross_origin_calls() {
    let server = TestServer::start(Backend::Sqlite).await;
    let (_, h, _) = http1(
        &server,
        "OPTIONS",
        "/chat.v1.ChatService/SendMessage",
        &[("origin", PAGE), ("access-control-request-method", "POST")],
        Vec::new(),
    )
    .await;
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_allows_any_origin() {
    let server = server_allowing("*").await;
    let (status, h, _) = http1(
        &server,
        "OPTIONS",
        "/chat.v1.ChatService/ListMessages",
        &[
            ("origin", "http://anything.example"),
            ("access-control-request-method", "POST"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), "*");
}

/// A refused call answers trailers-only: the code is in the response headers, and those must be
/// exposed to the page or a browser reports `UNKNOWN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_the_page_with_their_code() {
    let server = server_allowing(PAGE).await;
    let req = frame(&proto::ListMessagesRequest {
        channel_id: "x".into(),
        ..Default::default()
    });
    let (status, h, _) = http1(
        &server,
        "POST",
        "/chat.v1.ChatService/ListMessages",
        &[
            ("origin", PAGE),
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("authorization", &format!("Bearer {}", expired_token())),
        ],
        req,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "access-control-allow-origin"), PAGE);
    assert_eq!(header(&h, "grpc-status"), "16", "{h:?}");
    let exposed = header(&h, "access-control-expose-headers");
    for needed in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(needed), "{needed} missing from {exposed}");
    }
}

fn expired_token() -> String {
    token_with(
        "alice",
        "default",
        chat_service::auth::all_permission_names(),
        -120,
    )
}

/// The generated tonic client over grpc-web on HTTP/1.1: a group, a message, and the message on
/// a live Subscribe opened over the same protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_over_grpc_web_http1() {
    let server = server_allowing(PAGE).await;
    let channel_id = group(&server, "alice", &["bob"]).await;
    let http = Client::builder(TokioExecutor::new()).build_http();
    let svc = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http);
    let origin: http::Uri = server.url().parse().expect("uri");
    let mut web = ChatServiceClient::with_origin(svc, origin);
    let auth = |user: &str| -> MetadataValue<_> {
        format!("Bearer {}", token(user)).parse().expect("header")
    };

    let mut sub = tonic::Request::new(proto::SubscribeRequest {
        channel_ids: vec![channel_id.clone()],
        ..Default::default()
    });
    sub.metadata_mut().insert("authorization", auth("bob"));
    let mut feed = web.subscribe(sub).await.expect("subscribe").into_inner();

    let mut send = tonic::Request::new(proto::SendMessageRequest {
        channel_id: channel_id.clone(),
        body: "over grpc-web, HTTP/1.1 ✓".into(),
        ..Default::default()
    });
    send.metadata_mut().insert("authorization", auth("alice"));
    let sent = web
        .send_message(send)
        .await
        .expect("send")
        .into_inner()
        .message
        .expect("message");

    let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let ev = feed.message().await.expect("feed").expect("open");
            if let Some(proto::subscribe_response::Event::MessageCreated(m)) = ev.event {
                return (ev.sequence, m.message.expect("message"));
            }
        }
    })
    .await
    .expect("live message within 10 s");
    assert_eq!(got.1.id, sent.id);
    assert_eq!(got.1.body, "over grpc-web, HTTP/1.1 ✓");
    assert!(got.0 > 0);

    // And an error keeps its code through the translation.
    let mut bad = tonic::Request::new(proto::ListMessagesRequest {
        channel_id,
        ..Default::default()
    });
    bad.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", expired_token())
            .parse()
            .expect("header"),
    );
    let err = web.list_messages(bad).await.expect_err("expired");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[test]
fn allowed_origins_parse() {
    assert_eq!("".parse(), Ok(AllowedOrigins::None));
    assert_eq!(" * ".parse(), Ok(AllowedOrigins::Any));
    assert_eq!(
        "http://localhost:5173, https://app.example.com".parse(),
        Ok(AllowedOrigins::List(vec![
            "http://localhost:5173".into(),
            "https://app.example.com".into()
        ]))
    );
    for bad in [
        "*,http://a.example",
        "localhost:5173",
        "http://a.example/",
        "http://a.example/app",
        "ftp://a.example",
    ] {
        assert!(bad.parse::<AllowedOrigins>().is_err(), "{bad} accepted");
    }
}
