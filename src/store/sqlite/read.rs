//! History pages on SQLite, read through rusqlite, on the calling runtime worker when one is
//! free for it and on tokio's blocking pool otherwise (see [`SqliteReaders::run`]).
//!
//! sqlx runs each SQLite connection on a worker thread of its own and hands every row back
//! over a channel, each value copied out of SQLite into an allocation of its own, and each
//! column then looked up by name. For a history page (51 rows of 16 columns) that overhead
//! was most of the page's cost: in chat-bench scenario 5 the sqlx worker threads took 39% of
//! the machine's CPU, of which SQLite's own VM was 2.5 points. Here a page is one job: the
//! statement is prepared once per connection, each row is written by column index straight
//! into wire form (the caller's [`crate::store::RowWriter`]), and the page is handed over
//! whole, or not at all when it ran in place.
//!
//! Only reads go this way; writes stay on sqlx's single writer connection. The connections
//! are read-only and WAL lets them read beside the writer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::sqlite_unavailable;
use crate::store::{MessageColumns, StoreError, StoreResult};

/// Prepared statements each connection keeps (rusqlite's LRU cache, keyed by SQL text).
const STATEMENT_CACHE: usize = 32;

/// A connection older than this is closed instead of reused (sqlx's default lifetime), so a
/// database file replaced underneath the server is picked up by the readers too.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How long a read waits for a free connection before failing as unavailable (sqlx's default
/// acquire timeout).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool of read-only rusqlite connections to one SQLite file. Cloning shares the pool.
#[derive(Clone)]
pub struct SqliteReaders {
    inner: Arc<Inner>,
}

struct Inner {
    /// Jobs that may run on the calling runtime worker at once: half the workers of a
    /// multi-threaded runtime, rounded down, so none with one worker; the rest go to the
    /// blocking pool. See [`SqliteReaders::run`].
    inline: Semaphore,
    path: PathBuf,
    mmap_bytes: u64,
    busy_timeout: Duration,
    max_connections: usize,
    /// Idle connections with the time each was opened; at most `max_connections` are open
    /// at once (one per permit).
    idle: Mutex<Vec<(Connection, Instant)>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for SqliteReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReaders")
            .field("path", &self.inner.path)
            .field("max_connections", &self.inner.max_connections)
            .finish()
    }
}

impl SqliteReaders {
    /// A pool of at most `max_connections` connections to the database file at `path`,
    /// opened on first use. Each maps up to `mmap_bytes` of the file (`PRAGMA mmap_size`) and
    /// waits up to `busy_timeout` for a lock.
    pub fn new(
        path: PathBuf,
        max_connections: usize,
        mmap_bytes: u64,
        busy_timeout: Duration,
    ) -> Self {
        let max_connections = max_connections.max(1);
        // Outside a runtime, or on a current-thread one, every job goes to the blocking pool:
        // a job in place would hold the only thread that drives I/O.
        let workers = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .map_or(0, |h| h.metrics().num_workers());
        SqliteReaders {
            inner: Arc::new(Inner {
                inline: Semaphore::new(workers / 2),
                path,
                mmap_bytes,
                busy_timeout,
                max_connections,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_connections)),
            }),
        }
    }

    /// Runs `f` on a connection of the pool. The connection goes back to the pool when `f`
    /// returns, even if the caller stopped waiting; one on which `f` failed, or older than
    /// [`MAX_LIFETIME`], is closed instead.
    ///
    /// Where `f` runs: on the calling runtime worker when fewer than half the workers of a
    /// multi-threaded runtime (rounded down) are already running such a job, else on tokio's
    /// blocking pool. A history page is 50-100 µs of CPU on a warm file, about what the
    /// hand-over to and back from the blocking pool costs (two futex wake-ups and two context
    /// switches); see BENCHMARKS.md, round 8, for what running in place bought. A read that
    /// waits for the disk, or for a lock up to the busy timeout, holds its worker meanwhile,
    /// so at least half of the workers always stay free to drive connections and feeds; with
    /// one worker nothing runs in place.
    ///
    /// Errors: `StoreError::Unavailable` when no connection frees up within
    /// [`ACQUIRE_TIMEOUT`], the file cannot be opened, the database is busy past the busy
    /// timeout, or the job could not be run; `StoreError::Internal` for any other SQLite
    /// error and for a panic in `f` on the blocking pool (on a worker, a panic unwinds into
    /// the calling task, as any other panic there does).
    pub async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let acquire = self.inner.permits.clone().acquire_owned();
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, acquire)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "no SQLite reader free in {} s",
                    ACQUIRE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|_| StoreError::Unavailable("SQLite readers closed".into()))?;
        if let Ok(_inline) = self.inner.inline.try_acquire() {
            let _permit = permit;
            return self.inner.with_connection(f);
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inner.with_connection(f)
        })
        .await
        .map_err(|e| {
            if e.is_panic() {
                StoreError::Internal(format!("SQLite read job panicked: {e}"))
            } else {
                StoreError::Unavailable(format!("SQLite read job: {e}"))
            }
        })?
    }
}

