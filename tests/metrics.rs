//! Prometheus metrics on a real server: after a known workload, a scrape of `GET /metrics`
//! (parsed as Prometheus text, not searched) shows exactly that workload: calls by method and
//! code (native gRPC and grpc-web), latency histograms, the open-feed gauge, events delivered,
//! group-commit batches and the database pools. On SQLite and PostgreSQL.
//!
//! The recorder is one per process, so this file is its own test binary, and its tests hold
//! [`SERIAL`] and compare a scrape before with one after: under `cargo test` (one process for
//! the binary) the two backends' tests would otherwise count each other's calls.

mod common;

use std::time::Duration;

use chat_service::proto;
use chat_service::proto::attachment_service_client::AttachmentServiceClient;
use chat_service::proto::chat_service_client::ChatServiceClient;
use common::*;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_parse::{Sample, Scrape, Value};
use tonic::metadata::MetadataValue;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CHAT: &str = "chat.v1.ChatService";

/// A server with `opts` and its metrics endpoint.
async fn metrics_server(backend: Backend, opts: Options) -> TestServer {
    TestServer::start_with(
        backend,
        Options {
            metrics: true,
            ..opts
        },
    )
    .await
}

/// `GET /metrics`, parsed.
async fn scrape(server: &TestServer) -> Scrape {
    let addr = server.metrics_addr.expect("metrics are on");
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let resp = client
        .get(format!("http://{addr}/metrics").parse().expect("uri"))
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().expect("ascii");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The sample of `metric` whose labels are exactly `labels`.
fn find<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    s.samples.iter().find(|x| {
        x.metric == metric
            && x.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
    })
}

/// A counter's, gauge's or untyped sample's value; 0 when absent (never touched).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).map(|x| &x.value) {
        None => 0.0,
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(other) => panic!("{metric} is not a single value: {other:?}"),
    }
}

/// A histogram's observations: its `_count`, which must equal its `+Inf` bucket.
fn observations(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let count = value(s, &format!("{metric}_count"), labels);
    let inf = match find(s, metric, labels).map(|x| &x.value) {
        None => 0.0,
        Some(Value::Histogram(buckets)) => {
            assert!(
                buckets.windows(2).all(|w| w[0].count <= w[1].count),
                "cumulative buckets: {buckets:?}"
            );
            buckets
                .iter()
                .find(|b| b.less_than == f64::INFINITY)
                .expect("+Inf bucket")
                .count
        }
        Some(other) => panic!("{metric} is not a histogram: {other:?}"),
    };
    assert_eq!(count, inf, "{metric}{labels:?}: _count and the +Inf bucket");
    count
}

fn rpc<'a>(method: &'a str, kind: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("grpc_service", CHAT),
        ("grpc_method", method),
        ("grpc_type", kind),
    ]
}

fn handled(s: &Scrape, method: &str, kind: &str, code: &str) -> f64 {
    let [a, b, c] = rpc(method, kind);
    value(
        s,
        "grpc_server_handled_total",
        &[a, b, c, ("grpc_code", code)],
    )
}

