//! The live feed (`Subscribe`): replay from storage after the client's cursors, then live events
//! from the hub, with no gap and no duplicate at the seam.
//!
//! The order of steps is what makes the seam safe: the feed registers with the hub *before* it
//! reads where each channel stands, so every event committed after that read arrives live; and
//! every event is checked against the last sequence sent for its channel: at or below it is a
//! duplicate (dropped), more than one above it is a hole (filled from storage first). Because a
//! channel's sequences are taken under its row lock and committed in order, a published event
//! with sequence `n` means `1..n` are all committed and readable.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use tokio::sync::mpsc;

use crate::auth::{Caller, Permission};
use crate::error::{Error, Result};
use crate::fanout::{Feed, Item, LiveEvent, MembershipChange};
use crate::proto::{self, subscribe_response::Event};

use super::validate::Check;
use super::{convert, Chat};

/// What a feed yields: events, or one final error (`UNAUTHENTICATED` on token expiry,
/// `UNAVAILABLE` when storage fails).
pub type FeedItem = Result<proto::SubscribeResponse>;

/// What the feed's outbox holds: a batch of consecutive items, which the encoder writes back to
/// back into one HTTP/2 DATA frame. A boxed slice (two words), because a `FeedItem` is ~400
/// bytes and the outbox keeps its capacity for as long as the stream is open.
type QueuedItem = Box<[FeedItem]>;

/// Batches a feed has produced and its stream has not yet yielded. Shared by the feed's future
/// (which pushes) and [`FeedStream`] (which pops), both only ever polled by the same task.
type Outbox = Arc<Mutex<VecDeque<QueuedItem>>>;

fn lock(outbox: &Outbox) -> std::sync::MutexGuard<'_, VecDeque<QueuedItem>> {
    outbox.lock().unwrap_or_else(|p| p.into_inner())
}

/// Events read from storage per query while replaying or catching up.
const REPLAY_PAGE: i64 = 256;
/// Events in one batch handed to the outbox: a burst drained from the hub stops at this
/// many, and a replay hands its events over in batches of this many (a burst that fills a
/// hole from storage can carry up to about twice as many).
const MAX_BATCH: usize = 32;
/// Batches the outbox holds before the feed waits for the client to read: 16 events when each
/// batch is one, up to about 1,000 in full batches.
const OUT_BUFFER: usize = 16;

/// Most `channel_ids`, and most `cursors`, one Subscribe may carry. Each costs the feed a
/// place in the hub and a slot in its bookkeeping: 100,000 entries once took 20 s to set up
/// on SQLite and more than 30 s on PostgreSQL.
pub const MAX_SUBSCRIBE_CHANNELS: usize = 1000;

/// A Subscribe request checked: at most [`MAX_SUBSCRIBE_CHANNELS`] channels and cursors,
/// well-formed ids, cursors not negative; `channel_ids` without repeats (first place kept).
///
/// Errors: `INVALID_ARGUMENT` naming the field.
pub fn checked_request(mut req: proto::SubscribeRequest) -> Result<proto::SubscribeRequest> {
    let mut c = Check::new();
    // Counted first, so an oversized request costs no per-entry work and one violation.
    for (field, n) in [
        ("channel_ids", req.channel_ids.len()),
        ("cursors", req.cursors.len()),
    ] {
        if n > MAX_SUBSCRIBE_CHANNELS {
            c.fail(
                field,
                format!("at most {MAX_SUBSCRIBE_CHANNELS} entries (got {n})"),
            );
        }
    }
    c.done()?;
    let mut c = Check::new();
    for (i, id) in req.channel_ids.iter().enumerate() {
        c.id(&format!("channel_ids[{i}]"), id);
    }
    for (id, seq) in &req.cursors {
        c.id(&format!("cursors[{id}]"), id);
        if *seq < 0 {
            c.fail(format!("cursors[{id}]"), "must not be negative");
        }
    }
    c.done()?;
    let mut seen = std::collections::HashSet::with_capacity(req.channel_ids.len());
    req.channel_ids.retain(|id| seen.insert(id.clone()));
    Ok(req)
}

