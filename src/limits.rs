//! Limits that keep one client from taking the service from everyone else.
//!
//! Each is a setting with a default (see [`LimitSettings`]) and is kept per user (tenant and
//! user id), so one user at a limit never slows another:
//!
//! - **send rate**: `SendMessage` and `ForwardMessage`, a token bucket per user
//!   ([`governor`]'s GCRA) of `RATE_LIMIT_SENDS_PER_SECOND` with bursts of
//!   `RATE_LIMIT_SENDS_BURST`;
//! - **write rate**: every other call that changes something (edits, deletes, read markers,
//!   favourites, groups and members, uploads and their chunks), a second bucket;
//! - **open feeds**: `Subscribe` streams a user holds open at once on this node;
//! - **streamed uploads** in flight per user on this node (count and declared bytes); resumable
//!   uploads are bounded in the database (see [`crate::domain::attachments`]).
//!
//! A call past a rate answers `RESOURCE_EXHAUSTED` with `google.rpc.RetryInfo` (how long until
//! the bucket has a token again); a call past a count answers `RESOURCE_EXHAUSTED` without it,
//! since only closing something helps. The limits are per node: behind a load balancer a user
//! gets at most N times them across N nodes.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Caller;
use crate::error::Error;

/// Default `RATE_LIMIT_SENDS_PER_SECOND`: a person types far slower; a bot sending for many
/// users should use many users (or raise it).
pub const DEFAULT_SENDS_PER_SECOND: f64 = 20.0;
/// Default `RATE_LIMIT_SENDS_BURST`: sends a user may make at once after a quiet spell.
pub const DEFAULT_SENDS_BURST: u32 = 100;
/// Default `RATE_LIMIT_WRITES_PER_SECOND` (every other change).
pub const DEFAULT_WRITES_PER_SECOND: f64 = 20.0;
/// Default `RATE_LIMIT_WRITES_BURST`.
pub const DEFAULT_WRITES_BURST: u32 = 100;
/// Default `MAX_FEEDS_PER_USER`: Subscribe streams one user may hold open on a node (a few
/// devices, each with a feed or two, and room for reconnects that overlap the old stream).
pub const DEFAULT_FEEDS_PER_USER: u32 = 32;
/// Default `MAX_UNFINISHED_UPLOADS_PER_USER`: resumable uploads not yet completed, and streamed
/// uploads in flight, each counted separately.
pub const DEFAULT_UNFINISHED_UPLOADS: u32 = 16;
/// Default `MAX_UNFINISHED_UPLOAD_BYTES_PER_USER`: the bytes those uploads declared, 1 GiB.
pub const DEFAULT_UNFINISHED_UPLOAD_BYTES: i64 = 1 << 30;

/// The limits' settings. A rate of 0 switches that bucket off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// Sends per second per user, sustained (0: no limit; fractions allowed, 0.5 is one send
    /// every 2 s).
    pub sends_per_second: f64,
    /// Sends per user at once.
    pub sends_burst: u32,
    /// Other writes per second per user (0: no limit; fractions allowed).
    pub writes_per_second: f64,
    /// Other writes per user at once.
    pub writes_burst: u32,
    /// Open Subscribe streams per user.
    pub feeds_per_user: u32,
    /// Unfinished uploads per user (resumable, and streamed in flight, each).
    pub unfinished_uploads: u32,
    /// Bytes declared by a user's unfinished uploads.
    pub unfinished_upload_bytes: i64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            sends_per_second: DEFAULT_SENDS_PER_SECOND,
            sends_burst: DEFAULT_SENDS_BURST,
            writes_per_second: DEFAULT_WRITES_PER_SECOND,
            writes_burst: DEFAULT_WRITES_BURST,
            feeds_per_user: DEFAULT_FEEDS_PER_USER,
            unfinished_uploads: DEFAULT_UNFINISHED_UPLOADS,
            unfinished_upload_bytes: DEFAULT_UNFINISHED_UPLOAD_BYTES,
        }
    }
}

impl LimitSettings {
    /// Settings with every limit lifted (tools and benchmarks that drive one user hard).
    pub fn unlimited() -> LimitSettings {
        LimitSettings {
            sends_per_second: 0.0,
            sends_burst: 0,
            writes_per_second: 0.0,
            writes_burst: 0,
            feeds_per_user: u32::MAX,
            unfinished_uploads: u32::MAX,
            unfinished_upload_bytes: i64::MAX,
        }
    }
}

/// (tenant, user): whose bucket or count.
type UserKey = (String, String);

fn key(caller: &Caller) -> UserKey {
    (caller.tenant_id.clone(), caller.user_id.clone())
}

