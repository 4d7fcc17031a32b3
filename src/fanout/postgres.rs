//! `FANOUT=postgres`: PostgreSQL `LISTEN/NOTIFY` as a wake-up between nodes, for deployments
//! without NATS.
//!
//! A node that commits an event delivers it to its own hub, then `NOTIFY`s the channel and
//! sequence (never the event: a payload is limited to 8,000 bytes, and the event log has the
//! bytes already). Every node `LISTEN`s; for a channel its feeds follow, it reads the events
//! after what its hub has published, up to the notified sequence, from the log (one read per
//! channel per wake-up, whatever the number of feeds), and publishes them to its hub.
//! Notifications are sent in batches, one statement per batch, on a connection of their own.
//!
//! Live-only events (read markers, sequence 0) are not in the log, so their notification
//! carries the event itself (base64, a few hundred bytes). A `MemberAdded` names the user, so a
//! node whose feeds do not follow the channel yet still reads that one event when the user has
//! a feed of all channels there: that is how the feed learns of the channel.
//!
//! A dropped `LISTEN` connection reconnects by itself; what was notified meanwhile is lost,
//! so on reconnection the node runs the head check at once (`src/fanout/check.rs`), which
//! reads every followed channel's head and delivers what its hub missed.
//!
//! The notification channel is `chat_events` with the schema's name when `DB_SCHEMA` is set,
//! so deployments in different schemas of one database do not hear each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, Notify};

use super::{BusQueue, FanoutSettings, Hub, LiveEvent, MembershipChange, Publisher};
use crate::store::Store;

/// Notifications per `NOTIFY` statement, at most.
const NOTIFY_BATCH: usize = 512;
/// Events read from the log per channel per wake-up; a node further behind than this reads
/// only the newest, and its feeds fill the rest from storage as they do for any gap.
const READ_LIMIT: i64 = 256;
/// Events read for a channel this node has published nothing on since it was followed: its
/// feeds started at most a few events back, and one further back fills its own gap.
const NEWEST: i64 = 8;
/// Channels read at once by one node after a burst of wake-ups.
const READ_CONCURRENCY: usize = 8;
/// The longest notification payload PostgreSQL takes is 8,000 bytes; a live-only event whose
/// notification would be longer is not sent to other nodes.
const MAX_PAYLOAD: usize = 7_900;

/// The PostgreSQL fan-out: this node's hub first, then a `NOTIFY`.
pub struct PgFanout {
    hub: Arc<Hub>,
    bus: BusQueue,
}

impl Publisher for PgFanout {
    fn publish(&self, event: Arc<LiveEvent>) {
        self.hub.publish(event.clone());
        self.bus.put(event);
    }

    fn flush(&self, within: Duration) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.bus.drained(within))
    }
}

/// The notification channel of a schema (at most 63 bytes, PostgreSQL's identifier limit).
pub fn channel_name(schema: Option<&str>) -> String {
    match schema {
        Some(s) if s.len() <= 50 => format!("chat_events_{s}"),
        Some(s) => {
            use sha2::Digest;
            format!(
                "chat_events_{}",
                &hex::encode(sha2::Sha256::digest(s))[..32]
            )
        }
        None => "chat_events".to_owned(),
    }
}

/// What a notification says: `origin \t sequence \t channel \t tenant \t added user
/// [\t event]`, tenant and user percent-encoded (the user empty unless the event adds one) and
/// the event (live-only events only) base64.
struct Wake {
    origin: String,
    tenant: String,
    channel: String,
    sequence: i64,
    added: Option<String>,
    live_only: Option<Bytes>,
}

fn encode_wake(origin: &str, ev: &LiveEvent) -> Option<String> {
    let added = match &ev.membership {
        Some(MembershipChange::Added(user)) => user.as_str(),
        _ => "",
    };
    let mut s = format!(
        "{origin}\t{}\t{}\t{}\t{}",
        ev.sequence,
        ev.channel_id,
        utf8_percent_encode(&ev.tenant_id, NON_ALPHANUMERIC),
        utf8_percent_encode(added, NON_ALPHANUMERIC)
    );
    if ev.sequence == 0 {
        s.push('\t');
        base64::engine::general_purpose::STANDARD.encode_string(&ev.encoded, &mut s);
    }
    (s.len() <= MAX_PAYLOAD).then_some(s)
}

