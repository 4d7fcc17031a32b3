//! Assembles the gRPC server: ChatService, GroupService and AttachmentService behind the auth
//! layer, plus health and reflection (no auth, so probes and `grpcurl list` work), all on one
//! listener that speaks gRPC (HTTP/2) and grpc-web (HTTP/1.1 and HTTP/2) with CORS.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::attachment::AttachmentApi;
use crate::api::auth::AuthInterceptor;
use crate::api::chat::ChatApi;
use crate::api::group::GroupApi;
use crate::auth::Verifier;
use crate::domain::Chat;
use crate::proto::attachment_service_server::AttachmentServiceServer;
use crate::proto::chat_service_server::ChatServiceServer;
use crate::proto::group_service_server::GroupServiceServer;

/// Largest HTTP/2 frame a client may send: 64 KiB, against the protocol's (and hyper's) default
/// of 16 KiB, so a 1 MiB upload frame arrives in 16 HTTP/2 frames rather than 64.
pub const H2_MAX_FRAME_BYTES: u32 = 64 * 1024;

/// Largest message AttachmentService decodes: a 1 MiB chunk plus 64 KiB for the rest of the
/// frame. Larger frames are refused by tonic with `RESOURCE_EXHAUSTED`.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Browser origins allowed to call over grpc-web (`CORS_ALLOWED_ORIGINS`).
///
/// Parsed from a comma-separated list of exact origins (`scheme://host[:port]`, no path, as a
/// browser sends them in `Origin`), or `*` alone for any origin. Empty means no cross-origin
/// calls (same-origin pages and non-browser clients are unaffected).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// No `Access-Control-Allow-Origin` is ever sent.
    #[default]
    None,
    /// `*`: every origin.
    Any,
    /// These origins, compared byte for byte with the request's `Origin`.
    List(Vec<String>),
}

impl FromStr for AllowedOrigins {
    type Err = String;

    /// Errors: `*` mixed with origins, or an entry that is not `http(s)://host[:port]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let entries: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Ok(AllowedOrigins::None);
        }
        if entries.contains(&"*") {
            return if entries.len() == 1 {
                Ok(AllowedOrigins::Any)
            } else {
                Err("`*` must stand alone".into())
            };
        }
        let mut origins = Vec::with_capacity(entries.len());
        for e in entries {
            if !is_serialized_origin(e) {
                return Err(format!(
                    "`{e}` is not an origin as browsers send it: write scheme://host[:port] in \
                     lower case, without a path, query, user or default port"
                ));
            }
            origins.push(e.to_owned());
        }
        Ok(AllowedOrigins::List(origins))
    }
}

/// Whether `e` is an origin exactly as a browser serializes it in `Origin` (RFC 6454 §6.1):
/// `http` or `https`, a lower-case host, a port only when not the scheme's default, nothing
/// else. Anything else could never match byte for byte.
fn is_serialized_origin(e: &str) -> bool {
    let Ok(uri) = e.parse::<http::Uri>() else {
        return false;
    };
    let Some(authority) = uri.authority() else {
        return false;
    };
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return false,
    };
    // `http::Uri` reports the path "/" for both "" and "/", so compare the text itself.
    e == format!("{}://{}", uri.scheme_str().unwrap_or_default(), authority)
        && e == e.to_ascii_lowercase()
        && !authority.as_str().contains('@')
        && !authority.host().is_empty()
        && authority.port_u16() != Some(default_port)
}

/// The HTTP version a request arrived on (a request extension), so the auth layer can tell
/// HTTP/1.1 grpc-web calls from the rest (see [`crate::api::auth`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpVersion(pub http::Version);

fn mark_http_version(
    mut req: http::Request<tonic::body::Body>,
) -> http::Request<tonic::body::Body> {
    let version = req.version();
    req.extensions_mut().insert(HttpVersion(version));
    req
}

/// Request headers a grpc-web client may send cross-origin (answered in preflight).
const CORS_ALLOW_HEADERS: [&str; 10] = [
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "grpc-encoding",
    "connect-protocol-version",
    // Request ids and W3C trace context (crate::telemetry).
    "x-request-id",
    "traceparent",
];

/// Response headers a page may read: without them a browser reports every error of a
/// trailers-only response (such as `UNAUTHENTICATED`) as `UNKNOWN`.
const CORS_EXPOSE_HEADERS: [&str; 5] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "x-request-id",
];

/// The CORS layer for `origins`: POST only, the grpc-web headers, preflight cached 2 h (the
/// most Chromium honours).
fn cors(origins: &AllowedOrigins) -> CorsLayer {
    let allow_origin = match origins {
        AllowedOrigins::None => AllowOrigin::list(Vec::<HeaderValue>::new()),
        AllowedOrigins::Any => AllowOrigin::any(),
        AllowedOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::POST])
        .allow_headers(CORS_ALLOW_HEADERS.map(HeaderName::from_static))
        .expose_headers(CORS_EXPOSE_HEADERS.map(HeaderName::from_static))
        .max_age(Duration::from_secs(7_200))
}

/// Transport settings of [`serve`] beyond the services themselves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Origins allowed to call over grpc-web from a browser.
    pub cors_allowed_origins: AllowedOrigins,
    /// How long calls still open at shutdown may go on before they end with `UNAVAILABLE`
    /// (`SHUTDOWN_DRAIN_SECONDS`; see [`crate::shutdown`]).
    pub drain_period: Duration,
    /// HTTP/2 streams one connection may have open at once (`MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// How long a unary call may take before it is answered `DEADLINE_EXCEEDED`
    /// (`UNARY_TIMEOUT_SECONDS`).
    pub unary_timeout: Duration,
}

