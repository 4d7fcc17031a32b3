//! `FANOUT=nats`: committed events cross nodes over NATS core publish/subscribe.
//!
//! Each event is published once, on `<prefix>.<tenant>.<channel>` (the tenant percent-encoded
//! into one subject token), as a small protobuf envelope ([`BusEvent`]): the stored event bytes
//! with the tenant, channel, sequence and membership change a hub needs. Every node subscribes
//! to `<prefix>.>` and publishes what it hears to its own hub; the connection is `no_echo`, so a
//! node never hears its own events back (it delivered them to its hub when they committed), and
//! the envelope's origin is checked as well.
//!
//! Publishing never waits on NATS: events go through a bounded queue (`FANOUT_QUEUE`) to one
//! task that hands them to the client. While NATS is down events are not queued but dropped
//! (`chat_bus_dropped_total{reason="disconnected"}`): sent after the outage they would reach
//! other nodes stale and hold memory meanwhile. The client reconnects by itself (every 100 ms
//! to 2 s), and the head check (`src/fanout/check.rs`) delivers what other nodes missed, from
//! storage, and at once on reconnection. Live-only events (read markers) lost that way are not
//! recovered: they are never stored. At shutdown [`Publisher::flush`] hands NATS what is still
//! queued.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};

use super::{BusQueue, FanoutSettings, Hub, LiveEvent, MembershipChange, Publisher};

/// Bytes of a subject token that are escaped: everything but ASCII letters, digits, `-` and
/// `_` (NATS reserves `.`, `*`, `>` and whitespace; the rest is escaped so subjects stay plain
/// ASCII for operators' tools).
const TOKEN: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// Events handed to the client per wake of the publishing task, at most.
const PUBLISH_BATCH: usize = 256;

/// The wire form of an event on the bus. Internal to the cluster (every node of a deployment
/// runs the same version); fields are only ever added.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BusEvent {
    /// The publishing node's random id.
    #[prost(bytes = "vec", tag = "1")]
    pub origin: Vec<u8>,
    /// Tenant of the channel.
    #[prost(string, tag = "2")]
    pub tenant_id: String,
    /// The channel.
    #[prost(string, tag = "3")]
    pub channel_id: String,
    /// Channel sequence; 0 for live-only events.
    #[prost(int64, tag = "4")]
    pub sequence: i64,
    /// The encoded `chat.v1.SubscribeResponse`, as stored.
    #[prost(bytes = "bytes", tag = "5")]
    pub encoded: Bytes,
    /// 1 when the event adds `member`, 2 when it removes them, 0 otherwise.
    #[prost(int32, tag = "6")]
    pub membership: i32,
    /// The user added or removed.
    #[prost(string, tag = "7")]
    pub member: String,
}

impl BusEvent {
    fn of(origin: &[u8], ev: &LiveEvent) -> BusEvent {
        let (membership, member) = match &ev.membership {
            None => (0, String::new()),
            Some(MembershipChange::Added(u)) => (1, u.clone()),
            Some(MembershipChange::Removed(u)) => (2, u.clone()),
        };
        BusEvent {
            origin: origin.to_vec(),
            tenant_id: ev.tenant_id.clone(),
            channel_id: ev.channel_id.clone(),
            sequence: ev.sequence,
            encoded: ev.encoded.clone(),
            membership,
            member,
        }
    }

    fn into_live(self) -> LiveEvent {
        let membership = match self.membership {
            1 => Some(MembershipChange::Added(self.member)),
            2 => Some(MembershipChange::Removed(self.member)),
            _ => None,
        };
        LiveEvent {
            tenant_id: self.tenant_id,
            channel_id: self.channel_id,
            sequence: self.sequence,
            encoded: self.encoded,
            membership,
        }
    }
}

/// The subject of a channel's events: `<prefix>.<tenant, percent-encoded>.<channel>`.
pub fn subject(prefix: &str, tenant: &str, channel: &str) -> String {
    format!(
        "{prefix}.{}.{}",
        utf8_percent_encode(tenant, TOKEN),
        utf8_percent_encode(channel, TOKEN)
    )
}

/// How long a starting node waits for NATS before it serves without it.
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// Messages the client holds for the subscription before NATS counts this node a slow
/// consumer and drops for it (async-nats' default is 65,536); the head check covers a drop.
const SUBSCRIPTION_CAPACITY: usize = 8_192;

/// Whether `prefix` can start a subject: dot-separated tokens, none empty, without
/// whitespace, `*` or `>`.
pub fn valid_prefix(prefix: &str) -> bool {
    prefix
        .split('.')
        .all(|t| !t.is_empty() && !t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>'))
}

/// The NATS fan-out: this node's hub first, then the bus.
pub struct NatsFanout {
    hub: Arc<Hub>,
    bus: BusQueue,
    client: async_nats::Client,
}

impl Publisher for NatsFanout {
    fn publish(&self, event: Arc<LiveEvent>) {
        self.hub.publish(event.clone());
        self.bus.put(event);
    }

    fn flush(&self, within: Duration) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let start = tokio::time::Instant::now();
            self.bus.drained(within).await;
            let left = within.saturating_sub(start.elapsed());
            if tokio::time::timeout(left, self.client.flush())
                .await
                .is_err()
            {
                tracing::warn!("fan-out: NATS did not take the last events in time; other nodes get them from the head check");
            }
        })
    }
}

