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
use std::task::{Context, Poll};

use futures::Stream;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::auth::{Caller, Permission};
use crate::error::{Error, Result};
use crate::fanout::{Feed, Item, LiveEvent};
use crate::proto::{self, subscribe_response::Event};

use super::validate::Check;
use super::{convert, Chat};

/// What a feed yields: events, or one final error (`UNAUTHENTICATED` on token expiry,
/// `UNAVAILABLE` when storage fails).
pub type FeedItem = Result<proto::SubscribeResponse>;

/// What the feed's outbox holds: a batch of consecutive items, which the encoder writes back to
/// back into one HTTP/2 DATA frame. A boxed slice (two words), because a `FeedItem` is ~384
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

impl Chat {
    /// Subscribe: validates, registers with the hub, checks cursors, then returns the feed as
    /// the response stream (no task of its own: see [`FeedStream`]).
    ///
    /// Errors: `INVALID_ARGUMENT` (bad ids or cursors), `NOT_FOUND` (a listed channel the caller
    /// is not in), `OUT_OF_RANGE` (a cursor beyond its channel's last sequence).
    pub async fn subscribe(
        self: &Arc<Self>,
        caller: Caller,
        req: proto::SubscribeRequest,
    ) -> Result<FeedStream> {
        caller.require(Permission::ViewMessage)?;
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
            for id in &req.channel_ids {
                let (ch, _) = self.channel_as_member(&session.caller, id).await?;
                heads.push((ch.id, ch.last_sequence));
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
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + heartbeat_every,
            heartbeat_every,
        );
        // A feed is not polled while its client does not read: one heartbeat after, not a burst.
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expiry = tokio::time::sleep_until(self.deadline);
        tokio::pin!(expiry);
        let mut shutdown = self.chat.hub.shutdown_signal();
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
                // Plain loads, because the select below polls queued events first: while they
                // flow, its other branches are not polled at all (polling shutdown's and the
                // lag's notifications takes a lock each). A lag on a quiet channel must not
                // wait for a busy one to pause; `flush` checks shutdown and expiry before
                // anything goes out.
                if self.feed.is_lagged()
                    && (!Box::pin(self.catch_up()).await? || !self.flush().await?)
                {
                    return Ok(());
                }
                let go = tokio::select! {
                    biased;
                    item = rx.recv() => match item {
                        Some(item) => self.on_items(item, &mut rx).await?,
                        None => return Ok(()),
                    },
                    _ = shutdown.changed() => return Ok(()),
                    _ = &mut expiry => return Err(expired()),
                    _ = self.feed.wake.notified() => Box::pin(self.catch_up()).await?,
                    _ = heartbeat.tick() => {
                        self.send(heartbeat_event());
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
                self.batch.push(Err(e));
                let batch = std::mem::take(&mut self.batch).into_boxed_slice();
                lock(&self.outbox).push_back(batch);
            }
        }
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
    /// arguments for its whole life, and a `SubscribeResponse` is ~376 bytes, so each nested
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
        lock(&self.outbox).push_back(batch);
        Ok(true)
    }

    /// Sends the next event of a channel and notes it as sent. When the event removes the
    /// caller from the channel, gives back its channel and sequence for [`Session::on_removed`].
    fn emit(&mut self, ev: proto::SubscribeResponse) -> Option<(String, i64)> {
        let sequence = ev.sequence;
        let removes_me = matches!(
            &ev.event,
            Some(Event::MemberRemoved(r)) if r.member.as_ref().is_some_and(|m| m.user_id == self.caller.user_id)
        );
        let removal = removes_me.then(|| (ev.channel_id.clone(), sequence));
        if let Some(s) = self.sent.get_mut(&ev.channel_id) {
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
                let ev = proto::SubscribeResponse::decode(row.payload.as_slice()).map_err(|e| {
                    Error::Internal(format!("stored event {channel_id}/{}: {e}", row.sequence))
                })?;
                if let Some(removal) = self.emit(ev) {
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
        if ev.sequence == 0 {
            self.send(ev.response.clone());
            return Ok(true);
        }
        if ev.sequence <= last {
            return Ok(true);
        }
        if ev.sequence > last + 1 && !Box::pin(self.fill(&ev.channel_id, ev.sequence - 1)).await? {
            return Ok(false);
        }
        match self.sent.get(&ev.channel_id) {
            Some(&now) if now + 1 == ev.sequence => match self.emit(ev.response.clone()) {
                Some(removal) => Box::pin(self.on_removed(removal)).await,
                None => Ok(true),
            },
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
        let lag = self.feed.take_lag();
        for id in lag.channels {
            if !self.fill(&id, i64::MAX).await? {
                return Ok(false);
            }
        }
        if lag.memberships && self.all {
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
        }
        Ok(true)
    }
}

fn expired() -> Error {
    Error::Unauthenticated("token expired; reconnect with a new token and your cursors".into())
}

fn heartbeat_event() -> proto::SubscribeResponse {
    proto::SubscribeResponse {
        channel_id: String::new(),
        sequence: 0,
        event: Some(Event::Heartbeat(proto::Heartbeat {
            server_time: Some(convert::timestamp(crate::store::now_micros())),
        })),
    }
}
