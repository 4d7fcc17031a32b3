//! Request ids, trace context and log output, through the real binary (`chat-service serve`
//! with `LOG_FORMAT=json`) and a real server: the id a client sends (or the one made for it)
//! comes back in `x-request-id`, names the request's span in the JSON log lines together with
//! its method and W3C trace id, and is the one an `INTERNAL` status quotes. Bad `LOG_FORMAT`
//! and `METRICS_ADDR` values stop start-up with a line naming the variable.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chat_service::proto;
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `chat-service serve` in `dir`, with nothing from this process's environment but `env`.
fn serve_command(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-service"));
    cmd.arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/chat.db", dir.display()),
        )
        .env(
            "STORAGE_URL",
            format!("file://{}/attachments", dir.display()),
        )
        .env("JWT_SECRET", SECRET)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A running binary and its stderr, line by line.
struct Running {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Running {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Running {
        let mut child = serve_command(dir, env).spawn().expect("start chat-service");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// The next line for which `pick` answers something, within 30 seconds.
    async fn find<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .expect("the expected log line in time")
                .expect("the server exited");
            if let Some(found) = pick(&line) {
                return found;
            }
        }
    }

    /// The next JSON log line whose `message` is `message`.
    async fn json_line(&mut self, message: &str) -> serde_json::Value {
        self.find(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            (v["message"] == message).then_some(v)
        })
        .await
    }
}

/// A ChatService client for alice on `addr`.
async fn client(addr: &str) -> ChatClient {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    chat_service::proto::chat_service_client::ChatServiceClient::with_interceptor(
        channel,
        chat_service::cli::Bearer::new(&token("alice")).expect("token"),
    )
}

type ChatClient = chat_service::cli::ChatClient;

fn header(v: &str) -> MetadataValue<tonic::metadata::Ascii> {
    v.parse().expect("ascii")
}

/// The request span in a JSON log line: `span` (the innermost), which must also be in `spans`.
fn request_span(line: &serde_json::Value) -> &serde_json::Value {
    let span = &line["span"];
    assert_eq!(span["name"], "request", "{line}");
    let spans = line["spans"].as_array().expect("spans");
    assert!(spans.contains(span), "{line}");
    span
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_id_method_and_trace_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Running::start(
        dir.path(),
        &[
            ("LOG_FORMAT", "json"),
            // The per-call line ("call finished") is DEBUG under its own target.
            ("LOG_LEVEL", "info,chat_service::access=debug"),
            ("METRICS_ADDR", "127.0.0.1:0"),
        ],
    );
    let metrics = server
        .json_line("serving Prometheus metrics at /metrics")
        .await;
    let metrics_addr = metrics["metrics_addr"]
        .as_str()
        .expect("metrics_addr")
        .to_owned();
    let listening = server.json_line("chat-service listening").await;
    assert_eq!(listening["level"], "INFO");
    let addr = listening["addr"].as_str().expect("addr").to_owned();
    let mut alice = client(&addr).await;

    // The client's id and trace context.
    let mut req = tonic::Request::new(proto::GetUnreadCountsRequest {});
    req.metadata_mut()
        .insert("x-request-id", header("client-chosen-id-1"));
    req.metadata_mut()
        .insert("traceparent", header(TRACEPARENT));
    let resp = alice.get_unread_counts(req).await.expect("call");
    assert_eq!(
        resp.metadata().get("x-request-id").expect("echo"),
        "client-chosen-id-1"
    );
    let line = server
        .find(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            (v["span"]["request_id"] == "client-chosen-id-1").then_some(v)
        })
        .await;
    let span = request_span(&line);
    assert_eq!(span["method"], "/chat.v1.ChatService/GetUnreadCounts");
    assert_eq!(span["trace_id"], TRACE_ID);
    assert_eq!(line["message"], "call finished");
    assert_eq!(line["target"], "chat_service::access");
    assert_eq!(line["grpc_code"], "OK");
    assert!(line["seconds"].as_f64().expect("seconds") >= 0.0);

    // No id, a malformed traceparent (all-zero trace id): a new id, echoed, no trace id; the
    // echo also on a trailers-only error response.
    let mut req = tonic::Request::new(proto::GetMessageRequest {
        message_id: uuid::Uuid::now_v7().to_string(),
    });
    req.metadata_mut().insert(
        "traceparent",
        header("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    );
    let err = alice.get_message(req).await.expect_err("unknown id");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let made = err
        .metadata()
        .get("x-request-id")
        .expect("echo on an error")
        .to_str()
        .expect("ascii")
        .to_owned();
    uuid::Uuid::parse_str(&made).expect("a UUID");
    let line = server
        .find(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            (v["span"]["request_id"] == made.as_str()).then_some(v)
        })
        .await;
    let span = request_span(&line);
    assert_eq!(span["method"], "/chat.v1.ChatService/GetMessage");
    assert!(span.get("trace_id").is_none(), "{line}");
    assert_eq!(line["grpc_code"], "NotFound");

    // An id that is not sane (too long) is replaced.
    let mut req = tonic::Request::new(proto::GetUnreadCountsRequest {});
    req.metadata_mut()
        .insert("x-request-id", header(&"x".repeat(65)));
    let resp = alice.get_unread_counts(req).await.expect("call");
    let echoed = resp.metadata().get("x-request-id").expect("echo");
    uuid::Uuid::parse_str(echoed.to_str().expect("ascii")).expect("a new UUID");

    // The binary's metrics endpoint saw the calls.
    let body = reqwest_like_get(&metrics_addr).await;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let ok = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "grpc_server_handled_total"
                && s.labels.get("grpc_method") == Some("GetUnreadCounts")
                && s.labels.get("grpc_code") == Some("OK")
        })
        .expect("GetUnreadCounts counted");
    assert_eq!(ok.value, prometheus_parse::Value::Counter(2.0));

    server.child.kill().await.expect("kill");
}

