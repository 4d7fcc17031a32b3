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

/// Runs a unary domain call: caller out of the request, error mapped.
///
/// The call runs in a task of its own: if the client goes away mid-call, tonic drops the
/// handler, but a change that is committing still commits *and is published* to live feeds
/// (a committed event that was never published would reach feeds only when a later event
/// exposed the hole). The task keeps the request's span and id ([`crate::telemetry::in_request`]).
macro_rules! unary {
    ($self:ident, $req:ident, $method:ident) => {{
        let caller = crate::api::caller(&$req)?;
        let chat = $self.chat.clone();
        let req = $req.into_inner();
        let out = tokio::spawn(crate::telemetry::in_request(async move {
            chat.$method(&caller, req).await
        }))
        .await
        .map_err(|e| tonic::Status::from(crate::error::Error::Internal(e.to_string())))??;
        Ok(tonic::Response::new(out))
    }};
}
pub(crate) use unary;
