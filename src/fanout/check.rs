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
//! more `every`): a lost event reaches its feeds within 2 × `every` plus one storage read. When
//! the transport says it reconnected ([`run`]'s `now`), the node checks at once against the
//! heads it reads then.
//!
//! The cost is one indexed read of `followed channels / 1000` statements per interval per
//! node, whatever the traffic, and one single-row read per channel that actually lost
//! something (or that was followed since the last check and is quiet: its hub has published
//! nothing there yet).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{Hub, LiveEvent, Publisher};
use crate::store::{Store, MAX_HEADS_PER_READ};

/// Runs the head check every `every`, and at once whenever `now` is notified, for the life of
/// the process. A failed storage read is logged and tried again at the next interval.
pub(super) async fn run(hub: Arc<Hub>, store: Arc<dyn Store>, every: Duration, now: Arc<Notify>) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // channel → (tenant, last sequence) as read at the previous check.
    let mut previous: HashMap<String, (String, i64)> = HashMap::new();
    loop {
        let at_once = tokio::select! {
            _ = ticks.tick() => false,
            _ = now.notified() => true,
        };
        match check(&hub, store.as_ref(), &previous, at_once).await {
            Ok(heads) => previous = heads,
            Err(e) => {
                tracing::warn!(error = %e, "fan-out head check: storage read failed; trying again")
            }
        }
    }
}

/// One check: delivers the heads that `previous` (or, `at_once`, the heads read now) shows
/// this node's hub has not published; returns the heads read now.
async fn check(
    hub: &Hub,
    store: &dyn Store,
    previous: &HashMap<String, (String, i64)>,
    at_once: bool,
) -> crate::store::StoreResult<HashMap<String, (String, i64)>> {
    let followed = hub.followed();
    let mut behind: Vec<(String, String, i64)> = Vec::new();
    for (channel, seen) in &followed {
        if let Some((tenant, head)) = previous.get(channel) {
            if *head > *seen {
                behind.push((channel.clone(), tenant.clone(), *head));
            }
        }
    }
    let mut heads = HashMap::with_capacity(followed.len());
    let ids: Vec<String> = followed.iter().map(|(c, _)| c.clone()).collect();
    for chunk in ids.chunks(MAX_HEADS_PER_READ) {
        for (channel, tenant, last) in store.last_sequences(chunk).await? {
            heads.insert(channel, (tenant, last));
        }
    }
    if at_once {
        let seen: HashMap<&String, i64> = followed.iter().map(|(c, s)| (c, *s)).collect();
        for (channel, (tenant, head)) in &heads {
            let published = seen.get(channel).copied().unwrap_or(0);
            if *head > published && !behind.iter().any(|b| &b.0 == channel) {
                behind.push((channel.clone(), tenant.clone(), *head));
            }
        }
    }
    for (channel, tenant, head) in behind {
        deliver_head(hub, store, &tenant, &channel, head).await?;
    }
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
) -> crate::store::StoreResult<()> {
    for row in store.events(channel, head - 1, head, 1).await? {
        crate::metrics::bus_recovered();
        hub.publish(Arc::new(LiveEvent::stored(tenant, channel, row)));
    }
    Ok(())
}
