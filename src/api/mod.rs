//! The tonic services: thin. Each method takes the [`Caller`] the auth layer put into the
//! request, calls one domain function and maps its error to a `Status`.

use tonic::{Request, Status};

use crate::auth::Caller;

pub mod auth;
pub mod chat;
pub mod group;

/// The verified caller of a request (put there by [`auth::AuthInterceptor`]).
pub(crate) fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))
}

/// Runs a unary domain call: caller out of the request, error mapped.
macro_rules! unary {
    ($self:ident, $req:ident, $method:ident) => {{
        let caller = crate::api::caller(&$req)?;
        let out = $self.chat.$method(&caller, $req.into_inner()).await?;
        Ok(tonic::Response::new(out))
    }};
}
pub(crate) use unary;
