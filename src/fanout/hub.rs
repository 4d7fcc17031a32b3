//! The in-process hub: live delivery of committed events to this node's open feeds.
//!
//! The [`Hub`] keeps, per channel, the feeds following it, and per user the feeds that follow
//! "all my channels" (so a channel joined while a feed is open starts flowing). Publishing never
//! waits: each feed has a bounded buffer, and when it is full the event is not queued but the
//! feed is marked *lagged* for that channel and woken; the feed then reads what it missed from
//! storage (the event log is the source of truth, the hub only a fast path). So a slow reader
//! never blocks a sender, and never loses an event.
//!
//! The hub also keeps, per followed channel, the highest sequence it has published there
//! ([`Hub::followed`]): what the cross-node head check compares with storage.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::task::AtomicWaker;
use tokio::sync::mpsc;

use super::{Item, Joined, LiveEvent, MembershipChange, Publisher};

/// What a lagged feed must read back from storage.
#[derive(Debug, Default)]
pub struct Lag {
    /// Channels whose events were not queued.
    pub channels: HashSet<String>,
    /// A join notification was not queued: re-read memberships.
    pub memberships: bool,
}

/// One open feed's registration.
#[derive(Debug)]
pub struct Feed {
    id: u64,
    user_key: Option<UserKey>,
    tx: mpsc::Sender<Item>,
    lag: Mutex<Lag>,
    /// Whether `lag` holds anything: a plain load for a feed that checks on every batch.
    lagged: AtomicBool,
    /// The waker of the feed's task: woken when `lag` gains an entry and on shutdown. The
    /// feed registers it before it reads [`Feed::is_lagged`] and [`Hub::is_shut_down`].
    pub waker: AtomicWaker,
    /// When the feed's token expires. Past it the feed sends nothing more, so a feed the hub
    /// cannot queue for (its client stopped reading) is dropped from the hub instead of being
    /// marked lagged.
    expires: tokio::time::Instant,
}

/// A feed counts as open (`chat_feeds_open`) from [`Hub::register`] until its last reference
/// goes, which is when its Subscribe stream ends.
impl Drop for Feed {
    fn drop(&mut self) {
        crate::metrics::feed_closed();
    }
}

impl Feed {
    /// Takes what the feed missed so far.
    pub fn take_lag(&self) -> Lag {
        // Cleared first: a mark that lands meanwhile sets it again.
        self.lagged.store(false, Ordering::Release);
        std::mem::take(&mut *self.lag.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the hub could not queue something since the last [`Feed::take_lag`].
    pub fn is_lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }

    /// Records a miss; wakes the feed only when the miss is new, so a feed that has stopped
    /// reading costs each later publish a lock and a lookup, nothing more.
    fn mark(&self, f: impl FnOnce(&mut Lag) -> bool) {
        let new = f(&mut self.lag.lock().unwrap_or_else(|p| p.into_inner()));
        if new {
            self.lagged.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Queues an item, or records the miss. False when the feed should leave the hub: its
    /// queue is full and its token has expired.
    fn offer(&self, item: Item, channel: Option<&str>) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_))
                if tokio::time::Instant::now() >= self.expires =>
            {
                return false
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.mark(|lag| match channel {
                Some(c) if lag.channels.contains(c) => false,
                Some(c) => lag.channels.insert(c.to_owned()),
                None => !std::mem::replace(&mut lag.memberships, true),
            }),
            // The feed is closing; its guard removes it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        true
    }
}

type FeedMap<K> = HashMap<K, HashMap<u64, Arc<Feed>>>;

/// The feeds following one channel, and the highest sequence published to them.
#[derive(Debug, Default)]
struct Followers {
    feeds: HashMap<u64, Arc<Feed>>,
    /// Highest sequence [`Hub::publish`] offered to this channel's feeds since the first of
    /// them followed it (0 before any). Only publishes move it, so every feed following the
    /// channel has been offered an event at least this high or started past it.
    seen: AtomicI64,
}

/// `(tenant, user)`: users are only unique within a tenant.
type UserKey = (String, String);

/// The in-process fan-out hub.
#[derive(Debug)]
pub struct Hub {
    /// channel id → feeds. A read-write lock: publishing (read) far outnumbers joins (write).
    channels: RwLock<HashMap<String, Followers>>,
    /// `(tenant, user)` → feeds of all that user's channels.
    users: RwLock<FeedMap<UserKey>>,
    next_id: AtomicU64,
    /// Per-feed buffer, in events. Large enough to ride out bursts, small enough that a reader
    /// that falls behind costs little memory before it is switched to catching up from storage.
    /// A reader that stops reading altogether keeps this buffer's events until its stream is
    /// dropped (its feed is not polled), and its registration until its token expires.
    buffer: usize,
    /// Set by [`Hub::shutdown`]; a plain load for the checks on every batch.
    shut_down: AtomicBool,
    /// Set when events also reach this hub from other nodes ([`Hub::set_cross_node`]).
    cross_node: AtomicBool,
}

/// Default per-feed buffer, in events.
pub const DEFAULT_FEED_BUFFER: usize = 256;

impl Default for Hub {
    fn default() -> Self {
        Hub::new(DEFAULT_FEED_BUFFER)
    }
}

impl Hub {
    /// A hub whose feeds buffer up to `buffer` events each.
    pub fn new(buffer: usize) -> Hub {
        Hub {
            channels: RwLock::default(),
            users: RwLock::default(),
            next_id: AtomicU64::new(1),
            buffer: buffer.max(1),
            shut_down: AtomicBool::new(false),
            cross_node: AtomicBool::new(false),
        }
    }

