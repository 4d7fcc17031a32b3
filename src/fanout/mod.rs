//! Live delivery of committed events to open feeds: on this node through the in-process
//! [`Hub`], and across nodes through one transport chosen by `FANOUT`.
//!
//! - `memory` ([`Hub`] alone): one node; nothing crosses a process.
//! - `nats` ([`nats`]): every committed event is published on a NATS subject of its tenant and
//!   channel; every node delivers what it hears to its own hub.
//! - `postgres` ([`postgres`]): `NOTIFY` carries only a wake-up (channel and sequence); nodes read
//!   the events from the event log.
//!
//! In every mode the sender's node delivers its own events to its hub at once, and the event
//! log stays the source of truth: a cross-node transport is a fast path that may lose messages
//! (core NATS delivers at most once; a `LISTEN` connection can drop). What it loses the head
//! check (`check.rs`) finds: every `FANOUT_CHECK_MS` each node compares the heads of the
//! channels its feeds follow with what its hub has published, and delivers a missed head from
//! storage, from which each feed fills its own gap. See `docs/CLUSTER.md` for the bound.

mod check;
mod hub;
pub mod nats;
pub mod postgres;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use hub::{Feed, Hub, Lag, DEFAULT_FEED_BUFFER};

use crate::store::Store;

/// A membership change carried by an event, so feeds can follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// The user joined the channel at the event's sequence.
    Added(String),
    /// The user left or was removed.
    Removed(String),
}

/// One committed event, as every feed sends it.
#[derive(Debug)]
pub struct LiveEvent {
    /// Tenant of the channel (feeds of "all my channels" are keyed by tenant and user).
    pub tenant_id: String,
    /// The channel.
    pub channel_id: String,
    /// Channel sequence; 0 for live-only events (read markers).
    pub sequence: i64,
    /// The encoded `chat.v1.SubscribeResponse`, as stored and as every feed sends it (shared,
    /// not copied, per feed).
    pub encoded: Bytes,
    /// Set on MemberAdded / MemberRemoved.
    pub membership: Option<MembershipChange>,
}

/// What a feed receives from the hub.
#[derive(Debug, Clone)]
pub enum Item {
    /// An event of a followed channel.
    Event(Arc<LiveEvent>),
    /// The feed's user joined a channel (feeds of all channels only). Boxed, so an `Item` is
    /// two words: each feed's queue allocates 32 slots at once, even when idle.
    Joined(Box<Joined>),
}

/// A join notification: the feed's user joined `channel_id` at `sequence`.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The channel joined.
    pub channel_id: String,
    /// Sequence of the MemberAdded event.
    pub sequence: i64,
}

/// Publishes committed events to live feeds: the domain's view of fan-out, behind which the
/// hub alone (one node) or a cross-node transport stands.
pub trait Publisher: Send + Sync {
    /// Delivers an event to every feed following its channel, on every node. Never blocks.
    fn publish(&self, event: Arc<LiveEvent>);

    /// At shutdown, after the last commit: hands what is still queued to the transport, for
    /// at most `within`, so other nodes hear a stopping node's last events at once rather
    /// than from their head check. Nothing to do for the hub alone.
    fn flush(&self, within: Duration) -> futures::future::BoxFuture<'_, ()> {
        let _ = within;
        Box::pin(async {})
    }
}

/// Which transport carries events between nodes (`FANOUT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// One node: the hub alone.
    Memory,
    /// NATS core publish/subscribe at `url` (`NATS_URL`), on subjects
    /// `<prefix>.<tenant>.<channel>` (`NATS_SUBJECT_PREFIX`).
    Nats {
        /// `nats://host:port`, or several separated by commas.
        url: String,
        /// Subject prefix; nodes of one deployment must share it.
        prefix: String,
    },
    /// PostgreSQL `LISTEN/NOTIFY` on the store's database.
    Postgres {
        /// The store's `DATABASE_URL`.
        url: String,
        /// The store's schema (`DB_SCHEMA`), which names the notification channel.
        schema: Option<String>,
    },
}

/// How the fan-out runs (`FANOUT`, `NATS_URL`, `FANOUT_CHECK_MS`, `FANOUT_QUEUE`).
#[derive(Debug, Clone)]
pub struct FanoutSettings {
    /// The transport.
    pub transport: Transport,
    /// How often each node compares the heads of followed channels with storage (cross-node
    /// transports only). A lost event reaches its feeds within about twice this.
    pub check_every: Duration,
    /// Events waiting to be published on the bus, at most; past it, events are not published
    /// (counted in `chat_bus_dropped_total`) and other nodes get them from the check.
    pub queue: usize,
    /// Test-only fault injection: the fraction (0 to 1) of outgoing bus messages dropped on
    /// purpose (`FAULT_DROP_BUS_RATIO`). 0 in production.
    pub drop_ratio: f64,
}

