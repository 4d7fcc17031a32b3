//! Graceful shutdown with a bounded drain period.
//!
//! On SIGTERM the server stops taking new calls (HTTP/2 GOAWAY), reports `NOT_SERVING` on
//! `grpc.health.v1.Health`, and ends live feeds cleanly (see [`crate::fanout::Hub::shutdown`]).
//! What is left then would hold the process open for as long as its clients like: a health
//! `Watch` (gRPC client-side health checking keeps one per connection and never cancels it), a
//! download to a slow reader, a unary call stuck on a dead database. [`DrainLayer`] bounds that:
//!
//! - a health `Watch` ends [`HEALTH_WATCH_GRACE`] after shutdown starts, time enough to carry
//!   the `NOT_SERVING` it was sent;
//! - every other call still open when the drain period (`SHUTDOWN_DRAIN_SECONDS`, default
//!   [`DEFAULT_DRAIN`]) runs out ends with `UNAVAILABLE` ("server shutting down"), so a client
//!   retries elsewhere; a response not started yet is answered with that status instead.
//!
//! The process then exits 0. Calls that finish within the period are not disturbed.
//!
//! One thing a body cannot end: a stream whose client stopped reading. hyper does not poll a
//! response body while its last chunk waits for the client's flow-control window, so the
//! `UNAVAILABLE` trailers cannot be sent either; [`crate::server::serve`] returns anyway a
//! moment after the period, and such connections close when the process exits.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Default drain period: how long calls open at shutdown may go on, 10 s.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

/// How long a health `Watch` stays open after shutdown starts: long enough for the
/// `NOT_SERVING` it was sent to reach the client.
pub const HEALTH_WATCH_GRACE: Duration = Duration::from_millis(500);

/// The gRPC path of the health `Watch` stream.
const HEALTH_WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// The two moments of a shutdown: when health watches are cut, and when everything is.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    health: CancellationToken,
    all: CancellationToken,
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Starts the clock: health watches end after [`HEALTH_WATCH_GRACE`] (or `period`, if
    /// shorter), every other open call after `period`. Returns when the period is over.
    pub async fn run(&self, period: Duration) {
        let health = HEALTH_WATCH_GRACE.min(period);
        tokio::time::sleep(health).await;
        self.health.cancel();
        tokio::time::sleep(period - health).await;
        self.all.cancel();
    }

    /// Resolves once the drain period is over.
    pub async fn over(&self) {
        self.all.cancelled().await
    }

    fn token_for(&self, path: &str) -> CancellationToken {
        if path == HEALTH_WATCH_PATH {
            self.health.clone()
        } else {
            self.all.clone()
        }
    }
}

/// A tower layer that ends each call when its [`Drain`] moment comes (see the module docs).
#[derive(Clone, Debug)]
pub struct DrainLayer(pub Drain);

impl<S> tower::Layer<S> for DrainLayer {
    type Service = DrainService<S>;
    fn layer(&self, inner: S) -> DrainService<S> {
        DrainService {
            inner,
            drain: self.0.clone(),
        }
    }
}

/// The service of [`DrainLayer`].
#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

/// The status a call cut by the drain ends with.
fn shutting_down() -> tonic::Status {
    tonic::Status::unavailable("server shutting down; retry on another connection")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ReqBody> tower::Service<http::Request<ReqBody>> for DrainService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Default + Send + 'static,
{
    type Response = http::Response<DrainBody<B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let token = self.drain.token_for(req.uri().path());
        let response = self.inner.call(req);
        Box::pin(async move {
            tokio::select! {
                biased;
                r = response => r.map(|res| res.map(|body| DrainBody::new(body, token))),
                // Trailers-only: the call had not answered yet.
                _ = token.cancelled() => Ok(shutting_down().into_http::<B>().map(DrainBody::ended)),
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with `UNAVAILABLE` trailers when its drain moment comes,
    /// unless it has ended by itself before.
    pub struct DrainBody<B> {
        #[pin]
        inner: B,
        cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        // The inner body sent its trailers or ended, or the cut's trailers went out.
        done: bool,
    }
}

impl<B> DrainBody<B> {
    fn new(inner: B, token: CancellationToken) -> DrainBody<B> {
        DrainBody {
            inner,
            cut: Some(Box::pin(token.cancelled_owned())),
            done: false,
        }
    }

    /// A body with nothing to add (a trailers-only answer).
    fn ended(inner: B) -> DrainBody<B> {
        DrainBody {
            inner,
            cut: None,
            done: false,
        }
    }
}

impl<B> Body for DrainBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(cut) = this.cut.as_mut() {
            if cut.as_mut().poll(cx).is_ready() {
                *this.done = true;
                let mut trailers = http::HeaderMap::new();
                // Only fails for a message that is not valid header text; this one is.
                let _ = shutting_down().add_header(&mut trailers);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(None) => *this.done = true,
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => *this.done = true,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