    /// Registers a feed whose token expires at `expires`; with `all_channels`, it also hears
    /// of channels the user joins.
    pub fn register(
        &self,
        tenant: &str,
        user: &str,
        all_channels: bool,
        expires: tokio::time::Instant,
    ) -> (Arc<Feed>, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(self.buffer);
        crate::metrics::feed_opened();
        let user_key = all_channels.then(|| (tenant.to_owned(), user.to_owned()));
        let feed = Arc::new(Feed {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            user_key: user_key.clone(),
            tx,
            lag: Mutex::default(),
            lagged: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            expires,
        });
        if let Some(k) = user_key {
            write(&self.users)
                .entry(k)
                .or_default()
                .insert(feed.id, feed.clone());
        }
        (feed, rx)
    }

    /// Starts delivering a channel's events to a feed.
    pub fn follow(&self, feed: &Arc<Feed>, channel_id: &str) {
        write(&self.channels)
            .entry(channel_id.to_owned())
            .or_default()
            .feeds
            .insert(feed.id, feed.clone());
    }

    /// Stops delivering a channel's events to a feed.
    pub fn unfollow(&self, feed: &Feed, channel_id: &str) {
        let mut map = write(&self.channels);
        if let Some(followers) = map.get_mut(channel_id) {
            followers.feeds.remove(&feed.id);
            if followers.feeds.is_empty() {
                map.remove(channel_id);
            }
        }
    }

    /// Removes a feed entirely (its channels and its user registration).
    pub fn unregister<'a>(&self, feed: &Feed, channels: impl IntoIterator<Item = &'a String>) {
        for c in channels {
            self.unfollow(feed, c);
        }
        if let Some(k) = &feed.user_key {
            let mut map = write(&self.users);
            if let Some(feeds) = map.get_mut(k) {
                feeds.remove(&feed.id);
                if feeds.is_empty() {
                    map.remove(k);
                }
            }
        }
    }

    /// Number of channels with at least one feed (for metrics and tests).
    pub fn followed_channels(&self) -> usize {
        read(&self.channels).len()
    }

    /// Every channel with at least one feed, with the highest sequence published to it since
    /// it was first followed (0 before any): `(channel id, sequence)`, in no order.
    pub fn followed(&self) -> Vec<(String, i64)> {
        read(&self.channels)
            .iter()
            .map(|(id, f)| (id.clone(), f.seen.load(Ordering::Acquire)))
            .collect()
    }

    /// The highest sequence published to `channel_id` since it was first followed; `None`
    /// when no feed follows it.
    pub fn seen(&self, channel_id: &str) -> Option<i64> {
        read(&self.channels)
            .get(channel_id)
            .map(|f| f.seen.load(Ordering::Acquire))
    }

    /// Whether `(tenant, user)` has a feed of all their channels on this node.
    pub fn has_all_channels_feed(&self, tenant: &str, user: &str) -> bool {
        read(&self.users).contains_key(&(tenant.to_owned(), user.to_owned()))
    }

    /// Declares that events also reach this hub from other nodes, over a bus that may lose
    /// some: feeds of all their channels then re-read their memberships with each heartbeat,
    /// so a lost join notification is noticed within one heartbeat.
    pub fn set_cross_node(&self) {
        self.cross_node.store(true, Ordering::Release);
    }

    /// Whether [`Hub::set_cross_node`] was called.
    pub fn is_cross_node(&self) -> bool {
        self.cross_node.load(Ordering::Acquire)
    }

    /// Ends every feed (graceful shutdown): sets the flag every feed checks, then wakes every
    /// registered feed. A feed registers its waker before it reads the flag, so none sleeps
    /// through it; a feed that follows no channel and is not of all channels has ended
    /// already, or its token has expired and its timer ends it.
    pub fn shutdown(&self) {
        self.shut_down.store(true, Ordering::Release);
        for followers in read(&self.channels).values() {
            for feed in followers.feeds.values() {
                feed.waker.wake();
            }
        }
        for feeds in read(&self.users).values() {
            for feed in feeds.values() {
                feed.waker.wake();
            }
        }
    }

    /// Whether [`Hub::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }
}

impl Publisher for Hub {
    fn publish(&self, event: Arc<LiveEvent>) {
        let mut expired: Vec<Arc<Feed>> = Vec::new();
        if let Some(followers) = read(&self.channels).get(&event.channel_id) {
            followers.seen.fetch_max(event.sequence, Ordering::AcqRel);
            for feed in followers.feeds.values() {
                if !feed.offer(Item::Event(event.clone()), Some(&event.channel_id)) {
                    expired.push(feed.clone());
                }
            }
        }
        // Feeds whose client stopped reading and whose token has expired: their stream is not
        // polled, so they would stay registered until their connection closes. They leave this
        // channel now (and every other one as it publishes); the feed ends with
        // UNAUTHENTICATED if its client reads again.
        for feed in expired {
            self.unfollow(&feed, &event.channel_id);
        }
        if let Some(MembershipChange::Added(user)) = &event.membership {
            let key = (event.tenant_id.clone(), user.clone());
            let mut expired: Vec<u64> = Vec::new();
            if let Some(feeds) = read(&self.users).get(&key) {
                for feed in feeds.values() {
                    let item = Item::Joined(Box::new(Joined {
                        channel_id: event.channel_id.clone(),
                        sequence: event.sequence,
                    }));
                    if !feed.offer(item, None) {
                        expired.push(feed.id);
                    }
                }
            }
            if !expired.is_empty() {
                let mut map = write(&self.users);
                if let Some(feeds) = map.get_mut(&key) {
                    for id in expired {
                        feeds.remove(&id);
                    }
                    if feeds.is_empty() {
                        map.remove(&key);
                    }
                }
            }
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