/// Scrapes until `done` holds for the scrape (a state the server reaches by itself once a
/// client went away), for at most 10 seconds.
async fn scrape_until(server: &TestServer, done: impl Fn(&Scrape) -> bool) -> Scrape {
    for _ in 0..200 {
        let s = scrape(server).await;
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the scrape never reached the expected state");
}

/// Exactly N sends, M NOT_FOUNDs (two native, one grpc-web), one Subscribe receiving K
/// events: every count moves by exactly that.
async fn counts_calls_feeds_and_commits(backend: Backend) {
    const N: usize = 5;
    let _serial = SERIAL.lock().await;
    let server = metrics_server(
        backend,
        Options {
            // No heartbeat during the test: the feed gets exactly the N messages.
            heartbeat: Duration::from_secs(3600),
            ..Options::default()
        },
    )
    .await;
    let ch = group(&server, "alice", &["bob"]).await;
    let before = scrape(&server).await;

    let mut bob = server.chat(&token("bob")).await;
    let mut feed = bob
        .subscribe(proto::SubscribeRequest {
            channel_ids: vec![ch.clone()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut alice = server.chat(&token("alice")).await;
    for i in 0..N {
        send(&mut alice, &ch, &format!("message {i}")).await;
    }
    for _ in 0..2 {
        let unknown = uuid::Uuid::now_v7().to_string();
        let err = alice
            .get_message(proto::GetMessageRequest {
                message_id: unknown,
            })
            .await
            .expect_err("unknown id");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
    // The third NOT_FOUND over grpc-web on HTTP/1.1: counted as the same native method.
    let web_transport = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let mut web = ChatServiceClient::with_origin(web_transport, server.url().parse().expect("uri"));
    let mut req = tonic::Request::new(proto::GetMessageRequest {
        message_id: uuid::Uuid::now_v7().to_string(),
    });
    let bearer: MetadataValue<_> = format!("Bearer {}", token("alice"))
        .parse()
        .expect("header");
    req.metadata_mut().insert("authorization", bearer);
    let err = web.get_message(req).await.expect_err("unknown id");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let mut sequences = Vec::new();
    for _ in 0..N {
        let ev = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("event in time")
            .expect("open")
            .expect("event");
        assert!(matches!(
            ev.event,
            Some(proto::subscribe_response::Event::MessageCreated(_))
        ));
        sequences.push(ev.sequence);
    }
    assert!(
        sequences.windows(2).all(|w| w[1] == w[0] + 1),
        "{sequences:?}"
    );

    // While the feed is open.
    let open = scrape(&server).await;
    let delta = |after: &Scrape, metric: &str, labels: &[(&str, &str)]| {
        value(after, metric, labels) - value(&before, metric, labels)
    };
    let hist_delta = |after: &Scrape, metric: &str, labels: &[(&str, &str)]| {
        observations(after, metric, labels) - observations(&before, metric, labels)
    };
    assert_eq!(delta(&open, "chat_feeds_open", &[]), 1.0);
    assert_eq!(
        delta(&open, "chat_feed_events_total", &[]),
        N as f64,
        "events delivered"
    );
    assert_eq!(delta(&open, "chat_feed_heartbeats_total", &[]), 0.0);
    assert_eq!(
        delta(
            &open,
            "grpc_server_started_total",
            &rpc("SendMessage", "unary")
        ),
        N as f64
    );
    assert_eq!(
        handled(&open, "SendMessage", "unary", "OK")
            - handled(&before, "SendMessage", "unary", "OK"),
        N as f64
    );
    assert_eq!(
        hist_delta(
            &open,
            "grpc_server_handling_seconds",
            &rpc("SendMessage", "unary")
        ),
        N as f64
    );
    assert_eq!(
        handled(&open, "GetMessage", "unary", "NotFound")
            - handled(&before, "GetMessage", "unary", "NotFound"),
        3.0,
        "two native calls and one grpc-web call"
    );
    assert_eq!(
        handled(&open, "GetMessage", "unary", "OK") - handled(&before, "GetMessage", "unary", "OK"),
        0.0
    );
    assert_eq!(
        hist_delta(
            &open,
            "grpc_server_handling_seconds",
            &rpc("GetMessage", "unary")
        ),
        3.0
    );
    let subscribe = rpc("Subscribe", "server_stream");
    assert_eq!(delta(&open, "grpc_server_started_total", &subscribe), 1.0);
    // Still open: not handled yet.
    assert_eq!(
        hist_delta(&open, "grpc_server_handling_seconds", &subscribe),
        0.0
    );
    // Group commit: every message in some batch, each batch timed.
    let batches = hist_delta(&open, "chat_commit_batch_messages", &[]);
    assert!((1.0..=N as f64).contains(&batches), "{batches} batches");
    assert_eq!(
        delta(&open, "chat_commit_batch_messages_sum", &[]),
        N as f64,
        "messages committed"
    );
    assert_eq!(hist_delta(&open, "chat_commit_seconds", &[]), batches);
    let acquired = hist_delta(&open, "chat_db_acquire_seconds", &[("pool", "write")]);
    assert!(
        acquired >= batches,
        "{acquired} waits for {batches} batches"
    );
    // Pools, sampled at the scrape.
    let max_write = match backend {
        Backend::Sqlite => 1.0,
        // MySQL: as PostgreSQL, until the MySQL store says otherwise.
        Backend::Postgres | Backend::Mysql => 16.0,
    };
    assert_eq!(
        value(&open, "chat_db_pool_max_connections", &[("pool", "write")]),
        max_write
    );
    for pool in ["write", "read"] {
        let size = value(&open, "chat_db_pool_connections", &[("pool", pool)]);
        let idle = value(&open, "chat_db_pool_idle_connections", &[("pool", pool)]);
        let in_use = value(&open, "chat_db_pool_in_use_connections", &[("pool", pool)]);
        assert!(size >= 1.0, "{pool}: {size} connections");
        assert_eq!(idle + in_use, size, "{pool}");
    }

    // The client goes away: the feed closes and its call counts as cancelled.
    drop(feed);
    let closed = scrape_until(&server, |s| {
        value(s, "chat_feeds_open", &[]) == value(&before, "chat_feeds_open", &[])
            && handled(s, "Subscribe", "server_stream", "Canceled")
                > handled(&before, "Subscribe", "server_stream", "Canceled")
    })
    .await;
    assert_eq!(
        handled(&closed, "Subscribe", "server_stream", "Canceled")
            - handled(&before, "Subscribe", "server_stream", "Canceled"),
        1.0
    );
    assert_eq!(
        hist_delta(&closed, "grpc_server_handling_seconds", &subscribe),
        1.0
    );
    // Nothing else happened meanwhile.
    assert_eq!(delta(&closed, "chat_feed_events_total", &[]), N as f64);
    assert_eq!(
        delta(
            &closed,
            "grpc_server_started_total",
            &rpc("SendMessage", "unary")
        ),
        N as f64
    );
    // Every metric has its HELP text.
    for name in [
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "chat_feeds_open",
        "chat_feed_events_total",
        "chat_commit_batch_messages",
        "chat_db_pool_connections",
    ] {
        assert!(closed.docs.contains_key(name), "HELP of {name}");
    }
    server.stop().await;
}

/// Uploaded and downloaded bytes, and the open-stream gauge, move by what was streamed.
async fn counts_attachment_bytes(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let server = metrics_server(backend, Options::default()).await;
    let ch = group(&server, "alice", &[]).await;
    let before = scrape(&server).await;
    let mut files = AttachmentServiceClient::with_interceptor(
        server.channel().await,
        chat_service::cli::Bearer::new(&token("alice")).expect("token"),
    );
    let data = vec![7u8; 300_000];
    let frames = vec![
        proto::UploadAttachmentRequest {
            data: Some(proto::upload_attachment_request::Data::Metadata(
                proto::AttachmentMetadata {
                    channel_id: ch.clone(),
                    file_name: "seven.bin".into(),
                    size_bytes: data.len() as i64,
                    ..Default::default()
                },
            )),
        },
        proto::UploadAttachmentRequest {
            data: Some(proto::upload_attachment_request::Data::Chunk(
                data[..100_000].to_vec().into(),
            )),
        },
        proto::UploadAttachmentRequest {
            data: Some(proto::upload_attachment_request::Data::Chunk(
                data[100_000..].to_vec().into(),
            )),
        },
    ];
    let attachment = files
        .upload_attachment(futures::stream::iter(frames))
        .await
        .expect("upload")
        .into_inner()
        .attachment
        .expect("attachment");
    let mut down = files
        .download_attachment(proto::DownloadAttachmentRequest {
            attachment_id: attachment.id.clone(),
            offset: 0,
        })
        .await
        .expect("download")
        .into_inner();
    let mut got = 0usize;
    while let Some(frame) = down.next().await {
        if let Some(proto::download_attachment_response::Data::Chunk(c)) =
            frame.expect("frame").data
        {
            got += c.len();
        }
    }
    assert_eq!(got, data.len());
    let delta = |after: &Scrape, metric: &str, labels: &[(&str, &str)]| {
        value(after, metric, labels) - value(&before, metric, labels)
    };
    let after = scrape_until(&server, |s| {
        value(s, "chat_streams_open", &[("stream", "download")])
            == value(&before, "chat_streams_open", &[("stream", "download")])
    })
    .await;
    assert_eq!(
        delta(&after, "chat_upload_bytes_total", &[]),
        data.len() as f64
    );
    assert_eq!(
        delta(&after, "chat_download_bytes_total", &[]),
        data.len() as f64
    );
    assert_eq!(
        delta(&after, "chat_streams_open", &[("stream", "upload")]),
        0.0
    );
    let upload = [
        ("grpc_service", "chat.v1.AttachmentService"),
        ("grpc_method", "UploadAttachment"),
        ("grpc_type", "client_stream"),
        ("grpc_code", "OK"),
    ];
    assert_eq!(delta(&after, "grpc_server_handled_total", &upload), 1.0);
    server.stop().await;
}

/// Paths outside the served API share one `unknown` label set; health is counted under its
/// own service.
async fn unknown_paths_share_one_label_set(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let server = metrics_server(backend, Options::default()).await;
    let before = scrape(&server).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/chat.v1.NoSuchService/Nothing");
    let err = grpc
        .unary(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health");
    let after = scrape(&server).await;
    let unknown = [
        ("grpc_service", "unknown"),
        ("grpc_method", "unknown"),
        ("grpc_type", "unknown"),
        ("grpc_code", "Unimplemented"),
    ];
    assert_eq!(
        value(&after, "grpc_server_handled_total", &unknown)
            - value(&before, "grpc_server_handled_total", &unknown),
        1.0
    );
    let check = [
        ("grpc_service", "grpc.health.v1.Health"),
        ("grpc_method", "Check"),
        ("grpc_type", "unary"),
        ("grpc_code", "OK"),
    ];
    assert_eq!(
        value(&after, "grpc_server_handled_total", &check)
            - value(&before, "grpc_server_handled_total", &check),
        1.0
    );
    assert!(
        !after
            .samples
            .iter()
            .any(|s| s.labels.get("grpc_service") == Some("chat.v1.NoSuchService")),
        "no label set per unknown path"
    );
    server.stop().await;
}

/// Limit refusals are counted by limit: three sends past a burst of two, one feed past a limit
/// of one.
async fn counts_limit_refusals(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let server = metrics_server(
        backend,
        Options {
            limits: chat_service::limits::LimitSettings {
                sends_per_second: 0.001,
                sends_burst: 2,
                feeds_per_user: 1,
                ..chat_service::limits::LimitSettings::unlimited()
            },
            ..Options::default()
        },
    )
    .await;
    let before = scrape(&server).await;
    let ch = group(&server, "alice", &[]).await;
    let mut alice = server.chat(&token("alice")).await;
    for i in 0..5 {
        let r = alice
            .send_message(proto::SendMessageRequest {
                channel_id: ch.clone(),
                body: format!("m{i}"),
                ..Default::default()
            })
            .await;
        assert_eq!(r.is_ok(), i < 2, "send {i}: {r:?}");
    }
    let _feed = alice
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect("one feed");
    alice
        .subscribe(proto::SubscribeRequest::default())
        .await
        .expect_err("a second feed");
    let after = scrape(&server).await;
    let refused = |limit: &str| {
        value(&after, "chat_limit_refusals_total", &[("limit", limit)])
            - value(&before, "chat_limit_refusals_total", &[("limit", limit)])
    };
    assert_eq!((refused("send_rate"), refused("feeds")), (3.0, 1.0));
    assert_eq!(
        handled(&after, "SendMessage", "unary", "ResourceExhausted")
            - handled(&before, "SendMessage", "unary", "ResourceExhausted"),
        3.0
    );
    server.stop().await;
}

on_every_backend!(
    counts_limit_refusals,
    counts_calls_feeds_and_commits,
    counts_attachment_bytes,
    unknown_paths_share_one_label_set
);
