//! The domain error and its one exhaustive mapping to `tonic::Status`.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

/// One bad field of a request: the field path (as in `google.rpc.BadRequest`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, for example `body` or `attachment_ids[2]`.
    pub field: String,
    /// What is wrong with it, for a developer.
    pub description: String,
}

/// Everything a use case can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: `INVALID_ARGUMENT` with `google.rpc.BadRequest` field violations.
    #[error("invalid argument: {0:?}")]
    Invalid(Vec<FieldViolation>),
    /// No valid token: `UNAUTHENTICATED`; the text says which check failed.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token lacks the permission key: `PERMISSION_DENIED`.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Unknown, or not visible to the caller: `NOT_FOUND`.
    #[error("not found: {0}")]
    NotFound(String),
    /// The state does not allow it (for example the last owner leaving): `FAILED_PRECONDITION`.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Over a size limit (`MAX_UPLOAD_BYTES`): `RESOURCE_EXHAUSTED`.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A per-user rate limit: `RESOURCE_EXHAUSTED` with `google.rpc.RetryInfo` saying how long
    /// until the call would pass ([`crate::limits`]).
    #[error("rate limited: {message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
    /// A resumable upload's chunk did not start at the committed size: `FAILED_PRECONDITION`
    /// with a `google.rpc.ErrorInfo` (reason `OFFSET_MISMATCH`, metadata `committed_bytes`).
    #[error("offset {offset} is not the committed size {committed}")]
    OffsetMismatch { offset: i64, committed: i64 },
    /// A concurrent change won (stale etag, AIP-154): `ABORTED`.
    #[error("aborted: {0}")]
    Aborted(String),
    /// A cursor beyond the end of a channel: `OUT_OF_RANGE`.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Storage is down: `UNAVAILABLE`, retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug: `INTERNAL`; details are logged with a request id and never sent.
    #[error("internal: {0}")]
    Internal(String),
}

/// Result of the domain.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// `INVALID_ARGUMENT` for one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Error {
        Error::Invalid(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// A store error, with `StoreError::NotFound` replaced by `not_found()` (a `NOT_FOUND`
    /// that names what was looked for); every other error maps as usual.
    pub fn or_not_found(e: StoreError, not_found: impl FnOnce() -> Error) -> Error {
        match e {
            StoreError::NotFound => not_found(),
            e => e.into(),
        }
    }

    /// `NOT_FOUND` naming what was looked for.
    pub fn not_found(what: impl Into<String>) -> Error {
        Error::NotFound(what.into())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Error::NotFound("not found".into()),
            StoreError::Conflict => Error::Aborted("a concurrent change conflicted; retry".into()),
            StoreError::LastOwner => Error::FailedPrecondition(
                "the last OWNER cannot leave or step down; make another member OWNER first".into(),
            ),
            StoreError::Stale => Error::Aborted("etag is stale: the message changed".into()),
            StoreError::Unlinkable(i) => Error::invalid(
                format!("attachment_ids[{i}]"),
                "not an unlinked attachment uploaded by the caller to this channel",
            ),
            StoreError::Unavailable(m) => Error::Unavailable(m),
            StoreError::Retry(m) => Error::Unavailable(m),
            StoreError::Internal(m) => Error::Internal(m),
        }
    }
}

/// Most field violations an `INVALID_ARGUMENT` lists; past them one more entry says how many
/// were left out. gRPC clients refuse response metadata past a limit and report
/// `RESOURCE_EXHAUSTED` instead of the real status (grpc-java at 8 KiB, grpc-core and Go from
/// 8 or 16 KiB): 1,000 bad member ids once made 33 KB.
pub const MAX_VIOLATIONS: usize = 10;

/// Longest field path echoed in a violation, in bytes (a path can hold client input, such as a
/// cursor's channel id); longer ones are cut and end with `…`.
pub const MAX_FIELD_BYTES: usize = 100;

/// Longest violation description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 200;

