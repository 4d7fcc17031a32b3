//! The auth layer: verifies the bearer token once per request and puts the outcome, the typed
//! [`Caller`](crate::auth::Caller) or the refusal, into request extensions.
//!
//! A refusal on HTTP/2 is answered here, before the request body is read. On HTTP/1.1
//! (grpc-web) it is answered by the handler ([`crate::api::caller`]) once tonic has read the
//! request message: replying earlier makes the server close the connection under a client still
//! writing its body, and the client sees a broken pipe (`INTERNAL`, or a network error in a
//! browser) instead of `UNAUTHENTICATED`. The message read first is bounded by the service's
//! decoding limit (4 MiB; 1 MiB + 64 KiB for AttachmentService).

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::{Caller, Verifier};
use crate::server::HttpVersion;

/// A tonic interceptor around a shared [`Verifier`].
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    verifier: Arc<Verifier>,
}

impl AuthInterceptor {
    /// Wraps a verifier.
    pub fn new(verifier: Arc<Verifier>) -> AuthInterceptor {
        AuthInterceptor { verifier }
    }
}

/// What the auth layer decided about a request: the caller, or the status to answer with.
#[derive(Clone, Debug)]
pub struct AuthOutcome(pub Result<Caller, Status>);

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let outcome = self.verifier.verify_header(header).map_err(Status::from);
        let http1 = matches!(
            req.extensions().get::<HttpVersion>(),
            Some(HttpVersion(v)) if *v < http::Version::HTTP_2
        );
        match outcome {
            Err(status) if !http1 => Err(status),
            outcome => {
                req.extensions_mut().insert(AuthOutcome(outcome));
                Ok(req)
            }
        }
    }
}