impl Chat {
    /// Subscribe: validates, registers with the hub, checks cursors, then returns the feed as
    /// the response stream (no task of its own: see [`FeedStream`]).
    ///
    /// Errors: `INVALID_ARGUMENT` (bad ids or cursors, over [`MAX_SUBSCRIBE_CHANNELS`]),
    /// `NOT_FOUND` (a listed channel the caller is not in), `OUT_OF_RANGE` (a cursor beyond its
    /// channel's last sequence), `RESOURCE_EXHAUSTED` (the caller holds `MAX_FEEDS_PER_USER`
    /// feeds open already).
    pub async fn subscribe(
        self: &Arc<Self>,
        caller: Caller,
        req: proto::SubscribeRequest,
    ) -> Result<FeedStream> {
        caller.require(Permission::ViewMessage)?;
        let req = checked_request(req)?;
        let open = self.limits.open_feed(&caller)?;
        let all = req.channel_ids.is_empty();
        let deadline = tokio::time::Instant::now() + caller.time_left();
        let (feed, rx) = self
            .hub
            .register(&caller.tenant_id, &caller.user_id, all, deadline);
        let outbox = Outbox::default();
        let mut session = Session {
            chat: self.clone(),
            caller,
            all,
            feed,
            sent: HashMap::new(),
            batch: Vec::new(),
            outbox: outbox.clone(),
            deadline,
        };
        // Follow first, then read where each channel stands (see the module docs).
        let mut heads: Vec<(String, i64)> = Vec::new();
        if all {
            let before = self
                .store
                .memberships(&session.caller.tenant_id, &session.caller.user_id)
                .await?;
            for (ch, _) in &before {
                session.follow(&ch.id);
            }
            let now = self
                .store
                .memberships(&session.caller.tenant_id, &session.caller.user_id)
                .await?;
            for (ch, _) in now {
                if session.sent.contains_key(&ch.id) {
                    heads.push((ch.id, ch.last_sequence));
                }
            }
            // Channels left between the two reads.
            let gone: Vec<String> = session
                .sent
                .keys()
                .filter(|id| !heads.iter().any(|(h, _)| h == *id))
                .cloned()
                .collect();
            for id in gone {
                session.unfollow(&id);
            }
        } else {
            for id in &req.channel_ids {
                session.follow(id);
            }
            // One read for every listed channel, whatever their number.
            let mut mine: HashMap<String, i64> = self
                .store
                .channel_heads(
                    &session.caller.tenant_id,
                    &session.caller.user_id,
                    &req.channel_ids,
                )
                .await?
                .into_iter()
                .collect();
            for id in &req.channel_ids {
                let last = mine
                    .remove(id)
                    .ok_or_else(|| Error::not_found(format!("channel {id}")))?;
                heads.push((id.clone(), last));
            }
        }
        let mut replay = Vec::new();
        for (id, last) in &heads {
            let start = match req.cursors.get(id) {
                Some(&cursor) if cursor > *last => {
                    return Err(Error::OutOfRange(format!(
                        "cursor {cursor} of channel {id} is beyond its last sequence {last}"
                    )));
                }
                Some(&cursor) => {
                    replay.push(id.clone());
                    cursor
                }
                None => *last,
            };
            session.sent.insert(id.clone(), start);
        }
        Ok(FeedStream {
            run: Some(Box::pin(session.run(rx, replay))),
            outbox,
            current: Vec::new().into_iter(),
            _open: open,
        })
    }
}

/// A Subscribe feed as its response stream. The feed's future (replay, then live events from
/// the hub) is polled by the transport's task for this stream, when the stream is asked for
/// its next item and nothing produced is left to yield: there is no task per feed, and an event
/// costs one wake-up of that task rather than one of a feed task and one of the transport's.
///
/// So the feed advances only while the client reads (HTTP/2 flow control stops the polling
/// when the client's window is full). What arrives meanwhile is not lost: the hub's queue fills,
/// the feed is marked lagged, and it catches up from storage when polled again. A feed whose
/// token expired while its client was not reading ends with `UNAUTHENTICATED` as soon as the
/// client reads again, before anything else is sent. Dropping the stream (the client went away,
/// or the connection closed) drops the feed, which unregisters it.
pub struct FeedStream {
    /// The feed's future; `None` once it has ended.
    run: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    outbox: Outbox,
    /// The batch being yielded.
    current: std::vec::IntoIter<FeedItem>,
    /// Counts this feed against its user's open feeds until the stream is dropped.
    _open: crate::limits::FeedGuard,
}