/// Default of [`FanoutSettings::check_every`].
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_millis(1000);
/// Default of [`FanoutSettings::queue`]: at 10,000 events/s, 1.6 s of them; its memory is
/// this many events at most (a few hundred bytes each, 32 KiB at the very most).
pub const DEFAULT_QUEUE: usize = 16_384;

impl Default for FanoutSettings {
    fn default() -> Self {
        FanoutSettings {
            transport: Transport::Memory,
            check_every: DEFAULT_CHECK_EVERY,
            queue: DEFAULT_QUEUE,
            drop_ratio: 0.0,
        }
    }
}

/// Starts the fan-out: returns what the domain publishes through. With a cross-node transport
/// it also starts the transport's tasks and the head check, which run for the life of the
/// process, and marks the hub cross-node.
///
/// A NATS server that cannot be reached is not an error: the node starts, and connects when
/// NATS is there (until then other nodes hear of its events through the check).
///
/// Errors: a malformed `NATS_URL`, or the `LISTEN` connection cannot be opened, as one line.
pub async fn start(
    settings: &FanoutSettings,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
) -> Result<Arc<dyn Publisher>, String> {
    let recheck = Arc::new(tokio::sync::Notify::new());
    let publisher: Arc<dyn Publisher> = match &settings.transport {
        Transport::Memory => return Ok(hub),
        Transport::Nats { url, prefix } => {
            nats::NatsFanout::start(url, prefix, settings, hub.clone(), recheck.clone()).await?
        }
        Transport::Postgres { url, schema } => {
            postgres::PgFanout::start(
                url,
                schema.as_deref(),
                settings,
                hub.clone(),
                store.clone(),
                recheck.clone(),
            )
            .await?
        }
    };
    hub.set_cross_node();
    tokio::spawn(check::run(hub, store, settings.check_every, recheck));
    Ok(publisher)
}

/// A queue of events waiting for a transport, in front of its sending task:
/// [`Publisher::publish`] puts without waiting. An event is dropped (and counted in
/// `chat_bus_dropped_total`) when the queue is full, and while the transport is not connected:
/// other nodes get it from the head check, and events queued during an outage would only reach
/// them stale, after the check delivered them, and hold memory meanwhile.
struct BusQueue {
    tx: tokio::sync::mpsc::Sender<Arc<LiveEvent>>,
    /// Set by the transport when it connects, cleared when it loses its connection.
    connected: Arc<AtomicBool>,
    drop_ratio: f64,
}

impl BusQueue {
    fn new(
        capacity: usize,
        drop_ratio: f64,
    ) -> (BusQueue, tokio::sync::mpsc::Receiver<Arc<LiveEvent>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let connected = Arc::new(AtomicBool::new(false));
        (
            BusQueue {
                tx,
                connected,
                drop_ratio,
            },
            rx,
        )
    }

    /// The flag the transport sets while it is connected.
    fn connected(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    fn put(&self, event: Arc<LiveEvent>) {
        if self.drop_ratio > 0.0 && rand::random::<f64>() < self.drop_ratio {
            crate::metrics::bus_dropped("fault");
            return;
        }
        if !self.connected.load(Ordering::Acquire) {
            crate::metrics::bus_dropped("disconnected");
            return;
        }
        if self.tx.try_send(event).is_err() {
            crate::metrics::bus_dropped("queue_full");
        }
    }

    /// Waits until the sending task has taken every queued event, or `within` has passed.
    async fn drained(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.tx.capacity() < self.tx.max_capacity() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl LiveEvent {
    /// A stored event of `channel_id` (of `tenant`) as read from the event log by a node that
    /// did not commit it, its membership change decoded from the payload.
    fn stored(tenant: &str, channel_id: &str, row: crate::store::EventRow) -> LiveEvent {
        LiveEvent {
            tenant_id: tenant.to_owned(),
            channel_id: channel_id.to_owned(),
            sequence: row.sequence,
            membership: membership_of(&row.payload),
            encoded: Bytes::from(row.payload),
        }
    }
}

/// The membership change a stored event's payload carries, for events read from storage.
fn membership_of(payload: &[u8]) -> Option<MembershipChange> {
    match crate::event::member_change(payload) {
        Ok(Some((true, user))) => Some(MembershipChange::Added(user)),
        Ok(Some((false, user))) => Some(MembershipChange::Removed(user)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "a stored event does not decode; delivered without its membership change");
            None
        }
    }
}