/// Default `MAX_CONCURRENT_STREAMS`: calls one HTTP/2 connection may have open at once. A
/// client past it waits for a stream to end (HTTP/2 flow control), it is not refused.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// Default `UNARY_TIMEOUT_SECONDS`: 30 s. A unary call still running then is answered
/// `DEADLINE_EXCEEDED`; a change already committing still commits (see [`crate::api`]).
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            cors_allowed_origins: AllowedOrigins::None,
            drain_period: crate::shutdown::DEFAULT_DRAIN,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            unary_timeout: DEFAULT_UNARY_TIMEOUT,
        }
    }
}

/// Aborts a background task of [`serve`] when `serve` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long [`serve`] waits for connections to close once the drain period is over (their
/// calls have ended by then; this covers the last frames on the wire).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves on `listener` until `shutdown` resolves; then live feeds end cleanly, health
/// reports `NOT_SERVING`, and calls still open get `options.drain_period` to finish before they
/// end with `UNAVAILABLE` ([`crate::shutdown`]); this returns once every connection has closed,
/// or shortly after the drain period whatever the clients do. The listener takes gRPC over HTTP/2 and grpc-web over
/// HTTP/1.1 or HTTP/2 (tonic-web translates; CORS per `options`).
///
/// Errors: the transport's, when serving fails.
pub async fn serve(
    listener: TcpListener,
    chat: Arc<Chat>,
    verifier: Arc<Verifier>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let auth = AuthInterceptor::new(verifier);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ChatServiceServer<ChatApi>>().await;
    health.set_serving::<GroupServiceServer<GroupApi>>().await;
    health
        .set_serving::<AttachmentServiceServer<AttachmentApi>>()
        .await;
    // Both reflection versions: grpcurl and other tools before 2023 speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection()
        .build_v1()
        .and_then(|v1| reflection().build_v1alpha().map(|alpha| (v1, alpha)))
        .map_err(|e| {
            tracing::error!(error = %e, "reflection descriptors are broken");
            e
        });
    let hub = chat.hub().clone();
    let drain = crate::shutdown::Drain::new();
    // Without TCP_NODELAY a small response waits for the peer's delayed ACK (Nagle): ~40 ms
    // added to every unary call that follows another on the same connection.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
        })
    });
    let mut router = Server::builder()
        .max_frame_size(H2_MAX_FRAME_BYTES)
        .max_concurrent_streams(options.max_concurrent_streams)
        // grpc-web from browsers arrives over HTTP/1.1 as often as HTTP/2.
        .accept_http1(true)
        // Outermost first: CORS answers preflight before grpc-web translation sees it.
        .layer(cors(&options.cors_allowed_origins))
        // Before tonic-web, which presents every request to the services as HTTP/2.
        .layer(tower::util::MapRequestLayer::new(mark_http_version))
        .layer(tonic_web::GrpcWebLayer::new())
        // Inside tonic-web, so it sees grpc-web calls as native gRPC: request id, span,
        // metrics by method and status (crate::telemetry).
        .layer(crate::telemetry::RequestLayer)
        // Inside grpc-web, so a cut call's UNAVAILABLE trailers are translated for browsers.
        .layer(crate::shutdown::DrainLayer(drain.clone()))
        // A request over the message limit: RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE.
        .layer(tower::util::MapResponseLayer::new(
            crate::api::oversize_response::<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(ChatServiceServer::with_interceptor(
            ChatApi::new(chat.clone(), options.unary_timeout),
            auth.clone(),
        ))
        .add_service(GroupServiceServer::with_interceptor(
            GroupApi::new(chat.clone(), options.unary_timeout),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // Frames carry at most 1 MiB of data; allow that plus protobuf framing, no more.
            AttachmentServiceServer::new(AttachmentApi::new(chat.clone(), options.unary_timeout))
                .max_decoding_message_size(MAX_FRAME_BYTES)
                .max_encoding_message_size(MAX_FRAME_BYTES),
            auth,
        ));
    if let Ok((v1, v1alpha)) = reflection {
        router = router.add_service(v1).add_service(v1alpha);
    }
    let period = options.drain_period;
    let draining = drain.clone();
    let serving = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        tracing::info!(
            drain_seconds = period.as_secs_f64(),
            "shutting down: ending live feeds, draining open calls"
        );
        health.set_not_serving::<ChatServiceServer<ChatApi>>().await;
        health
            .set_not_serving::<GroupServiceServer<GroupApi>>()
            .await;
        health
            .set_not_serving::<AttachmentServiceServer<AttachmentApi>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        hub.shutdown();
        tokio::spawn(async move { draining.run(period).await });
    });
    // Rate-limit state follows active users only.
    let limits = chat.clone();
    let forget = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            limits.limits().forget_idle();
        }
    });
    let _forget = AbortOnDrop(forget);
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => return r,
        _ = drain.over() => {}
    }
    // Every call has been ended; a connection whose client does not read its last frames
    // must not hold the process either.
    match tokio::time::timeout(CLOSE_GRACE, serving).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                "connections still open after the drain period (clients not reading); they close when the process exits"
            );
            Ok(())
        }
    }
}