impl Stream for FeedStream {
    type Item = FeedItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FeedItem>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.current.next() {
                if this.current.len() == 0 {
                    // A spent iterator still holds its batch's buffer.
                    this.current = Vec::new().into_iter();
                }
                return Poll::Ready(Some(item));
            }
            let next = lock(&this.outbox).pop_front();
            if let Some(batch) = next {
                this.current = batch.into_vec().into_iter();
                continue;
            }
            let Some(run) = this.run.as_mut() else {
                return Poll::Ready(None);
            };
            match run.as_mut().poll(cx) {
                // Yield what it left, then end.
                Poll::Ready(()) => this.run = None,
                // Pending with nothing to yield: the feed waits on the hub, a timer or
                // shutdown, each of which wakes this task. (It never waits for room here:
                // the outbox is empty.)
                Poll::Pending if lock(&this.outbox).is_empty() => return Poll::Pending,
                Poll::Pending => {}
            }
        }
    }
}

/// One open feed. Dropping it unregisters it from the hub.
struct Session {
    chat: Arc<Chat>,
    caller: Caller,
    all: bool,
    feed: Arc<Feed>,
    /// Followed channel → last sequence sent to the client.
    sent: HashMap<String, i64>,
    /// Events sent but not yet handed to the outbox ([`Session::flush`]).
    batch: Vec<FeedItem>,
    outbox: Outbox,
    /// When the token expires.
    deadline: tokio::time::Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.chat.hub.unregister(&self.feed, self.sent.keys());
    }
}

/// Whether the feed goes on.
type Go = Result<bool>;

/// What ended a [`Session::wait`].
enum Wake {
    /// An item from the hub; `None` when its queue closed.
    Item(Option<Item>),
    /// The hub could not queue something: catch up from storage.
    Lagged,
    /// The server is shutting down.
    Shutdown,
    /// The heartbeat is due or the token expired.
    Timer,
}

impl Session {
    fn follow(&mut self, channel_id: &str) {
        self.chat.hub.follow(&self.feed, channel_id);
        self.sent.entry(channel_id.to_owned()).or_insert(0);
    }

    fn unfollow(&mut self, channel_id: &str) {
        self.chat.hub.unfollow(&self.feed, channel_id);
        self.sent.remove(channel_id);
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Item>, replay: Vec<String>) {
        let heartbeat_every = self.chat.settings.heartbeat;
        // One timer for both the next heartbeat and the token's expiry, whichever is first.
        let mut next_heartbeat = tokio::time::Instant::now() + heartbeat_every;
        // Across nodes a join notification can be lost on the bus: a feed of all channels
        // looks for channels it was not told of once per heartbeat interval, busy or idle.
        let rejoins = self.all && self.chat.hub.is_cross_node();
        let mut next_rejoin = next_heartbeat;
        let timer = tokio::time::sleep_until(next_heartbeat.min(self.deadline));
        tokio::pin!(timer);
        // The waker the timer was last polled with (see `Session::wait`).
        let mut timer_waker: Option<Waker> = None;
        let outcome = async {
            for id in replay {
                if !Box::pin(self.fill(&id, i64::MAX)).await? {
                    return Ok(());
                }
            }
            if !self.flush().await? {
                return Ok(());
            }
            loop {
                if self.chat.hub.is_shut_down() {
                    return Ok(());
                }
                // A lag on a quiet channel must not wait for a busy one to pause; `flush`
                // checks shutdown and expiry before anything goes out.
                if self.feed.is_lagged()
                    && (!Box::pin(self.catch_up()).await? || !self.flush().await?)
                {
                    return Ok(());
                }
                if rejoins && tokio::time::Instant::now() >= next_rejoin {
                    next_rejoin = tokio::time::Instant::now() + heartbeat_every;
                    // A failed read is tried again next time: the feed stays open through a
                    // database outage, as it does without this.
                    match Box::pin(self.rejoin()).await {
                        Ok(true) => {}
                        Ok(false) => return Ok(()),
                        Err(e) => {
                            tracing::debug!(error = %e, "feed: memberships not re-read; next interval")
                        }
                    }
                    if !self.flush().await? {
                        return Ok(());
                    }
                }
                let wake = match rx.try_recv() {
                    Ok(item) => Wake::Item(Some(item)),
                    Err(_) => {
                        std::future::poll_fn(|cx| {
                            self.wait(cx, &mut rx, timer.as_mut(), &mut timer_waker)
                        })
                        .await
                    }
                };
                let go = match wake {
                    Wake::Item(Some(item)) => self.on_items(item, &mut rx).await?,
                    Wake::Item(None) | Wake::Shutdown => return Ok(()),
                    // Caught up at the top of the loop.
                    Wake::Lagged => true,
                    Wake::Timer => {
                        let now = tokio::time::Instant::now();
                        if now >= self.deadline {
                            return Err(expired());
                        }
                        self.send(heartbeat_event());
                        crate::metrics::feed_heartbeat();
                        // A feed is not polled while its client does not read: one heartbeat
                        // after, not a burst.
                        next_heartbeat = now + heartbeat_every;
                        timer.as_mut().reset(next_heartbeat.min(self.deadline));
                        timer_waker = None;
                        true
                    }
                };
                if !go || !self.flush().await? {
                    return Ok(());
                }
            }
        }
        .await;
        // What was sent before the end goes out first (the last events before a removal ends
        // the feed, say), so the client's cursors stay exact.
        match outcome {
            Ok(()) => {
                let _ = self.flush().await;
            }
            // The error ends the stream, after whatever was sent before it.
            Err(e) => {
                crate::metrics::feed_events(self.batch.len());
                self.batch.push(Err(e));
                let batch = std::mem::take(&mut self.batch).into_boxed_slice();
                lock(&self.outbox).push_back(batch);
            }
        }
    }