fn decode_wake(payload: &str) -> Option<Wake> {
    let mut parts = payload.split('\t');
    let origin = parts.next()?.to_owned();
    let sequence = parts.next()?.parse().ok()?;
    let channel = parts.next()?.to_owned();
    let decoded = |s: &str| Some(percent_decode_str(s).decode_utf8().ok()?.into_owned());
    let tenant = decoded(parts.next()?)?;
    let added = Some(decoded(parts.next()?)?).filter(|u| !u.is_empty());
    let live_only = match parts.next() {
        Some(b) => Some(Bytes::from(
            base64::engine::general_purpose::STANDARD.decode(b).ok()?,
        )),
        None => None,
    };
    Some(Wake {
        origin,
        tenant,
        channel,
        sequence,
        added,
        live_only,
    })
}

impl PgFanout {
    /// Opens the `NOTIFY` pool and the `LISTEN` connection on `url`, and starts their tasks.
    /// `recheck` is notified whenever the `LISTEN` connection was lost, so the head check runs
    /// at once.
    ///
    /// Errors: `url` cannot be reached, as one line naming `DATABASE_URL`.
    pub async fn start(
        url: &str,
        schema: Option<&str>,
        settings: &FanoutSettings,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        recheck: Arc<Notify>,
    ) -> Result<Arc<PgFanout>, String> {
        let name = channel_name(schema);
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| format!("DATABASE_URL: fan-out connection: {e}"))?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|e| format!("DATABASE_URL: fan-out LISTEN connection: {e}"))?;
        listener
            .listen(&name)
            .await
            .map_err(|e| format!("DATABASE_URL: LISTEN {name}: {e}"))?;
        let (bus, queue) = BusQueue::new(settings.queue, settings.drop_ratio);
        let connected = bus.connected();
        connected.store(true, Ordering::Release);
        crate::metrics::bus_connected(true);
        let (wakes, woken) = mpsc::channel(settings.queue.max(1));
        tokio::spawn(notify(pool, name.clone(), origin.clone(), queue));
        tokio::spawn(listen(
            listener,
            origin,
            hub.clone(),
            wakes,
            recheck,
            connected,
        ));
        tokio::spawn(read(woken, hub.clone(), store));
        tracing::info!(channel = %name, "fan-out over PostgreSQL LISTEN/NOTIFY");
        Ok(Arc::new(PgFanout { hub, bus }))
    }
}

/// Sends queued events' notifications, a batch per statement. A failed statement (the
/// database is down) drops its batch: the head check covers it.
async fn notify(
    pool: PgPool,
    name: String,
    origin: String,
    mut queue: mpsc::Receiver<Arc<LiveEvent>>,
) {
    let mut batch = Vec::with_capacity(NOTIFY_BATCH);
    while queue.recv_many(&mut batch, NOTIFY_BATCH).await > 0 {
        let payloads: Vec<String> = batch
            .drain(..)
            .filter_map(|ev| {
                let wake = encode_wake(&origin, &ev);
                if wake.is_none() {
                    crate::metrics::bus_dropped("too_large");
                }
                wake
            })
            .collect();
        let n = payloads.len();
        let sent = sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(&name)
            .bind(payloads)
            .execute(&pool)
            .await;
        match sent {
            Ok(_) => (0..n).for_each(|_| crate::metrics::bus_published()),
            Err(e) => {
                tracing::warn!(error = %e, events = n, "fan-out: NOTIFY failed; other nodes get these events from the head check");
                (0..n).for_each(|_| crate::metrics::bus_dropped("publish_failed"));
            }
        }
    }
}

