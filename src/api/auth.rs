//! The auth layer: verifies the bearer token once per request and puts the typed
//! [`Caller`](crate::auth::Caller) into request extensions.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::Verifier;

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

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self.verifier.verify_header(header)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}