/// `GET /metrics` on `addr` over HTTP/1.1; the body.
async fn reqwest_like_get(addr: &str) -> String {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let resp = client
        .get(format!("http://{addr}/metrics").parse().expect("uri"))
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

/// `line` without ANSI colour sequences (`ESC [ … m`), as the clients' harnesses read it.
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The default text format keeps the line the clients' harnesses and chat-bench look for
/// (`listening … addr=HOST:PORT`, once colours are stripped), and the address answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_keep_the_listening_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Running::start(dir.path(), &[("LOG_LEVEL", "info")]);
    let addr = server
        .find(|line| {
            let line = strip_colours(line);
            let rest = &line[line.find("listening")?..];
            let addr = rest[rest.find("addr=")? + 5..].split_whitespace().next()?;
            Some(addr.to_owned())
        })
        .await;
    let mut alice = client(&addr).await;
    alice
        .get_unread_counts(proto::GetUnreadCountsRequest {})
        .await
        .expect("call");
    server.child.kill().await.expect("kill");
}

/// Runs `serve` with `env` and expects it to stop at once; the first line of stderr.
async fn fails_to_start(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        serve_command(dir.path(), env).output(),
    )
    .await
    .expect("stops in time")
    .expect("run");
    assert!(!out.status.success(), "started anyway");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_log_format_stops_start_up() {
    let line = fails_to_start(&[("LOG_FORMAT", "xml")]).await;
    assert!(line.contains("LOG_FORMAT"), "{line}");
    assert!(line.contains("xml"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metrics_addr_stops_start_up() {
    let line = fails_to_start(&[("METRICS_ADDR", "not-an-address")]).await;
    assert!(line.contains("METRICS_ADDR"), "{line}");
    // A well-formed address that cannot be bound (taken).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let line = fails_to_start(&[("METRICS_ADDR", &addr)]).await;
    assert!(
        line.contains("METRICS_ADDR") && line.contains("cannot listen"),
        "{line}"
    );
}

/// A store failure answers `INTERNAL` naming the request's own id (the one echoed in
/// `x-request-id`, and logged with the error), never the database's message.
async fn internal_error_names_the_request_id(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ch = group(&server, "alice", &[]).await;
    server
        .db
        .execute("ALTER TABLE messages RENAME TO messages_gone")
        .await;
    let mut alice = server.chat(&token("alice")).await;
    let mut req = tonic::Request::new(proto::CountMessagesRequest { channel_id: ch });
    req.metadata_mut()
        .insert("x-request-id", header("broken-store-7"));
    let err = alice
        .count_messages(req)
        .await
        .expect_err("store is broken");
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(
        err.message().contains("request id broken-store-7"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("messages"), "{}", err.message());
    assert_eq!(
        err.metadata().get("x-request-id").expect("echo"),
        "broken-store-7"
    );
}

on_every_backend!(internal_error_names_the_request_id);