impl NatsFanout {
    /// Connects to `url` (in the background when it cannot be reached now), subscribes to
    /// `<prefix>.>`, and starts the publishing and receiving tasks. `recheck` is notified on
    /// every reconnection, so the head check runs at once.
    ///
    /// Errors: `url` is malformed, as one line naming `NATS_URL`.
    pub async fn start(
        url: &str,
        prefix: &str,
        settings: &FanoutSettings,
        hub: Arc<Hub>,
        recheck: Arc<Notify>,
    ) -> Result<Arc<NatsFanout>, String> {
        let origin = uuid::Uuid::new_v4().as_bytes().to_vec();
        let (bus, queue) = BusQueue::new(settings.queue, settings.drop_ratio);
        let connected = bus.connected();
        let on_event = recheck.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("chat-service {}", hex::encode(&origin[..4])))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).clamp(100, 2_000))
            })
            .ping_interval(Duration::from_secs(10))
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let (recheck, connected) = (on_event.clone(), connected.clone());
                async move { on_connection_event(event, &recheck, &connected) }
            })
            .connect(url)
            .await
            .map_err(|e| format!("NATS_URL: {e}"))?;
        let subscriber = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| format!("NATS_URL: cannot subscribe: {e}"))?;
        // Serve once the subscription is in place (a flush is answered after the server has
        // taken it), so events other nodes publish from then on reach this node's feeds; if
        // NATS cannot be reached in a few seconds, serve without it and catch up by the check.
        match tokio::time::timeout(CONNECT_WAIT, client.flush()).await {
            Ok(Ok(())) => {
                tracing::info!(url, subjects = %format!("{prefix}.>"), "fan-out over NATS")
            }
            _ => tracing::warn!(url, "fan-out: NATS is not reachable yet; serving, and connecting in the background (other nodes' events arrive through the head check meanwhile)"),
        }
        tokio::spawn(send(
            client.clone(),
            prefix.to_owned(),
            origin.clone(),
            queue,
        ));
        tokio::spawn(receive(subscriber, origin, hub.clone()));
        Ok(Arc::new(NatsFanout { hub, bus, client }))
    }
}

/// Follows the connection: `connected` gates the queue, and a (re)connection runs the head
/// check at once. (The client sends its subscription again just after it reports the
/// connection, so an event in that instant waits for the next regular check.)
fn on_connection_event(event: async_nats::Event, recheck: &Notify, connected: &AtomicBool) {
    match event {
        async_nats::Event::Connected => {
            tracing::info!("fan-out: connected to NATS");
            connected.store(true, Ordering::Release);
            crate::metrics::bus_connected(true);
            recheck.notify_one();
        }
        async_nats::Event::Disconnected => {
            tracing::warn!("fan-out: lost NATS; other nodes get this node's events from storage until it is back");
            connected.store(false, Ordering::Release);
            crate::metrics::bus_connected(false);
        }
        async_nats::Event::SlowConsumer(_) => {
            tracing::warn!("fan-out: this node fell behind the bus and NATS dropped events for it; the head check delivers them");
            crate::metrics::bus_dropped("slow_consumer");
        }
        other => tracing::info!(event = %other, "fan-out: NATS"),
    }
}

/// Hands queued events to the client, in order. A publish that fails (the client is closed)
/// is counted and dropped; the head check covers it.
async fn send(
    client: async_nats::Client,
    prefix: String,
    origin: Vec<u8>,
    mut queue: mpsc::Receiver<Arc<LiveEvent>>,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while queue.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        for ev in batch.drain(..) {
            let subject = subject(&prefix, &ev.tenant_id, &ev.channel_id);
            let payload = BusEvent::of(&origin, &ev).encode_to_vec();
            match client.publish(subject, payload.into()).await {
                Ok(()) => crate::metrics::bus_published(),
                Err(e) => {
                    tracing::debug!(error = %e, "fan-out: publish failed");
                    crate::metrics::bus_dropped("publish_failed");
                }
            }
        }
    }
}

/// Publishes what other nodes sent to this node's hub.
async fn receive(mut subscriber: async_nats::Subscriber, origin: Vec<u8>, hub: Arc<Hub>) {
    while let Some(message) = subscriber.next().await {
        match BusEvent::decode(message.payload) {
            Ok(ev) if ev.origin == origin => {}
            Ok(ev) => {
                crate::metrics::bus_received();
                hub.publish(Arc::new(ev.into_live()));
            }
            Err(e) => {
                tracing::warn!(error = %e, subject = %message.subject, "fan-out: a bus message does not decode; ignored")
            }
        }
    }
    tracing::error!("fan-out: the NATS subscription ended; this node hears other nodes' events only through the head check");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_keep_one_token_per_part() {
        assert_eq!(
            subject("chat.events", "acme", "0190-ab"),
            "chat.events.acme.0190-ab"
        );
        assert_eq!(
            subject("chat.events", "a.b *>c", "x"),
            "chat.events.a%2Eb%20%2A%3Ec.x"
        );
        assert_eq!(subject("p", "ה", "x"), "p.%D7%94.x");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(valid_prefix("chat.events"));
        assert!(valid_prefix("prod-eu_1"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn envelope_round_trips() {
        let ev = LiveEvent {
            tenant_id: "t".into(),
            channel_id: "c".into(),
            sequence: 9,
            encoded: Bytes::from_static(b"\x08\x01"),
            membership: Some(MembershipChange::Removed("bob".into())),
        };
        let wire = BusEvent::of(b"node", &ev).encode_to_vec();
        let back = BusEvent::decode(wire.as_slice()).expect("decodes");
        assert_eq!(back.origin, b"node");
        let live = back.into_live();
        assert_eq!(
            (
                live.tenant_id.as_str(),
                live.channel_id.as_str(),
                live.sequence
            ),
            ("t", "c", 9)
        );
        assert_eq!(live.encoded, ev.encoded);
        assert_eq!(live.membership, ev.membership);
    }
}