/// Longest status message, in bytes. With the limits above, an `INVALID_ARGUMENT`'s metadata
/// (the message, percent-encoded, and the `google.rpc.BadRequest` details, base64) stays under
/// about 6.5 KiB in the worst case.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// Violations the summary message spells out; the details carry up to [`MAX_VIOLATIONS`].
const SUMMARY_VIOLATIONS: usize = 3;

/// `s` cut to at most `max` bytes on a character boundary, ending with `…` when cut.
pub fn clip(s: &str, max: usize) -> String {
    debug_assert!(max >= 3, "room for the ellipsis");
    if s.len() <= max {
        return s.to_owned();
    }
    let ellipsis = "…";
    let mut end = max.saturating_sub(ellipsis.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &s[..end])
}

/// The `INVALID_ARGUMENT` status of `violations`, bounded: at most [`MAX_VIOLATIONS`] listed
/// (then one entry `"…": "and N more"`), each field and description clipped, the message naming
/// the first few.
fn invalid_argument(violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let shown: Vec<(String, String)> = violations
        .into_iter()
        .take(MAX_VIOLATIONS)
        .map(|v| {
            (
                clip(&v.field, MAX_FIELD_BYTES),
                clip(&v.description, MAX_DESCRIPTION_BYTES),
            )
        })
        .collect();
    let mut summary = shown
        .iter()
        .take(SUMMARY_VIOLATIONS)
        .map(|(f, d)| format!("{f}: {d}"))
        .collect::<Vec<_>>()
        .join("; ");
    if total > SUMMARY_VIOLATIONS {
        summary.push_str(&format!(
            "; and {} more bad field(s)",
            total - SUMMARY_VIOLATIONS
        ));
    }
    let mut details = ErrorDetails::new();
    for (field, description) in shown {
        details.add_bad_request_violation(field, description);
    }
    if total > MAX_VIOLATIONS {
        details.add_bad_request_violation(
            "…",
            format!(
                "and {} more violation(s) not listed",
                total - MAX_VIOLATIONS
            ),
        );
    }
    Status::with_error_details(
        Code::InvalidArgument,
        clip(&summary, MAX_MESSAGE_BYTES),
        details,
    )
}

impl From<Error> for Status {
    /// Every message is clipped to [`MAX_MESSAGE_BYTES`]: messages may echo client input.
    fn from(e: Error) -> Status {
        let m = |m: String| clip(&m, MAX_MESSAGE_BYTES);
        match e {
            Error::Invalid(violations) => invalid_argument(violations),
            Error::Unauthenticated(s) => Status::unauthenticated(m(s)),
            Error::PermissionDenied(s) => Status::permission_denied(m(s)),
            Error::NotFound(s) => Status::not_found(m(s)),
            Error::FailedPrecondition(s) => Status::failed_precondition(m(s)),
            Error::Aborted(s) => Status::aborted(m(s)),
            Error::ResourceExhausted(s) => Status::resource_exhausted(m(s)),
            Error::RateLimited {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                m(message),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::OffsetMismatch { offset, committed } => {
                let details = ErrorDetails::with_error_info(
                    "OFFSET_MISMATCH",
                    "chat.v1",
                    [("committed_bytes".to_owned(), committed.to_string())],
                );
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("offset {offset} is not the committed size {committed}; resume at {committed}"),
                    details,
                )
            }
            Error::OutOfRange(s) => Status::out_of_range(m(s)),
            Error::Unavailable(m) => {
                let id = crate::telemetry::request_id_or_new();
                tracing::warn!(request_id = %id, error = %m, "storage unavailable");
                Status::unavailable(format!("storage unavailable, retry (request id {id})"))
            }
            Error::Internal(m) => {
                let id = crate::telemetry::request_id_or_new();
                tracing::error!(request_id = %id, error = %m, "internal error");
                Status::internal(format!("internal error (request id {id})"))
            }
        }
    }
}