impl Inner {
    /// Runs `f` on an idle connection (a new one when none is idle or the idle one is too
    /// old), and keeps the connection for the next job when `f` succeeded.
    fn with_connection<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let idle = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        let (conn, opened) = match idle {
            Some((c, opened)) if opened.elapsed() < MAX_LIFETIME => (c, opened),
            _ => (self.open().map_err(store_error)?, Instant::now()),
        };
        let out = f(&conn)?;
        if let Ok(mut v) = self.idle.lock() {
            v.push((conn, opened));
        }
        Ok(out)
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // The pragma answers with the size it took, so it is run as a query.
        conn.pragma_update_and_check(None, "mmap_size", self.mmap_bytes, |_| Ok(()))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

/// The store's rule for storage trouble ([`sqlite_unavailable`], on SQLite's result code);
/// anything else is a bug or a broken file.
pub(super) fn store_error(e: rusqlite::Error) -> StoreError {
    if e.sqlite_error()
        .is_some_and(|f| sqlite_unavailable(i64::from(f.extended_code)))
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Internal(e.to_string())
    }
}

/// The values a history query binds by name (`$1` channel, `$2` before, `$3` user, `$4`
/// tenant, `$5` the thread's parent when given), owned so a job can take them along. By name,
/// because the thread clause puts `$5` before `$2` in the text.
pub struct HistoryBinds {
    channel: String,
    user: String,
    tenant: String,
    parent: Option<String>,
}

impl HistoryBinds {
    /// The binds of one page.
    pub fn new(channel: &str, user: &str, tenant: &str, parent: Option<&str>) -> Self {
        HistoryBinds {
            channel: channel.to_owned(),
            user: user.to_owned(),
            tenant: tenant.to_owned(),
            parent: parent.map(str::to_owned),
        }
    }

    /// The named parameters, with `before` as `$2`.
    pub fn params<'a>(&'a self, before: &'a i64) -> Vec<(&'a str, &'a dyn rusqlite::ToSql)> {
        let mut params: Vec<(&str, &dyn rusqlite::ToSql)> = vec![
            ("$1", &self.channel),
            ("$2", before),
            ("$3", &self.user),
            ("$4", &self.tenant),
        ];
        if let Some(parent) = &self.parent {
            params.push(("$5", parent));
        }
        params
    }
}

/// A rusqlite row of [`crate::store::MESSAGE_COLUMNS`], for a [`crate::store::RowWriter`].
impl MessageColumns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> StoreResult<&str> {
        match self.get_ref(i).map_err(store_error)? {
            ValueRef::Null => Ok(""),
            v => v
                .as_str()
                .map_err(|e| StoreError::Internal(format!("column {i}: {e}"))),
        }
    }

    fn integer(&self, i: usize) -> StoreResult<Option<i64>> {
        self.get(i).map_err(store_error)
    }
}
