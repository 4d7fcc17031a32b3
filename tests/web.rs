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
                ..Default::default()
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

/// A grpc-web client transport over plain HTTP/1.1 (hyper under tonic-web's client layer).
fn grpc_web_http1() -> tonic_web::GrpcWebClientService<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic_web::GrpcWebCall<tonic::body::Body>,
    >,
> {
    tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http())
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
    let allowed: Vec<&str> = header(&h, "access-control-allow-headers")
        .split(',')
        .map(str::trim)
        .collect();
    for needed in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
    ] {
        assert!(
            allowed.contains(&needed),
            "{needed} missing from {allowed:?}"
        );
    }
    assert_eq!(header(&h, "access-control-allow-methods"), "POST");
    assert_eq!(header(&h, "access-control-max-age"), "7200");

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
    let exposed: Vec<&str> = header(&h, "access-control-expose-headers")
        .split(',')
        .map(str::trim)
        .collect();
    for needed in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(
            exposed.contains(&needed),
            "{needed} missing from {exposed:?}"
        );
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
    let svc = grpc_web_http1();
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
        "http://a.example?x",
        "ftp://a.example",
        "https://App.example",
        "https://a.example:443",
        "http://a.example:80",
        "http://user@a.example",
    ] {
        assert!(bad.parse::<AllowedOrigins>().is_err(), "{bad} accepted");
    }
}

/// Every RPC of every chat.v1 service, taken from the descriptor so a new RPC cannot be
/// forgotten: (path, client streaming, server streaming).
fn every_rpc() -> Vec<(String, bool, bool)> {
    let fds = <prost_types::FileDescriptorSet as prost::Message>::decode(
        chat_service::proto::FILE_DESCRIPTOR_SET,
    )
    .expect("descriptor set");
    let mut rpcs = Vec::new();
    for file in fds.file {
        for service in &file.service {
            for m in &service.method {
                rpcs.push((
                    format!("/{}.{}/{}", file.package(), service.name(), m.name()),
                    m.client_streaming(),
                    m.server_streaming(),
                ));
            }
        }
    }
    assert!(rpcs.len() >= 30, "{} RPCs", rpcs.len());
    rpcs
}

/// Calls `path` with an empty request and no token; the status, from the call or the stream.
async fn call_without_token<T>(
    grpc: &mut tonic::client::Grpc<T>,
    path: &str,
    client_streaming: bool,
    server_streaming: bool,
) -> tonic::Status
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if grpc.ready().await.is_err() {
        panic!("connection not ready");
    }
    let path: http::uri::PathAndQuery = path.parse().expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = match (client_streaming, server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(()), path, codec)
            .await
            .map(|_| ()),
        (false, true) => match grpc
            .server_streaming(tonic::Request::new(()), path, codec)
            .await
        {
            Ok(resp) => resp.into_inner().message().await.map(|_| ()),
            Err(e) => Err(e),
        },
        (true, false) => grpc
            .client_streaming(
                tonic::Request::new(futures::stream::iter([()])),
                path,
                codec,
            )
            .await
            .map(|_| ()),
        (true, true) => unreachable!("no bidirectional RPCs"),
    };
    result.expect_err("refused without a token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_a_call_without_a_token_on_every_transport() {
    let server = TestServer::start(Backend::Sqlite).await;
    let channel = server.channel().await;
    let mut grpc = tonic::client::Grpc::new(channel);
    let web = grpc_web_http1();
    let mut grpc_web =
        tonic::client::Grpc::with_origin(web, server.url().parse::<http::Uri>().expect("uri"));
    for (path, client_streaming, server_streaming) in every_rpc() {
        let s = call_without_token(&mut grpc, &path, client_streaming, server_streaming).await;
        assert_eq!(s.code(), tonic::Code::Unauthenticated, "gRPC {path}: {s:?}");
        if client_streaming {
            continue; // grpc-web has no client streaming
        }
        let s = call_without_token(&mut grpc_web, &path, false, server_streaming).await;
        assert_eq!(
            s.code(),
            tonic::Code::Unauthenticated,
            "grpc-web/1.1 {path}: {s:?}"
        );
    }
}

/// grpc-web-text (base64 frames), the mode of older grpc-web clients, on HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_text_works() {
    use base64::Engine as _;
    let server = server_allowing(PAGE).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = b64.encode(frame(&proto::CreateGroupRequest {
        name: "text mode".into(),
        ..Default::default()
    }));
    let (status, h, resp) = http1(
        &server,
        "POST",
        "/chat.v1.GroupService/CreateGroup",
        &[
            ("content-type", "application/grpc-web-text"),
            // grpc-web-text clients ask for a text answer; tonic-web answers in kind.
            ("accept", "application/grpc-web-text"),
            ("x-grpc-web", "1"),
            ("authorization", &format!("Bearer {}", token("alice"))),
        ],
        body.into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        header(&h, "content-type").starts_with("application/grpc-web-text"),
        "{h:?} {resp:?}"
    );
    // The body is base64, each frame padded on its own: decode it quad by quad (every four
    // characters decode independently), giving a data frame and then a trailer frame.
    let mut raw = Vec::new();
    for quad in resp.chunks(4) {
        raw.extend(b64.decode(quad).expect("base64"));
    }
    assert_eq!(raw[0], 0, "data frame first");
    let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
    let created =
        <proto::CreateGroupResponse as prost::Message>::decode(&raw[5..5 + len]).expect("response");
    assert_eq!(created.channel.expect("channel").name, "text mode");
    let trailer = &raw[5 + len..];
    assert_eq!(trailer[0], 0x80, "trailer frame");
    assert!(String::from_utf8_lossy(&trailer[5..]).contains("grpc-status:0"));
}
