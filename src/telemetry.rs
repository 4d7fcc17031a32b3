//! What operators see of each request: its id, its span in the logs, its metrics; and the log
//! output itself (`LOG_FORMAT`).
//!
//! [`RequestLayer`] wraps the gRPC services (inside tonic-web, so grpc-web calls are native
//! gRPC by then). For each request it:
//!
//! - takes the client's `x-request-id` when sane (1 to 64 visible ASCII characters), else makes
//!   a UUIDv7, and echoes it in the response header `x-request-id`;
//! - opens an `INFO` span `request` with `request_id`, `method` (the gRPC path,
//!   `/chat.v1.ChatService/SendMessage`) and, when the client sent a valid W3C `traceparent`,
//!   `trace_id`; every log line of the call carries them;
//! - sets the id as a task-local ([`current_request_id`]), which the `INTERNAL` / `UNAVAILABLE`
//!   mapping in [`crate::error`] quotes, so the id a client sees is the one in the log;
//! - counts the call in `grpc_server_*` ([`crate::metrics`]) with the status it ended with:
//!   from the response headers (a trailers-only response) or from the trailers at the end of the
//!   body (every stream, and unary calls that succeed). A call whose body is dropped before its
//!   status (the client went away) counts as `Canceled`.
//!
//! The span and the id live in the response future and in the response body, so they cover
//! the handler and a streaming response's polling (a Subscribe feed, a download). Work a handler
//! moves to a task of its own keeps them through [`in_request`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use tracing::{Instrument, Span};

use crate::metrics::GrpcMethod;

/// The id of a request, as logged and as sent back in `x-request-id`.
pub type RequestId = Arc<str>;

tokio::task_local! {
    static REQUEST_ID: RequestId;
}

/// The response header (and the request header a client may set) carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest client-chosen request id kept, in bytes (visible ASCII, so also characters).
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// The id of the request this task is serving, if any.
pub fn current_request_id() -> Option<RequestId> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// The id of the request this task is serving, or a fresh UUIDv7 outside any request (a
/// background job), so an error can always name the id it was logged with.
pub fn request_id_or_new() -> RequestId {
    current_request_id().unwrap_or_else(|| Arc::from(uuid::Uuid::now_v7().to_string()))
}

/// `fut` in the current request's span and with its id: for work spawned onto a task of its
/// own (`tokio::spawn(in_request(async move { … }))`), which otherwise would log without them
/// and map its errors under a fresh id. Outside a request, `fut` runs in the current span only.
pub fn in_request<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let span = Span::current();
    let id = current_request_id();
    async move {
        let fut = fut.instrument(span);
        match id {
            Some(id) => REQUEST_ID.scope(id, fut).await,
            None => fut.await,
        }
    }
}

/// Runs `f` with the request's id set as the task-local.
fn scoped<R>(id: &RequestId, f: impl FnOnce() -> R) -> R {
    REQUEST_ID.sync_scope(id.clone(), f)
}

/// Whether a client's `x-request-id` is kept: 1 to [`MAX_REQUEST_ID_BYTES`] visible ASCII
/// characters (`!` to `~`); anything else is replaced by a new id.
pub fn is_sane_request_id(v: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&v.len()) && v.iter().all(u8::is_ascii_graphic)
}

/// The parts of a W3C `traceparent` header this service uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id: 32 lower-case hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span id (`parent-id`): 16 lower-case hex digits, not all zero.
    pub parent_id: String,
    /// `trace-flags`, of which bit 0 is `sampled`.
    pub flags: u8,
}