/// A named limit, as it appears in messages and in the `limit` label of
/// `chat_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The send bucket.
    SendRate,
    /// The bucket of other writes.
    WriteRate,
    /// Open Subscribe streams.
    Feeds,
    /// Unfinished uploads (count).
    Uploads,
    /// Unfinished uploads (declared bytes).
    UploadBytes,
}

impl Limit {
    /// The limit's name: `send_rate`, `write_rate`, `feeds`, `uploads`, `upload_bytes`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::SendRate => "send_rate",
            Limit::WriteRate => "write_rate",
            Limit::Feeds => "feeds",
            Limit::Uploads => "uploads",
            Limit::UploadBytes => "upload_bytes",
        }
    }
}

/// A refusal: counted (for operators) and turned into the domain error.
pub fn refuse(limit: Limit, message: String, retry_after: Option<Duration>) -> Error {
    refused_hook(limit);
    match retry_after {
        Some(retry_after) => Error::RateLimited {
            message,
            retry_after,
        },
        None => Error::ResourceExhausted(message),
    }
}

/// Counts a refusal in `chat_limit_refusals_total{limit}` ([`crate::metrics`]).
fn refused_hook(limit: Limit) {
    crate::metrics::limit_refused(limit.name());
    tracing::debug!(limit = limit.name(), "limit reached");
}

/// One token bucket per user.
struct Bucket {
    limiter: DefaultKeyedRateLimiter<UserKey>,
    limit: Limit,
    per_second: f64,
}

impl Bucket {
    /// `None` (no limit) for a rate of 0 or one that is not a finite positive number.
    fn new(limit: Limit, per_second: f64, burst: u32) -> Option<Bucket> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        // One token every 1/rate seconds; governor's period has nanosecond resolution.
        let period = Duration::try_from_secs_f64(1.0 / per_second)
            .ok()
            .filter(|p| !p.is_zero())?;
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Some(Bucket {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::with_period(period)?.allow_burst(burst)),
            limit,
            per_second,
        })
    }

    fn take(&self, caller: &Caller) -> Result<(), Error> {
        self.limiter.check_key(&key(caller)).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            refuse(
                self.limit,
                format!(
                    "{} limit reached: at most {} per second per user; retry in {} ms",
                    self.limit.name().replace('_', " "),
                    self.per_second,
                    wait.as_millis().max(1)
                ),
                Some(wait),
            )
        })
    }
}

/// The limits of one node. Cheap to share behind an `Arc`.
pub struct Limits {
    settings: LimitSettings,
    sends: Option<Bucket>,
    writes: Option<Bucket>,
    /// Open feeds per user.
    feeds: Arc<Mutex<HashMap<UserKey, u32>>>,
    /// Streamed uploads in flight per user: (count, declared bytes).
    streamed: Arc<Mutex<HashMap<UserKey, (u32, i64)>>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(LimitSettings::default())
    }
}

