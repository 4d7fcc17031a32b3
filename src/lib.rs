//! # chat-service
//!
//! A chat backend served over gRPC (and grpc-web): groups and direct conversations, messages
//! with threads, read markers and favourites, and a live feed per user that resumes from
//! per-channel cursors without gaps or duplicates. It re-creates the LoopBack microservice
//! `@sourceloop/chat-service` (permission keys in a JWT, per-recipient state, audit rows) in
//! Rust.
//!
//! ## How a request flows
//!
//! ```text
//! tonic service (api::*)  -- decode, validate shape, map errors
//!    │  Caller (from api::auth, verified once per request)
//!    ▼
//! domain::Chat            -- permission keys, membership, limits; one store call per change
//!    ├──► store::Store    -- one transaction: row + audit row + the channel's next event
//!    ├──► fanout          -- the committed event, to this node's feeds (fanout::Hub) and,
//!    │                       with FANOUT=nats / postgres, to the other nodes' hubs
//!    └──► blob::Blobs     -- attachment bytes, streamed (local disk or S3)
//! ```
//!
//! A live feed (`Subscribe`) registers with the hub first, then replays stored events after the
//! client's cursors, then forwards live events, dropping any it has already sent and filling any
//! hole from storage; a reader that falls behind is caught up from storage rather than slowing
//! senders.
//!
//! # Layout
//!
//! - [`config`]: every setting, from the environment with flags mirroring it.
//! - [`error`]: the domain error and its one mapping to `tonic::Status`.
//! - [`auth`]: JWT verification (HS256, PEM keys, JWKS files) into a typed [`auth::Caller`].
//! - [`domain`]: the rules: validation, policy, use cases, the live feed session.
//! - [`store`]: repository traits, each change's transaction written once (`flows`), and one
//!   module per database (`sqlite`, `postgres`, `mysql`) with its own SQL.
//! - [`fanout`]: delivery of committed events to live feeds: this node's hub, and the
//!   cross-node transports (NATS, PostgreSQL LISTEN/NOTIFY) with the head check that finds
//!   what they lost.
//! - [`limits`]: per-user rate limits, open feeds and unfinished uploads.
//! - [`blob`]: attachment bytes on local disk or S3, through `object_store`.
//! - [`api`]: the thin tonic services.
//! - [`server`]: assembles services, auth, health and reflection on one listener that speaks
//!   gRPC and grpc-web (with CORS).
//! - [`shutdown`]: the bounded drain period that ends every open call at shutdown.
//! - [`codec`]: the protobuf codec of every generated client and server.
//! - [`page`]: `ListMessagesResponse` by hand, so history pages can be sent pre-encoded.
//! - [`event`]: `SubscribeResponse` by hand, so feeds send each stored event as stored.
//! - [`cli`]: the `chat-service` command line, including a small client.
//! - [`telemetry`]: per-request id, span and gRPC metrics (a tower layer); log output
//!   (`LOG_FORMAT` text or JSON).
//! - [`metrics`]: the Prometheus recorder, its `GET /metrics` endpoint (`METRICS_ADDR`) and
//!   the functions the code records through.

pub mod api;
pub mod auth;
pub mod blob;
pub mod cli;
pub mod codec;
pub mod config;
pub mod domain;
pub mod error;
pub mod event;
pub mod fanout;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;

/// Generated protobuf types and tonic clients/servers of package `chat.v1`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("chat.v1");

    /// Written by hand (see [`crate::page`]); the wire form is the declared one.
    pub use crate::page::ListMessagesResponse;

    /// Written by hand (see [`crate::event`]); the wire form is the declared one.
    pub use crate::event::{subscribe_response, SubscribeResponse};

    /// The encoded `FileDescriptorSet` of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/chat_descriptor.bin"));
}

/// The README's Rust blocks, compiled as doc tests so the documented client code stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
