//! The rules of the service, free of tonic and SQL: validate → authorize → store → publish.
//!
//! [`Chat`] holds the use cases of ChatService ([`messages`]), GroupService ([`groups`]) and
//! the live feed ([`feed`]). Each change is one store call (one transaction) that returns the
//! channel event(s) it wrote; those are then published to live feeds. Sends without attachments
//! go through group commit (the private `commit` module): concurrent sends share a transaction.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use crate::auth::Caller;
use crate::blob::Blobs;
use crate::error::{Error, Result};
use crate::fanout::{Hub, LiveEvent, MembershipChange, Publisher};
use crate::proto::{self, subscribe_response::Event};
use crate::store::{Actor, Changed, ChannelRow, MemberRow, MessageRow, Store, StoreError};

pub mod attachments;
mod commit;
pub mod convert;
pub mod feed;
pub mod groups;
pub mod messages;
pub mod policy;
pub mod validate;

/// Settings of the use cases.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Interval between heartbeats on live feeds.
    pub heartbeat: Duration,
    /// Largest attachment, in bytes (`MAX_UPLOAD_BYTES`).
    pub max_upload_bytes: i64,
    /// Unlinked attachments and unfinished uploads older than this are swept
    /// (`ATTACHMENT_UNLINKED_TTL`).
    pub unlinked_ttl: Duration,
    /// Per-user limits (rates, open feeds, unfinished uploads).
    pub limits: crate::limits::LimitSettings,
}

/// Default `MAX_UPLOAD_BYTES`: 100 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: i64 = 100 * 1024 * 1024;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_secs(15),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            unlinked_ttl: Duration::from_secs(24 * 3600),
            limits: crate::limits::LimitSettings::default(),
        }
    }
}

/// The service's use cases. Cheap to share behind an `Arc`.
pub struct Chat {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    publisher: Arc<dyn Publisher>,
    blobs: Blobs,
    settings: Settings,
    /// Group commit of sends, started on first use (it spawns tasks).
    sends: std::sync::OnceLock<commit::GroupCommit>,
    /// Per-user limits of this node.
    limits: crate::limits::Limits,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Which message event a change makes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum MessageEvent {
    Created,
    Updated,
    Deleted,
}

pub(crate) fn encode_message_event(kind: MessageEvent, row: &MessageRow, sequence: i64) -> Vec<u8> {
    let message = Some(convert::message(row));
    let event = match kind {
        MessageEvent::Created => Event::MessageCreated(proto::MessageCreated { message }),
        MessageEvent::Updated => Event::MessageUpdated(proto::MessageUpdated { message }),
        MessageEvent::Deleted => Event::MessageDeleted(proto::MessageDeleted { message }),
    };
    proto::SubscribeResponse::new(row.channel_id.clone(), sequence, event).encode_to_vec()
}

/// Hands a committed event (its stored payload) to the live fan-out: the one copy of the bytes
/// that every feed following the channel sends.
pub(crate) fn publish_event(
    publisher: &dyn Publisher,
    tenant: &str,
    channel_id: &str,
    sequence: i64,
    payload: &[u8],
    membership: Option<MembershipChange>,
) {
    publisher.publish(Arc::new(LiveEvent {
        tenant_id: tenant.to_owned(),
        channel_id: channel_id.to_owned(),
        sequence,
        encoded: Bytes::copy_from_slice(payload),
        membership,
    }));
}

pub(crate) fn encode_member_added(row: &MemberRow, sequence: i64) -> Vec<u8> {
    let event = Event::MemberAdded(proto::MemberAdded {
        member: Some(convert::member(row)),
    });
    proto::SubscribeResponse::new(row.channel_id.clone(), sequence, event).encode_to_vec()
}

pub(crate) fn encode_member_removed(row: &MemberRow, sequence: i64) -> Vec<u8> {
    let event = Event::MemberRemoved(proto::MemberRemoved {
        member: Some(convert::member(row)),
    });
    proto::SubscribeResponse::new(row.channel_id.clone(), sequence, event).encode_to_vec()
}

impl Chat {
    /// Use cases over a store, a hub that both publishes and serves feeds, and blob storage.
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>, blobs: Blobs, settings: Settings) -> Chat {
        Chat {
            store,
            publisher: hub.clone(),
            hub,
            blobs,
            limits: crate::limits::Limits::new(settings.limits),
            settings,
            sends: std::sync::OnceLock::new(),
        }
    }

    /// Publishes committed events through `publisher` (a cross-node transport that delivers to
    /// this chat's hub too) instead of the hub alone. Called before the first send.
    pub fn with_publisher(mut self, publisher: Arc<dyn Publisher>) -> Chat {
        self.publisher = publisher;
        self
    }

    /// The per-user limits (for the periodic clean-up of idle users' buckets).
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The store (for tools and tests).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The hub (for graceful shutdown).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn actor(caller: &Caller) -> Actor<'_> {
        Actor {
            tenant_id: &caller.tenant_id,
            user_id: &caller.user_id,
        }
    }

    /// The caller's membership of a live channel, or `NOT_FOUND` (no leak of ids).
    async fn membership(&self, caller: &Caller, channel_id: &str) -> Result<MemberRow> {
        self.store
            .member(&caller.tenant_id, channel_id, &caller.user_id)
            .await?
            .ok_or_else(|| Error::not_found(format!("channel {channel_id}")))
    }

    /// The channel and the caller's membership, or `NOT_FOUND`.
    async fn channel_as_member(
        &self,
        caller: &Caller,
        channel_id: &str,
    ) -> Result<(ChannelRow, MemberRow)> {
        let member = self.membership(caller, channel_id).await?;
        let channel = self
            .store
            .channel(&caller.tenant_id, channel_id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => Error::not_found(format!("channel {channel_id}")),
                e => e.into(),
            })?;
        Ok((channel, member))
    }

    /// A message the caller may see (member of its channel), deleted or not; else `NOT_FOUND`.
    async fn visible_message(&self, caller: &Caller, message_id: &str) -> Result<MessageRow> {
        let nf = || Error::not_found(format!("message {message_id}"));
        let msg = self
            .store
            .message(&caller.tenant_id, message_id)
            .await
            .map_err(|e| Error::or_not_found(e, nf))?;
        self.membership(caller, &msg.channel_id)
            .await
            .map_err(|e| match e {
                Error::NotFound(_) => nf(),
                e => e,
            })?;
        Ok(msg)
    }

    fn publish(
        &self,
        tenant: &str,
        channel_id: &str,
        sequence: i64,
        payload: &[u8],
        membership: Option<MembershipChange>,
    ) {
        publish_event(
            self.publisher.as_ref(),
            tenant,
            channel_id,
            sequence,
            payload,
            membership,
        );
    }

    /// The group commit of sends (started here on first use).
    pub(crate) fn sends(&self) -> &commit::GroupCommit {
        self.sends
            .get_or_init(|| commit::GroupCommit::start(self.store.clone(), self.publisher.clone()))
    }

    fn publish_members(&self, tenant: &str, changes: &[Changed<MemberRow>], added: bool) {
        for c in changes {
            let user = c.row.user_id.clone();
            let change = if added {
                MembershipChange::Added(user)
            } else {
                MembershipChange::Removed(user)
            };
            self.publish(
                tenant,
                &c.row.channel_id,
                c.sequence,
                &c.payload,
                Some(change),
            );
        }
    }
}
