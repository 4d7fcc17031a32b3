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
            StoreError::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                let summary = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
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
            Error::OutOfRange(m) => Status::out_of_range(m),
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