    /// Waits for what the feed reacts to: an item from the hub, a lag, shutdown, or the timer
    /// (heartbeat or token expiry).
    ///
    /// It runs once per event that finds the queue empty, so it takes no lock and clones no
    /// waker it already holds. It registers with the queue; with the feed's `AtomicWaker`,
    /// which both a lag and shutdown wake, and which keeps a waker that will wake the same
    /// task; and with the timer only when the polling task's waker is not the one the timer
    /// already holds (`is_elapsed` reads the timer's state without registering). The
    /// `select!` over a `Notify`, a `watch`, a `Sleep` and an `Interval` that it replaces took
    /// two locks and three waker clones per delivery (chat-bench scenario 3).
    fn wait(
        &self,
        cx: &mut Context<'_>,
        rx: &mut mpsc::Receiver<Item>,
        timer: Pin<&mut tokio::time::Sleep>,
        timer_waker: &mut Option<Waker>,
    ) -> Poll<Wake> {
        if let Poll::Ready(item) = rx.poll_recv(cx) {
            return Poll::Ready(Wake::Item(item));
        }
        // Registered before the flags are read, so a mark or shutdown after the reads wakes us.
        self.feed.waker.register(cx.waker());
        if self.chat.hub.is_shut_down() {
            return Poll::Ready(Wake::Shutdown);
        }
        if self.feed.is_lagged() {
            return Poll::Ready(Wake::Lagged);
        }
        if poll_timer(timer, timer_waker, cx).is_ready() {
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    }

    /// Handles `first` and what else the hub has queued for this feed, up to [`MAX_BATCH`]
    /// items, so a busy feed wakes once per burst rather than once per event.
    async fn on_items(&mut self, first: Item, rx: &mut mpsc::Receiver<Item>) -> Go {
        let mut item = first;
        for handled in 1.. {
            let go = match item {
                Item::Event(ev) => self.on_event(&ev).await?,
                Item::Joined(joined) => Box::pin(self.on_joined(&joined.channel_id)).await?,
            };
            if !go || handled == MAX_BATCH {
                return Ok(go);
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                // Empty, or closed: the next `recv` tells.
                Err(_) => return Ok(true),
            }
        }
        Ok(true)
    }

    /// Sends one event: adds it to the batch. Callers end each step with [`Session::flush`].
    ///
    /// Not async, nor is anything that takes an event by value: an async fn keeps its
    /// arguments for its whole life, and a `SubscribeResponse` is ~400 bytes, so each nested
    /// level that held one made every open feed's future larger, idle or not.
    fn send(&mut self, ev: proto::SubscribeResponse) {
        self.batch.push(Ok(ev));
    }

    /// Hands the batch to the outbox, waiting for room only when it is full; nothing goes out
    /// after shutdown or after the token expired.
    async fn flush(&mut self) -> Go {
        if self.batch.is_empty() {
            return Ok(true);
        }
        // The stream yields every queued batch before it polls the feed again, so a full
        // outbox has room by the next poll; the wait needs no waker of its own.
        std::future::poll_fn(|_| {
            if lock(&self.outbox).len() < OUT_BUFFER {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if self.chat.hub.is_shut_down() {
            return Ok(false);
        }
        // Nothing goes out after the token expires, however fast the client reads; what the
        // client did not get it is sent again after its cursor when it reconnects.
        if tokio::time::Instant::now() >= self.deadline {
            self.batch.clear();
            return Err(expired());
        }
        let batch = std::mem::take(&mut self.batch).into_boxed_slice();
        crate::metrics::feed_events(batch.len());
        lock(&self.outbox).push_back(batch);
        Ok(true)
    }

    /// Sends the next event of a channel (`ev`, of `sequence`) and notes it as sent. When the
    /// event removes `removed`, and that is the caller, gives back its channel and sequence for
    /// [`Session::on_removed`].
    fn emit(
        &mut self,
        channel_id: &str,
        sequence: i64,
        removed: Option<&str>,
        ev: proto::SubscribeResponse,
    ) -> Option<(String, i64)> {
        let removal = (removed == Some(self.caller.user_id.as_str()))
            .then(|| (channel_id.to_owned(), sequence));
        if let Some(s) = self.sent.get_mut(channel_id) {
            *s = sequence;
        }
        self.send(ev);
        removal
    }

    /// Follows the caller's removal from a channel (an event already sent by [`Session::emit`]).
    async fn on_removed(&mut self, (channel_id, sequence): (String, i64)) -> Go {
        // A replay can cross a removal that a later re-join undid: only a removal that still
        // holds ends the channel.
        let rejoined = self
            .chat
            .store
            .member(&self.caller.tenant_id, &channel_id, &self.caller.user_id)
            .await?
            .filter(|m| m.join_sequence > sequence);
        if let Some(m) = rejoined {
            // Skip what happened while the caller was not a member.
            self.sent.insert(channel_id, m.join_sequence - 1);
        } else {
            self.unfollow(&channel_id);
            if !self.all && self.sent.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Sends stored events of a channel after the last one sent, up to `up_to`.
    async fn fill(&mut self, channel_id: &str, up_to: i64) -> Go {
        loop {
            let Some(&after) = self.sent.get(channel_id) else {
                return Ok(true);
            };
            if after >= up_to {
                return Ok(true);
            }
            let rows = self
                .chat
                .store
                .events(channel_id, after, up_to, REPLAY_PAGE)
                .await?;
            let full = rows.len() as i64 == REPLAY_PAGE;
            for row in rows {
                if self.sent.get(channel_id).is_none_or(|&s| row.sequence <= s) {
                    continue;
                }
                let removed = crate::event::removed_user(&row.payload).map_err(|e| {
                    Error::Internal(format!("stored event {channel_id}/{}: {e}", row.sequence))
                })?;
                // Sent as stored: the bytes that went out live.
                let ev = proto::SubscribeResponse::from_encoded(row.payload.into());
                if let Some(removal) = self.emit(channel_id, row.sequence, removed.as_deref(), ev) {
                    if !Box::pin(self.on_removed(removal)).await? {
                        return Ok(false);
                    }
                }
                if self.batch.len() >= MAX_BATCH && !self.flush().await? {
                    return Ok(false);
                }
                if !self.sent.contains_key(channel_id) {
                    return Ok(true);
                }
            }
            if !full {
                return Ok(true);
            }
        }
    }

    /// A live event from the hub: sent when it is the channel's next one, after filling any
    /// hole before it from storage; dropped when already sent.
    async fn on_event(&mut self, ev: &LiveEvent) -> Go {
        let Some(&last) = self.sent.get(&ev.channel_id) else {
            return Ok(true);
        };
        let response = || proto::SubscribeResponse::from_encoded(ev.encoded.clone());
        if ev.sequence == 0 {
            self.send(response());
            return Ok(true);
        }
        if ev.sequence <= last {
            return Ok(true);
        }
        if ev.sequence > last + 1 && !Box::pin(self.fill(&ev.channel_id, ev.sequence - 1)).await? {
            return Ok(false);
        }
        match self.sent.get(&ev.channel_id) {
            Some(&now) if now + 1 == ev.sequence => {
                let removed = match &ev.membership {
                    Some(MembershipChange::Removed(user)) => Some(user.as_str()),
                    _ => None,
                };
                match self.emit(&ev.channel_id, ev.sequence, removed, response()) {
                    Some(removal) => Box::pin(self.on_removed(removal)).await,
                    None => Ok(true),
                }
            }
            _ => Ok(true),
        }
    }

    /// The caller joined a channel: follow it from the join on. The notification may be late
    /// (the caller already left again) or stale (left and re-joined): the stored membership
    /// decides, and its `join_sequence` is where the channel starts.
    async fn on_joined(&mut self, channel_id: &str) -> Go {
        if !self.all || self.sent.contains_key(channel_id) {
            return Ok(true);
        }
        let Some(member) = self
            .chat
            .store
            .member(&self.caller.tenant_id, channel_id, &self.caller.user_id)
            .await?
        else {
            return Ok(true);
        };
        self.follow(channel_id);
        self.sent
            .insert(channel_id.to_owned(), member.join_sequence - 1);
        self.fill(channel_id, i64::MAX).await
    }

    /// The hub could not queue some events: read them from storage.
    async fn catch_up(&mut self) -> Go {
        crate::metrics::feed_caught_up();
        let lag = self.feed.take_lag();
        for id in lag.channels {
            if !self.fill(&id, i64::MAX).await? {
                return Ok(false);
            }
        }
        if lag.memberships && self.all {
            return self.rejoin().await;
        }
        Ok(true)
    }

    /// Follows every channel the caller is a member of now and the feed does not follow yet
    /// (a feed of all channels whose join notification was not queued or was lost).
    async fn rejoin(&mut self) -> Go {
        let now = self
            .chat
            .store
            .memberships(&self.caller.tenant_id, &self.caller.user_id)
            .await?;
        for (ch, _) in now {
            if !self.on_joined(&ch.id).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Polls the feed's timer, registering the task's waker with it only when `registered` (the
/// waker it holds) would not wake the same task; `is_elapsed` reads the timer's state without
/// registering, so polling a timer that already holds this task's waker costs no clone. The
/// timer is polled outside tokio's task budget: with the budget spent, a `Sleep` returns
/// pending without taking the waker, and `registered` would claim one it does not hold.
/// Callers clear `registered` after resetting the timer.
fn poll_timer(
    mut timer: Pin<&mut tokio::time::Sleep>,
    registered: &mut Option<Waker>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.is_elapsed() {
        return Poll::Ready(());
    }
    if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        return Poll::Pending;
    }
    if Pin::new(&mut tokio::task::unconstrained(timer.as_mut()))
        .poll(cx)
        .is_ready()
    {
        return Poll::Ready(());
    }
    *registered = Some(cx.waker().clone());
    Poll::Pending
}

fn expired() -> Error {
    Error::Unauthenticated("token expired; reconnect with a new token and your cursors".into())
}

fn heartbeat_event() -> proto::SubscribeResponse {
    let event = Event::Heartbeat(proto::Heartbeat {
        server_time: Some(convert::timestamp(crate::store::now_micros())),
    });
    proto::SubscribeResponse::new(String::new(), 0, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Spends the task's budget for this poll, as a long burst of events does.
    fn spend_budget(cx: &mut Context<'_>) {
        for _ in 0..1_000 {
            let mut unit = std::pin::pin!(tokio::task::consume_budget());
            if unit.as_mut().poll(cx).is_pending() {
                return;
            }
        }
        panic!("the task budget never ran out");
    }

    #[tokio::test]
    async fn timer_fires_when_first_polled_with_the_budget_spent() {
        let timer = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(timer);
        let mut registered = None;
        let first = std::future::poll_fn(|cx| {
            spend_budget(cx);
            Poll::Ready(poll_timer(timer.as_mut(), &mut registered, cx))
        })
        .await;
        assert!(first.is_pending());
        let fired = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| poll_timer(timer.as_mut(), &mut registered, cx)),
        )
        .await;
        assert!(fired.is_ok(), "the timer never woke the task");
    }

    #[tokio::test]
    async fn timer_fires_again_after_a_reset() {
        let timer = tokio::time::sleep(Duration::from_millis(20));
        tokio::pin!(timer);
        let mut registered = None;
        for _ in 0..3 {
            tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| poll_timer(timer.as_mut(), &mut registered, cx)),
            )
            .await
            .expect("fires");
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + Duration::from_millis(20));
            registered = None;
        }
    }
}