/// Parses a `traceparent` header value per W3C Trace Context (Level 1, §3.2:
/// `version-traceid-parentid-flags`, each lower-case hex). `None` for anything malformed,
/// which callers ignore: version `ff`; a version-00 value that is not exactly 55 characters; a
/// later version whose 55th character is not the end or a `-` (later versions may append
/// fields, which are skipped); upper-case hex; an all-zero trace id or parent id.
pub fn parse_traceparent(value: &[u8]) -> Option<TraceParent> {
    let v = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    let b = v.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace_id, parent_id, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    if !(hex(version) && hex(trace_id) && hex(parent_id) && hex(flags)) || version == "ff" {
        return None;
    }
    match (version, b.get(55)) {
        (_, None) => {}
        ("00", Some(_)) => return None,
        (_, Some(b'-')) => {}
        (_, Some(_)) => return None,
    }
    let zero = |s: &str| s.bytes().all(|c| c == b'0');
    if zero(trace_id) || zero(parent_id) {
        return None;
    }
    Some(TraceParent {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

/// The status code in `grpc-status`; `Unknown` (2) when it is not a number.
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status").map(|v| {
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2)
    })
}

/// A request in flight: what its future and its body carry until its status is known.
struct Call {
    id: RequestId,
    span: Span,
    metrics: Option<&'static GrpcMethod>,
    start: Instant,
    done: bool,
}

impl Call {
    /// Reads the request's id, trace context and method; counts the start.
    fn start<B>(req: &http::Request<B>) -> (Call, HeaderValue) {
        let headers = req.headers();
        let (id, echo): (RequestId, HeaderValue) = match headers
            .get(REQUEST_ID_HEADER)
            .filter(|v| is_sane_request_id(v.as_bytes()))
        {
            // Visible ASCII, so `to_str` holds.
            Some(v) => (Arc::from(v.to_str().unwrap_or_default()), v.clone()),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let echo = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static(""));
                (Arc::from(id), echo)
            }
        };
        let trace = headers
            .get("traceparent")
            .and_then(|v| parse_traceparent(v.as_bytes()));
        let path = req.uri().path();
        let span = tracing::info_span!(
            "request",
            request_id = &*id,
            method = path,
            trace_id = trace.as_ref().map(|t| t.trace_id.as_str()),
        );
        let call = Call {
            id,
            span,
            metrics: crate::metrics::grpc_started(path),
            start: Instant::now(),
            done: false,
        };
        (call, echo)
    }

    /// The call ended with status `code`: counted once, and logged at `DEBUG` under the
    /// target `chat_service::access` (enable with `LOG_LEVEL=info,chat_service::access=debug`).
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let took = self.start.elapsed();
        if let Some(m) = self.metrics {
            m.handled(code, took);
        }
        let _in = self.span.enter();
        tracing::debug!(
            target: "chat_service::access",
            grpc_code = crate::metrics::code_name(code),
            seconds = took.as_secs_f64(),
            "call finished"
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The future or the body went away before a status: the client cancelled.
        self.finish(tonic::Code::Cancelled as i32);
    }
}

/// The request layer (see the module docs). Place it inside `GrpcWebLayer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLayer;

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> RequestService<S> {
        RequestService { inner }
    }
}

