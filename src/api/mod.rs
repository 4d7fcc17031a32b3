//! The tonic services: thin. Each method takes the [`Caller`] the auth layer put into the
//! request, calls one domain function and maps its error to a `Status`.

use tonic::{Request, Status};

use crate::auth::Caller;

pub mod attachment;
pub mod auth;
pub mod chat;
pub mod group;

/// The verified caller of a request, or the auth layer's refusal
/// ([`auth::AuthInterceptor`]); `UNAUTHENTICATED` when the layer did not run.
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    match req.extensions().get::<auth::AuthOutcome>() {
        Some(auth::AuthOutcome(outcome)) => outcome.clone(),
        None => Err(Status::unauthenticated("missing authorization metadata")),
    }
}

/// Start of tonic's message when a received message is over the service's decoding limit
/// (`tonic::codec::decode`), which it answers with `OUT_OF_RANGE`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// `RESOURCE_EXHAUSTED` for a status tonic made because a received message was over the
/// decoding limit (4 MiB; 1 MiB + 64 KiB on AttachmentService); `None` for any other status.
///
/// The README promises `RESOURCE_EXHAUSTED` for anything over a size limit, as gRPC's own
/// status code guide does for message size; tonic answers `OUT_OF_RANGE`, which on Subscribe
/// already means "cursor beyond the end".
pub fn oversize(status: &Status) -> Option<Status> {
    (status.code() == tonic::Code::OutOfRange && status.message().starts_with(TONIC_TOO_LARGE))
        .then(|| {
            let detail = status.message()[TONIC_TOO_LARGE.len()..].trim_start_matches(':');
            Status::resource_exhausted(format!("request message too large:{detail}"))
        })
}

/// Rewrites a trailers-only response that tonic answered with its oversize `OUT_OF_RANGE`
/// (a unary or server-streaming request over the limit, refused before any handler runs) into
/// [`oversize`]'s `RESOURCE_EXHAUSTED`. Other responses pass untouched.
pub fn oversize_response<B>(mut res: http::Response<B>) -> http::Response<B> {
    // Cheap test first: every trailers-only response passes here.
    let headers = res.headers();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11")
        || !headers.get("grpc-message").is_some_and(|m| {
            m.as_bytes()
                .starts_with(b"Error,%20decoded%20message%20length")
        })
    {
        return res;
    }
    let Some(status) = tonic::Status::from_header_map(res.headers()) else {
        return res;
    };
    if let Some(replacement) = oversize(&status) {
        let headers = res.headers_mut();
        headers.remove("grpc-message");
        headers.remove("grpc-status-details-bin");
        if let Err(e) = replacement.add_header(headers) {
            tracing::warn!(error = %e, "cannot rewrite an oversize status");
        }
    }
    res
}

/// Waits for a unary call's task, at most `deadline` when given (`DEADLINE_EXCEEDED` after;
/// the task runs on, see [`unary`]); a task that panicked is `INTERNAL`.
pub(crate) async fn finish<T>(
    task: tokio::task::JoinHandle<crate::error::Result<T>>,
    deadline: Option<std::time::Duration>,
) -> Result<crate::error::Result<T>, Status> {
    let joined = match deadline {
        Some(d) => tokio::time::timeout(d, task).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "the call took longer than the service's limit of {} s",
                d.as_secs_f64()
            ))
        })?,
        None => task.await,
    };
    joined.map_err(|e| Status::from(crate::error::Error::Internal(e.to_string())))
}

/// Runs a unary domain call: caller out of the request, error mapped.
///
/// The call runs in a task of its own: if the client goes away mid-call, tonic drops the
/// handler, but a change that is committing still commits *and is published* to live feeds
/// (a committed event that was never published would reach feeds only when a later event
/// exposed the hole). The task keeps the request's span and id ([`crate::telemetry::in_request`]).
/// For the same reason a call past the service's unary timeout is answered
/// `DEADLINE_EXCEEDED` while its task runs on: like a client's own deadline, the answer does
/// not say whether the change happened.
macro_rules! unary {
    // Without the service's deadline: a call whose work grows with its data (CompleteUpload
    // copies a whole upload) and that a client should not retry while it still runs.
    ($self:ident, $req:ident, $method:ident, no_deadline) => {
        crate::api::unary!(@run $self, $req, $method, None)
    };
    ($self:ident, $req:ident, $method:ident) => {
        crate::api::unary!(@run $self, $req, $method, Some($self.unary_timeout))
    };
    (@run $self:ident, $req:ident, $method:ident, $deadline:expr) => {{
        let caller = crate::api::caller(&$req)?;
        let chat = $self.chat.clone();
        let req = $req.into_inner();
        let task = tokio::spawn(crate::telemetry::in_request(async move {
            chat.$method(&caller, req).await
        }));
        Ok(tonic::Response::new(crate::api::finish(task, $deadline).await??))
    }};
}
pub(crate) use unary;