/// Receives notifications: live-only events go to the hub at once, the rest to [`read`].
async fn listen(
    mut listener: PgListener,
    origin: String,
    hub: Arc<Hub>,
    wakes: mpsc::Sender<Wake>,
    recheck: Arc<Notify>,
    connected: Arc<AtomicBool>,
) {
    let up = |yes: bool| {
        connected.store(yes, Ordering::Release);
        crate::metrics::bus_connected(yes);
    };
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                up(true);
                let Some(wake) = decode_wake(n.payload()) else {
                    tracing::warn!(
                        payload = n.payload(),
                        "fan-out: a notification does not parse; ignored"
                    );
                    continue;
                };
                if wake.origin == origin {
                    continue;
                }
                crate::metrics::bus_received();
                if let Some(encoded) = wake.live_only {
                    hub.publish(Arc::new(LiveEvent {
                        tenant_id: wake.tenant,
                        channel_id: wake.channel,
                        sequence: 0,
                        encoded,
                        membership: None,
                    }));
                } else if wakes.try_send(wake).is_err() {
                    crate::metrics::bus_dropped("queue_full");
                }
            }
            // The connection was lost and sqlx has opened another (it reconnects eagerly);
            // what was notified in between is found by the head check, run now.
            Ok(None) => {
                tracing::warn!("fan-out: the LISTEN connection was lost; listening again");
                up(true);
                recheck.notify_one();
            }
            // No connection: the next call tries again.
            Err(e) => {
                tracing::warn!(error = %e, "fan-out: LISTEN failed; trying again in 1 s");
                up(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
                recheck.notify_one();
            }
        }
    }
}

/// Reads woken channels' new events from the log and publishes them to this node's hub: for
/// a channel its feeds follow, the events after what the hub has published (at most
/// [`READ_LIMIT`]); for one they do not, the event that adds a user with a feed of all
/// channels on this node. One read per channel per burst of wake-ups, [`READ_CONCURRENCY`] at
/// once.
async fn read(mut woken: mpsc::Receiver<Wake>, hub: Arc<Hub>, store: Arc<dyn Store>) {
    let mut batch = Vec::with_capacity(1024);
    while woken.recv_many(&mut batch, 1024).await > 0 {
        // channel → (tenant, highest sequence notified, a join to deliver)
        let mut due: HashMap<String, (String, i64, Option<i64>)> = HashMap::new();
        for w in batch.drain(..) {
            let joins = w
                .added
                .as_deref()
                .is_some_and(|u| hub.has_all_channels_feed(&w.tenant, u));
            let e = due.entry(w.channel).or_insert((w.tenant, 0, None));
            e.1 = e.1.max(w.sequence);
            if joins {
                e.2 = e.2.max(Some(w.sequence));
            }
        }
        let reads = due
            .into_iter()
            .filter_map(|(channel, (tenant, up_to, join))| {
                let after = match hub.seen(&channel) {
                    Some(seen) if up_to <= seen => return None,
                    // Nothing published here since it was followed, or far behind: the
                    // newest few; a feed further back fills the rest itself.
                    Some(seen) if seen == 0 || up_to - seen > READ_LIMIT => (up_to - NEWEST).max(0),
                    Some(seen) => seen,
                    None => join? - 1,
                };
                Some((channel, tenant, after, up_to))
            });
        let (store, hub) = (&store, &hub);
        futures::stream::iter(reads)
            .for_each_concurrent(READ_CONCURRENCY, |(channel, tenant, after, up_to)| async move {
                match store.events(&channel, after, up_to, READ_LIMIT).await {
                    Ok(rows) => {
                        for row in rows {
                            hub.publish(Arc::new(LiveEvent::stored(&tenant, &channel, row)));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, channel, "fan-out: cannot read notified events; the head check retries"),
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_round_trip() {
        let ev = LiveEvent {
            tenant_id: "a\tb".into(),
            channel_id: "c".into(),
            sequence: 0,
            encoded: Bytes::from_static(b"\x00\x01\xff"),
            membership: None,
        };
        let s = encode_wake("n1", &ev).expect("short");
        let w = decode_wake(&s).expect("parses");
        assert_eq!(
            (
                w.origin.as_str(),
                w.tenant.as_str(),
                w.channel.as_str(),
                w.sequence
            ),
            ("n1", "a\tb", "c", 0)
        );
        assert_eq!(w.live_only.as_deref(), Some(&b"\x00\x01\xff"[..]));
        let stored = LiveEvent {
            sequence: 7,
            membership: Some(MembershipChange::Added("ב b".into())),
            ..ev
        };
        let w = decode_wake(&encode_wake("n1", &stored).expect("short")).expect("parses");
        assert_eq!((w.sequence, w.live_only), (7, None));
        assert_eq!(w.added.as_deref(), Some("ב b"));
        assert!(decode_wake("n1\tx\tc\tt\t").is_none());
        assert!(decode_wake("n1\t1\tc\tt").is_none(), "no user field");
        assert_eq!(channel_name(None), "chat_events");
        assert!(channel_name(Some(&"s".repeat(63))).len() <= 63);
    }
}
