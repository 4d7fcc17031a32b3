//! The head check: how a node notices events its cross-node transport lost, within a bound.
//!
//! Every `every` (`FANOUT_CHECK_MS`, default 1 s) the node reads, for each channel its feeds
//! follow, the channel's last sequence in storage (one query per 1,000 channels), and compares
//! the heads read at the *previous* check with the highest sequence its hub has published
//! since ([`Hub::followed`]). A channel still behind a head that was committed at least one
//! interval ago lost something on the way: the node reads that head event from the event log
//! once and publishes it to its hub. Each feed of the channel then either has it already (a
//! duplicate, dropped) or sees a jump and fills its own gap from storage, as it does for any
//! hole.
//!
//! Comparing with the previous interval's heads, not the ones just read, leaves an event one
//! interval to arrive by the fast path before it counts as lost, so a busy channel does not
//! read storage on every check. The bound: an event committed at time t is in the heads read
//! by the first check after t (within `every`), and found missing by the check after that (one
//! more `every`): a lost event is offered to its feeds within 2 × `every` plus the check's own
//! reads (heads, then the missed head events, [`CONCURRENCY`] at a time). When the transport
//! says it reconnected ([`run`]'s `now`), the node checks at once against the heads it reads
//! then.
//!
//! The cost is `followed channels / 1000` indexed reads per interval per node, whatever the
//! traffic, and one single-row read per channel that actually lost something, or that was
//! followed since the last check and is quiet (its hub has published nothing there yet, so
//! the check cannot tell; the feeds drop the event as one they have).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use super::{Hub, LiveEvent, Publisher};
use crate::store::{Store, StoreResult, MAX_HEADS_PER_READ};

/// Missed head events read at once.
const CONCURRENCY: usize = 16;

/// A storage failure is logged at most this often (the check runs every interval).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Runs the head check every `every`, and at once whenever `now` is notified, for the life of
/// the process. A failed storage read is logged (at most once a minute) and tried again at the
/// next interval.
pub(super) async fn run(hub: Arc<Hub>, store: Arc<dyn Store>, every: Duration, now: Arc<Notify>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // channel → (tenant, last sequence) as read at the previous check.
    let mut previous: HashMap<String, (String, i64)> = HashMap::new();
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let at_once = tokio::select! {
            _ = ticks.tick() => false,
            _ = now.notified() => true,
        };
        match check(&hub, store.as_ref(), &previous, at_once).await {
            Ok(heads) => {
                previous = heads;
                if warned.take().is_some() {
                    tracing::info!("fan-out head check: storage answers again");
                }
            }
            Err(e) => {
                if warned.is_none_or(|w| w.elapsed() >= WARN_EVERY) {
                    tracing::warn!(error = %e, "fan-out head check: storage read failed; trying again each interval");
                    warned = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// One check: delivers the heads that `previous` (or, `at_once`, the heads read now) shows
/// this node's hub has not published; returns the heads read now.
///
/// Errors: the heads cannot be read (a head event that cannot be read is logged and left to
/// the next check).
async fn check(
    hub: &Hub,
    store: &dyn Store,
    previous: &HashMap<String, (String, i64)>,
    at_once: bool,
) -> StoreResult<HashMap<String, (String, i64)>> {
    let (ids, seen): (Vec<String>, Vec<i64>) = hub.followed().into_iter().unzip();
    // channel → (tenant, head) of the channels behind.
    let mut behind: HashMap<String, (String, i64)> = HashMap::new();
    for (channel, seen) in ids.iter().zip(&seen) {
        if let Some((tenant, head)) = previous.get(channel) {
            if head > seen {
                behind.insert(channel.clone(), (tenant.clone(), *head));
            }
        }
    }
    let mut heads = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_HEADS_PER_READ) {
        for (channel, tenant, last) in store.last_sequences(chunk).await? {
            heads.insert(channel, (tenant, last));
        }
    }
    if at_once {
        let seen: HashMap<&String, i64> = ids.iter().zip(seen).collect();
        for (channel, (tenant, head)) in &heads {
            if *head > seen.get(channel).copied().unwrap_or(0) {
                behind
                    .entry(channel.clone())
                    .or_insert_with(|| (tenant.clone(), *head));
            }
        }
    }
    // A head event that cannot be read is looked for again at the next check: the heads just
    // read are at least as far on.
    futures::stream::iter(behind)
        .for_each_concurrent(CONCURRENCY, |(channel, (tenant, head))| async move {
            if let Err(e) = deliver_head(hub, store, &tenant, &channel, head).await {
                tracing::debug!(error = %e, channel, "fan-out head check: head event not read");
            }
        })
        .await;
    Ok(heads)
}

/// Reads event `head` of `channel` from the log and publishes it to this node's hub (not to
/// other nodes: each runs its own check).
async fn deliver_head(
    hub: &Hub,
    store: &dyn Store,
    tenant: &str,
    channel: &str,
    head: i64,
) -> StoreResult<()> {
    for row in store.events(channel, head - 1, head, 1).await? {
        crate::metrics::bus_recovered();
        hub.publish(Arc::new(LiveEvent::stored(tenant, channel, row)));
    }
    Ok(())
}
