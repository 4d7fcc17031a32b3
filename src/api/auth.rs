//! The auth layer: verifies the bearer token once per request and puts the outcome, the typed
//! [`Caller`](crate::auth::Caller) or the refusal, into request extensions.
//!
//! A refusal is not answered here but by the handler ([`crate::api::caller`]), once tonic has
//! read the request message. Answering from the interceptor replies before the request body
//! has been read; on HTTP/1.1 (grpc-web) the server then closes the connection under a client
//! still writing, and the client sees a broken pipe (`INTERNAL` / a browser network error)
//! instead of `UNAUTHENTICATED`.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::{Caller, Verifier};

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
        let outcome = AuthOutcome(self.verifier.verify_header(header).map_err(Status::from));
        req.extensions_mut().insert(outcome);
        Ok(req)
    }
}