/// The service [`RequestLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequestService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RequestService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RequestBody<ResBody>>;
    type Error = S::Error;
    type Future = RequestFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let (call, echo) = Call::start(&req);
        let inner = {
            let _in = call.span.enter();
            scoped(&call.id, || self.inner.call(req))
        };
        RequestFuture {
            inner,
            call: Some(call),
            echo,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RequestService`].
    pub struct RequestFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
        echo: HeaderValue,
    }
}

impl<F, B, E> Future for RequestFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<RequestBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_mut() else {
            panic!("RequestFuture polled after it completed");
        };
        let out = {
            let _in = call.span.enter();
            ready!(scoped(&call.id, || this.inner.poll(cx)))
        };
        let mut call = this.call.take();
        Poll::Ready(match out {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                parts.headers.insert(
                    REQUEST_ID_HEADER,
                    std::mem::replace(this.echo, HeaderValue::from_static("")),
                );
                // A trailers-only response: the status is in the headers, the body is empty.
                if let (Some(code), Some(c)) = (grpc_status(&parts.headers), call.as_mut()) {
                    c.finish(code);
                    call = None;
                }
                Ok(http::Response::from_parts(
                    parts,
                    RequestBody { inner: body, call },
                ))
            }
            Err(e) => {
                if let Some(c) = call.as_mut() {
                    c.finish(tonic::Code::Unknown as i32);
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body in its request's span and id; it reads the status from the trailers.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: http_body::Body> http_body::Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let Some(call) = this.call.as_mut() else {
            return this.inner.poll_frame(cx);
        };
        let polled = {
            let _in = call.span.enter();
            scoped(&call.id, || this.inner.poll_frame(cx))
        };
        let code = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                Some(trailers) => grpc_status(trailers).unwrap_or(tonic::Code::Unknown as i32),
                None => return polled,
            },
            // A broken body, or one that ended without trailers: no status reached the client.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => tonic::Code::Unknown as i32,
        };
        call.finish(code);
        *this.call = None;
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// Log output.

/// How log lines are written to stderr (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format, with colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level; the innermost span as `span` and every open span as `spans`
    /// (each with its `name` and fields: the request's `request_id`, `method`, `trace_id`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    /// `text` or `json`. Errors: anything else.
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?}: use text or json")),
        }
    }
}

/// Installs the process's log output: `filter` (`LOG_LEVEL`: a level or tracing directives)
/// in `format`, to stderr.
///
/// Errors: one line naming `LOG_LEVEL` when the filter does not parse; a message when a
/// subscriber was installed already.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("LOG_LEVEL: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    }
    .map_err(|e| format!("cannot install logging: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_valid() {
        let t = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        // Later versions may append fields after a dash.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes";
        assert!(parse_traceparent(future.as_bytes()).is_some());
        assert!(parse_traceparent(format!(" {VALID}\t").as_bytes()).is_some());
    }

    #[test]
    fn traceparent_malformed_is_ignored() {
        for bad in [
            "",
            "00",
            // All-zero trace id, all-zero parent id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid; upper-case hex is not allowed.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // Version 00 has exactly four fields.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Later versions: the 56th character must be a dash.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            // Wrong lengths and separators.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_traceparent(b"\xff\xfe"), None);
    }

    #[test]
    fn request_id_sanity() {
        assert!(is_sane_request_id(b"abc-123_XYZ.~!"));
        assert!(is_sane_request_id(&[b'a'; 64]));
        assert!(!is_sane_request_id(&[b'a'; 65]));
        assert!(!is_sane_request_id(b""));
        assert!(!is_sane_request_id(b"with space"));
        assert!(!is_sane_request_id("é".as_bytes()));
        assert!(!is_sane_request_id(b"tab\there"));
    }

    #[test]
    fn log_format_parses() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("JSON".parse::<LogFormat>().is_err());
        assert!("xml".parse::<LogFormat>().is_err());
    }

    /// The statuses that send a request id name the request's own (DESIGN §4 Errors), inside
    /// a request and in a task spawned by [`in_request`]; outside a request, a fresh one.
    #[tokio::test]
    async fn internal_and_unavailable_name_the_request_id() {
        use crate::error::Error;
        let id: RequestId = Arc::from("req-42");
        let (internal, unavailable) = REQUEST_ID
            .scope(id.clone(), async {
                let internal = tonic::Status::from(Error::Internal("boom".into()));
                let unavailable = tokio::spawn(in_request(async {
                    tonic::Status::from(Error::Unavailable("db down".into()))
                }))
                .await
                .expect("task");
                (internal, unavailable)
            })
            .await;
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert!(
            internal.message().contains("request id req-42"),
            "{}",
            internal.message()
        );
        assert!(
            !internal.message().contains("boom"),
            "details are never sent"
        );
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
        assert!(
            unavailable.message().contains("request id req-42"),
            "{}",
            unavailable.message()
        );
        let outside = tonic::Status::from(Error::Internal("boom".into()));
        assert!(outside.message().contains("request id "));
        assert!(!outside.message().contains("req-42"));
    }
}