impl Limits {
    /// Limits with these settings.
    pub fn new(settings: LimitSettings) -> Limits {
        Limits {
            settings,
            sends: Bucket::new(
                Limit::SendRate,
                settings.sends_per_second,
                settings.sends_burst,
            ),
            writes: Bucket::new(
                Limit::WriteRate,
                settings.writes_per_second,
                settings.writes_burst,
            ),
            feeds: Default::default(),
            streamed: Default::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Takes a token from the caller's send bucket. Errors: `Error::RateLimited`.
    pub fn send(&self, caller: &Caller) -> Result<(), Error> {
        self.sends.as_ref().map_or(Ok(()), |b| b.take(caller))
    }

    /// Takes a token from the caller's bucket of other writes. Errors: `Error::RateLimited`.
    pub fn write(&self, caller: &Caller) -> Result<(), Error> {
        self.writes.as_ref().map_or(Ok(()), |b| b.take(caller))
    }

    /// Counts an open feed of the caller until the guard drops.
    ///
    /// Errors: `Error::ResourceExhausted` when the caller holds `feeds_per_user` already.
    pub fn open_feed(&self, caller: &Caller) -> Result<FeedGuard, Error> {
        let key = key(caller);
        let mut feeds = lock(&self.feeds);
        // Checked before any entry is made: a refused user leaves nothing behind.
        if feeds.get(&key).copied().unwrap_or(0) >= self.settings.feeds_per_user {
            return Err(refuse(
                Limit::Feeds,
                format!(
                    "at most {} open Subscribe streams per user; close one first",
                    self.settings.feeds_per_user
                ),
                None,
            ));
        }
        *feeds.entry(key.clone()).or_insert(0) += 1;
        Ok(FeedGuard {
            feeds: self.feeds.clone(),
            key,
        })
    }

    /// Counts a streamed upload of `declared` bytes until the guard drops.
    ///
    /// Errors: `Error::ResourceExhausted` when the caller's streamed uploads in flight would
    /// pass `unfinished_uploads` or `unfinished_upload_bytes`.
    pub fn start_streamed_upload(
        &self,
        caller: &Caller,
        declared: i64,
    ) -> Result<UploadGuard, Error> {
        let key = key(caller);
        let mut streamed = lock(&self.streamed);
        let (count, bytes) = streamed.get(&key).copied().unwrap_or((0, 0));
        self.check_uploads(i64::from(count), bytes, declared)?;
        let entry = streamed.entry(key.clone()).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += declared;
        Ok(UploadGuard {
            streamed: self.streamed.clone(),
            key,
            declared,
        })
    }

    /// The streamed uploads `user` of `tenant` has in flight on this node: (count, declared
    /// bytes).
    pub fn streamed_uploads(&self, tenant: &str, user: &str) -> (u32, i64) {
        lock(&self.streamed)
            .get(&(tenant.to_owned(), user.to_owned()))
            .copied()
            .unwrap_or((0, 0))
    }

    /// Whether one more upload of `declared` bytes fits beside `count` unfinished ones holding
    /// `bytes`. Errors: `Error::ResourceExhausted` naming the limit.
    pub fn check_uploads(&self, count: i64, bytes: i64, declared: i64) -> Result<(), Error> {
        let s = &self.settings;
        if count >= i64::from(s.unfinished_uploads) {
            return Err(refuse(
                Limit::Uploads,
                format!(
                    "at most {} unfinished uploads per user; complete or wait for one first",
                    s.unfinished_uploads
                ),
                None,
            ));
        }
        if bytes.saturating_add(declared) > s.unfinished_upload_bytes {
            return Err(refuse(
                Limit::UploadBytes,
                format!(
                    "unfinished uploads may declare at most {} bytes per user ({bytes} open)",
                    s.unfinished_upload_bytes
                ),
                None,
            ));
        }
        Ok(())
    }

    /// Forgets the buckets of users who have been quiet long enough to have a full bucket
    /// again (they behave the same without state), so memory follows active users only.
    pub fn forget_idle(&self) {
        for bucket in [&self.sends, &self.writes].into_iter().flatten() {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An open feed, counted until dropped.
#[derive(Debug)]
pub struct FeedGuard {
    feeds: Arc<Mutex<HashMap<UserKey, u32>>>,
    key: UserKey,
}

impl Drop for FeedGuard {
    fn drop(&mut self) {
        let mut feeds = lock(&self.feeds);
        if let Some(n) = feeds.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                feeds.remove(&self.key);
            }
        }
    }
}

/// A streamed upload in flight, counted until dropped.
#[derive(Debug)]
pub struct UploadGuard {
    streamed: Arc<Mutex<HashMap<UserKey, (u32, i64)>>>,
    key: UserKey,
    declared: i64,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut streamed = lock(&self.streamed);
        if let Some((n, bytes)) = streamed.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            *bytes -= self.declared;
            if *n == 0 {
                streamed.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(user: &str) -> Caller {
        Caller::new(user, "t", &[], u64::MAX)
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_with_a_wait_and_spares_other_users() {
        let limits = Limits::new(LimitSettings {
            sends_per_second: 1.0,
            sends_burst: 3,
            ..LimitSettings::default()
        });
        for _ in 0..3 {
            limits.send(&caller("a")).expect("within the burst");
        }
        match limits.send(&caller("a")) {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
        limits
            .send(&caller("b"))
            .expect("another user is unaffected");
        limits
            .write(&caller("a"))
            .expect("writes have their own bucket");
    }

    #[test]
    fn feeds_and_streamed_uploads_are_counted_until_dropped() {
        let limits = Limits::new(LimitSettings {
            feeds_per_user: 2,
            unfinished_uploads: 2,
            unfinished_upload_bytes: 100,
            ..LimitSettings::default()
        });
        let a = limits.open_feed(&caller("a")).expect("1");
        let _b = limits.open_feed(&caller("a")).expect("2");
        assert!(matches!(
            limits.open_feed(&caller("a")),
            Err(Error::ResourceExhausted(_))
        ));
        limits.open_feed(&caller("z")).expect("another user");
        drop(a);
        limits.open_feed(&caller("a")).expect("room again");

        let u = limits.start_streamed_upload(&caller("a"), 60).expect("60");
        assert!(
            limits.start_streamed_upload(&caller("a"), 41).is_err(),
            "101 bytes"
        );
        let _v = limits.start_streamed_upload(&caller("a"), 40).expect("100");
        drop(u);
        limits
            .start_streamed_upload(&caller("a"), 60)
            .expect("room again");
    }
}
