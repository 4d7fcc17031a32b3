//! The SQL of every repository trait, written once and instantiated for SQLite and PostgreSQL
//! by `impl_store!`. Both databases accept `$n` placeholders, `RETURNING` and
//! `ON CONFLICT DO NOTHING`, so the text is shared; the differences (pools, pragmas, migration
//! folders) live in [`connect`].

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{FromRow, Postgres, Sqlite, Transaction};
use uuid::Uuid;

use super::sqlite_read::{HistoryBinds, SqliteReaders, MESSAGE_COLUMNS};
use super::*;
use crate::page::{EncodedMessages, MessageColumns};

/// Microseconds since the Unix epoch, the unit of every stored time.
pub fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Most rows per multi-row INSERT of a group commit (13 binds each: far below SQLite's
/// 32,766 and PostgreSQL's 65,535 parameters per statement).
const ROWS_PER_INSERT: usize = 256;

/// Splits `n` rows into multi-row INSERTs of at most [`ROWS_PER_INSERT`] rows each; with
/// `power_of_two`, of power-of-two sizes (37 → 32, 4, 1), largest first. A statement's text
/// depends on its row count, and prepared statements are cached per connection by text: with
/// sizes from this small set (1, 2, 4, … 256) every one is prepared once, not re-parsed for
/// each new batch size.
fn insert_sizes(mut n: usize, power_of_two: bool) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= ROWS_PER_INSERT {
            ROWS_PER_INSERT
        } else if power_of_two {
            1 << (usize::BITS - 1 - n.leading_zeros())
        } else {
            n
        };
        n -= size;
        Some(size)
    })
}

/// Appends the rows of a `VALUES` list to `q`: `(…), (…), …`, each written by `bind`, for
/// `rows` and then copies of `pad` up to the next power of two. So a batch of any size uses one
/// of a few statement texts, each prepared once per connection; `pad` must match nothing.
fn push_padded_rows<'a, DB: sqlx::Database, T: Copy>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    rows: &[T],
    pad: T,
    mut bind: impl FnMut(&mut sqlx::QueryBuilder<'a, DB>, T),
) {
    for i in 0..rows.len().next_power_of_two() {
        q.push(if i == 0 { "(" } else { ", (" });
        bind(q, rows.get(i).copied().unwrap_or(pad));
        q.push(")");
    }
}

/// A transaction run by hand on a pooled connection, so that BEGIN and COMMIT can share a
/// command with other statements (on SQLite, each command is a trip to the connection's
/// worker thread). Dropped before [`ManualTransaction::committed`], on an error or a
/// cancelled future, it closes the connection instead of returning it to the pool: the
/// database rolls the transaction back when its connection ends.
struct ManualTransaction<DB: sqlx::Database> {
    conn: sqlx::pool::PoolConnection<DB>,
    done: bool,
}

impl<DB: sqlx::Database> ManualTransaction<DB> {
    fn new(conn: sqlx::pool::PoolConnection<DB>) -> Self {
        ManualTransaction { conn, done: false }
    }

    /// The COMMIT went through: the connection goes back to the pool.
    fn committed(mut self) {
        self.done = true;
    }
}

impl<DB: sqlx::Database> Drop for ManualTransaction<DB> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

impl<DB: sqlx::Database> std::ops::Deref for ManualTransaction<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.conn
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for ManualTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }
}

/// The group commit's transaction: sqlx's where each command is one statement (PostgreSQL),
/// so a failure rolls back and keeps the connection; run by hand where BEGIN and COMMIT share
/// commands with other statements (SQLite).
enum WriteTransaction<DB: sqlx::Database> {
    Sqlx(Transaction<'static, DB>),
    Manual(ManualTransaction<DB>),
}

impl<DB: sqlx::Database> std::ops::Deref for WriteTransaction<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        match self {
            WriteTransaction::Sqlx(t) => t,
            WriteTransaction::Manual(t) => t,
        }
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for WriteTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        match self {
            WriteTransaction::Sqlx(t) => t,
            WriteTransaction::Manual(t) => t,
        }
    }
}

/// The new row of a group-commit message: version 1, no attachments (sends with attachments
/// take the single-message path).
fn batch_row(b: BatchMessage, id: String, sequence: i64, create_time: i64) -> MessageRow {
    let BatchMessage {
        tenant_id,
        user_id,
        msg,
    } = b;
    MessageRow {
        id,
        tenant_id,
        channel_id: msg.channel_id,
        sender_id: user_id,
        body: msg.body,
        subject: msg.subject,
        parent_message_id: msg.parent_message_id,
        attachment_ids: "[]".to_owned(),
        client_message_id: msg.client_message_id,
        forwarded_from_message_id: msg.forwarded_from_message_id,
        sequence,
        version: 1,
        create_time,
        update_time: None,
        delete_time: None,
        deleted_by: None,
    }
}

/// Every batch position's outcome once `rows` (with their encoded events `payloads`) are
/// committed: `out` holds those decided before (refusals, stored keys), `repeats` the
/// (position, row index) pairs of keys repeated within the batch.
fn batch_outcomes(
    mut out: Vec<Option<StoreResult<Inserted>>>,
    rows: Vec<(usize, MessageRow)>,
    payloads: Vec<Vec<u8>>,
    repeats: Vec<(usize, usize)>,
) -> Vec<StoreResult<Inserted>> {
    for (i, r) in repeats {
        out[i] = Some(Ok(Inserted::Existing(rows[r].1.clone())));
    }
    for ((i, row), payload) in rows.into_iter().zip(payloads) {
        out[i] = Some(Ok(Inserted::New(row, payload)));
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Err(StoreError::Internal("batch item without outcome".into())))
        })
        .collect()
}

fn to_json<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// SQLite: one writer connection (SQLite allows one writer; queueing in the pool instead of
/// in `SQLITE_BUSY` retries keeps writes fair and fast) and a pool of readers (WAL lets them
/// run beside the writer).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// History pages: read through rusqlite, without sqlx's per-row hand-over. `None` for an
    /// in-memory database, which only sqlx's connections share; its pages go through `read`.
    history: Option<SqliteReaders>,
}

impl SqliteStore {
    /// The messages of a history query (`sql` selects [`MESSAGE_COLUMNS`]; `$1` channel,
    /// `$2` before, `$3` user, `$4` tenant, `$5` the thread's parent when given), at most
    /// `limit`, written straight from the rows in wire form: through the history readers, or
    /// sqlx for an in-memory database.
    async fn history_encoded(
        &self,
        sql: String,
        channel_id: &str,
        before: i64,
        (tenant, user): (&str, &str),
        parent: Option<&str>,
        limit: i64,
    ) -> StoreResult<EncodedMessages> {
        let Some(history) = &self.history else {
            return self
                .sqlx_history_encoded(&sql, channel_id, before, (tenant, user), parent, limit)
                .await;
        };
        let binds = HistoryBinds::new(channel_id, user, tenant, parent);
        let limit = usize::try_from(limit).unwrap_or(0);
        history
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut rows = stmt.query(binds.params(&before).as_slice())?;
                let mut page = EncodedMessages::default();
                while page.len() < limit {
                    let Some(row) = rows.next()? else { break };
                    page.push_row(row)?;
                }
                Ok(page)
            })
            .await
    }
}

/// PostgreSQL: a pool for writes and one for reads; row locks on `channels` order each
/// channel's writes.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    write: PgPool,
    read: PgPool,
    /// channel id → (tenant, last sequence) as this store's last batch there left it: lets the
    /// next batch of those channels commit in one round trip. A hint only.
    known_sequences: Arc<std::sync::Mutex<HashMap<String, (String, i64)>>>,
    /// Group-commit batches committed by `chat_append_messages` / by the general path.
    one_call: Arc<AtomicU64>,
    general: Arc<AtomicU64>,
}

impl PostgresStore {
    /// The messages of a history query; see [`SqliteStore::history_encoded`].
    async fn history_encoded(
        &self,
        sql: String,
        channel_id: &str,
        before: i64,
        viewer: (&str, &str),
        parent: Option<&str>,
        limit: i64,
    ) -> StoreResult<EncodedMessages> {
        self.sqlx_history_encoded(&sql, channel_id, before, viewer, parent, limit)
            .await
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// `sqlite:` URLs.
    Sqlite,
    /// `postgres:` / `postgresql:` URLs.
    Postgres,
}

impl Database {
    /// Picks the database from a URL's scheme; `None` for an unknown scheme.
    pub fn from_url(url: &str) -> Option<Database> {
        if url.starts_with("sqlite:") {
            Some(Database::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Database::Postgres)
        } else {
            None
        }
    }
}

/// Opens the database at `url` (creating a SQLite file and its folder when missing), with
/// PostgreSQL's `search_path` set to `schema` when given, and applies the embedded migrations
/// unless `migrate` is false.
///
/// Errors: an unknown scheme or a bad URL (`StoreError::Internal`), an unreachable server
/// (`StoreError::Unavailable`), a failed migration (`StoreError::Internal`).
pub async fn connect(
    url: &str,
    schema: Option<&str>,
    migrate: bool,
) -> StoreResult<Arc<dyn Store>> {
    match Database::from_url(url) {
        Some(Database::Sqlite) => {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                // Temporary structures in memory: the writer's profile under group commit
                // showed files created, unlinked and closed for every batch.
                .pragma("temp_store", "memory");
            if let Some(parent) = std::path::Path::new(opts.get_filename()).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        StoreError::Unavailable(format!("{}: {e}", parent.display()))
                    })?;
                }
            }
            // No ping before each use: a SQLite connection is a file handle, and the ping was a
            // round trip to its worker thread at the start of every transaction.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .test_before_acquire(false)
                .connect_with(opts.clone())
                .await?;
            if migrate {
                sqlx::migrate!("migrations/sqlite")
                    .run(&write)
                    .await
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
            }
            let path = opts.get_filename().to_path_buf();
            // sqlx names an in-memory database `file:sqlx-in-memory-…` (or keeps `:memory:`):
            // a name only its own shared-cache connections can open.
            let in_memory = path
                .to_str()
                .is_some_and(|p| p.starts_with("file:") || p == ":memory:");
            let read = SqlitePoolOptions::new()
                .max_connections(sqlite_point_readers())
                .test_before_acquire(false)
                // A list (up to MAX_PAGE_SIZE + 1 rows) is handed over without the worker
                // thread stopping to wait for the reader: at the default of 50 rows, a page of
                // 50 (51 rows asked for) blocked it once per page.
                .connect_with(opts.read_only(true).row_buffer_size(256))
                .await?;
            let history = (!in_memory).then(|| {
                SqliteReaders::new(
                    path,
                    SQLITE_HISTORY_READERS,
                    READER_MMAP_BYTES,
                    SQLITE_BUSY_TIMEOUT,
                )
            });
            let store = Arc::new(SqliteStore {
                write,
                read,
                history,
            });
            watch_pools(&store, |s| {
                [pool_sample("write", &s.write), pool_sample("read", &s.read)]
            });
            Ok(store)
        }
        Some(Database::Postgres) => {
            let mut opts = PgConnectOptions::from_str(url)?;
            if let Some(schema) = schema {
                opts = opts.options([("search_path", schema)]);
            }
            // Writes have a pool of their own, so history readers never hold up a commit.
            let write = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone())
                .await?;
            if migrate {
                sqlx::migrate!("migrations/postgres")
                    .run(&write)
                    .await
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
            }
            let read = PgPoolOptions::new()
                .max_connections(32)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            let store = Arc::new(PostgresStore {
                write,
                read,
                known_sequences: Default::default(),
                one_call: Default::default(),
                general: Default::default(),
            });
            watch_pools(&store, |s| {
                [pool_sample("write", &s.write), pool_sample("read", &s.read)]
            });
            Ok(store)
        }
        None => Err(StoreError::Internal(format!(
            "unsupported database URL scheme in {:?} (use sqlite: or postgres:)",
            url.split(':').next().unwrap_or_default()
        ))),
    }
}

/// Has each metrics scrape sample `store`'s pools, for as long as the store lives.
fn watch_pools<S: Send + Sync + 'static>(
    store: &Arc<S>,
    pools: fn(&S) -> [crate::metrics::PoolSample; 2],
) {
    let weak = Arc::downgrade(store);
    crate::metrics::watch_pools(move || weak.upgrade().map(|s| pools(&s).to_vec()));
}

/// A pool's state for `chat_db_pool_*` (sampled at each scrape). SQLite history pages read
/// through their own readers (`SqliteReaders`), outside these pools.
fn pool_sample<DB: sqlx::Database>(
    name: &'static str,
    pool: &sqlx::Pool<DB>,
) -> crate::metrics::PoolSample {
    crate::metrics::PoolSample {
        pool: name,
        size: pool.size(),
        idle: pool.num_idle(),
        max: pool.options().get_max_connections(),
    }
}

/// Bytes of the database file each SQLite history reader maps (`PRAGMA mmap_size`): pages are
/// read from the page cache in place instead of copied by a `pread` each. The mapped pages
/// are the kernel's page cache, shared and reclaimable, but they count in the process's RSS
/// once touched.
const READER_MMAP_BYTES: u64 = 1 << 30;

/// Connections (each a thread of sqlx's) for SQLite's other reads: lookups of a member, a
/// channel, a message, the events a feed replays. One per two cores, from 2 to 8.
///
/// Each is a thread that allocates the rows it reads, and memory it allocated and the runtime's
/// threads freed stays with it while it is idle (mimalloc returns a page to its owning thread
/// only when that thread allocates again). So every idle reader thread holds memory from the
/// last burst of reads: in chat-bench scenario 4 (10,000 Subscribe streams opened, each
/// reading its membership and channel) 8 readers on 2 cores left 16.2-16.4 KiB per stream,
/// 4 left 13.7-15.1 and 2 left 11.7-14.2, with fan-out and sends within noise (sends do not
/// read here; history has its own readers).
fn sqlite_point_readers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2).clamp(2, 8) as u32
}

/// Concurrent history queries on SQLite (rusqlite connections; see [`SqliteReaders::run`] for
/// which thread runs each).
const SQLITE_HISTORY_READERS: usize = 4;

/// How long a SQLite statement waits for a lock before failing as unavailable.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The LIMITs a history query is written with (page sizes 10, 25, 50, 100 and 200, plus the
/// row that tells whether a next page exists): a request's limit is rounded up to the next.
const HISTORY_LIMIT_STEPS: [i64; 5] = [11, 26, 51, 101, 201];

/// The condition a history query adds so that it returns rows only to a member of the live
/// channel: `$1` is the channel, `$3` the viewer's user id, `$4` the viewer's tenant. A constant
/// sub-query, evaluated once per statement, so a page costs one query. A macro, so it joins
/// the statement text at compile time (`concat!`).
macro_rules! viewer_is_member {
    () => {
        "EXISTS (SELECT 1 FROM members mb JOIN channels c ON c.id = mb.channel_id \
         WHERE mb.channel_id = $1 AND mb.user_id = $3 AND mb.tenant_id = $4 \
         AND c.delete_time IS NULL)"
    };
}

/// The text of a history query (see [`MessageStore::list_messages`]) that selects
/// [`MESSAGE_COLUMNS`] for `limit` rows or a few more: `$1` channel, `$2` before, `$3` user,
/// `$4` tenant, and `$5` the thread's parent when `thread`.
///
/// The page size is written into the text, not bound: with `LIMIT $n` PostgreSQL cannot cost
/// a generic plan (it assumes a tenth of the table), so it planned every page again, half of
/// its CPU per page. With the size known, the generic plan costs what a custom one does, and
/// PostgreSQL keeps it after five executions (plan_cache_mode = auto). The size is rounded up
/// to one of [`HISTORY_LIMIT_STEPS`], so a handful of texts stay prepared whatever sizes
/// clients ask for; the callers drop the extra rows.
fn history_sql(thread: bool, limit: i64) -> String {
    let fetched = HISTORY_LIMIT_STEPS
        .into_iter()
        .find(|&step| step >= limit)
        .unwrap_or(limit);
    let thread = if thread {
        "AND parent_message_id = $5 "
    } else {
        ""
    };
    format!(
        concat!(
            "SELECT {} FROM messages WHERE channel_id = $1 {}AND sequence < $2 \
             AND delete_time IS NULL AND ",
            viewer_is_member!(),
            " ORDER BY sequence DESC LIMIT {}"
        ),
        MESSAGE_COLUMNS, thread, fetched
    )
}

/// A row of a history query through sqlx, for [`EncodedMessages::push_row`].
macro_rules! impl_message_columns {
    ($row:ty) => {
        impl MessageColumns for $row {
            type Error = sqlx::Error;

            fn text(&self, i: usize) -> Result<&str, sqlx::Error> {
                Ok(sqlx::Row::try_get::<Option<&str>, _>(self, i)?.unwrap_or_default())
            }

            fn integer(&self, i: usize) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, i)
            }
        }
    };
}
impl_message_columns!(sqlx::postgres::PgRow);
impl_message_columns!(sqlx::sqlite::SqliteRow);

macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// The rows of a history query through sqlx, on the read pool: `$1` channel,
            /// `$2` before, `$3` user, `$4` tenant, `$5` the thread's parent when given.
            async fn sqlx_history(
                &self,
                sql: &str,
                channel_id: &str,
                before: i64,
                (tenant, user): (&str, &str),
                parent: Option<&str>,
            ) -> StoreResult<Vec<<$db as sqlx::Database>::Row>> {
                let mut query = sqlx::query(sql)
                    .bind(channel_id)
                    .bind(before)
                    .bind(user)
                    .bind(tenant);
                if let Some(parent) = parent {
                    query = query.bind(parent);
                }
                Ok(query.fetch_all(&self.read).await?)
            }

            /// [`Self::sqlx_history`] as [`MessageRow`]s.
            async fn sqlx_history_rows(
                &self,
                sql: &str,
                channel_id: &str,
                before: i64,
                viewer: (&str, &str),
                parent: Option<&str>,
            ) -> StoreResult<Vec<MessageRow>> {
                let rows = self.sqlx_history(sql, channel_id, before, viewer, parent).await?;
                rows.iter()
                    .map(|r| MessageRow::from_row(r).map_err(StoreError::from))
                    .collect()
            }

            /// [`Self::sqlx_history`], at most `limit` messages, in wire form.
            async fn sqlx_history_encoded(
                &self,
                sql: &str,
                channel_id: &str,
                before: i64,
                viewer: (&str, &str),
                parent: Option<&str>,
                limit: i64,
            ) -> StoreResult<EncodedMessages> {
                let rows = self.sqlx_history(sql, channel_id, before, viewer, parent).await?;
                let mut page = EncodedMessages::default();
                for row in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
                    page.push_row(row)?;
                }
                Ok(page)
            }

            async fn audit(
                tx: &mut Transaction<'_, $db>,
                actor: Actor<'_>,
                operation: &str,
                table: &str,
                entity_id: &str,
                before: Option<String>,
                after: Option<String>,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, \
                     actor_id, before_json, after_json, create_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(Uuid::now_v7().to_string())
                .bind(actor.tenant_id)
                .bind(operation)
                .bind(table)
                .bind(entity_id)
                .bind(actor.user_id)
                .bind(before)
                .bind(after)
                .bind(now_micros())
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            /// Takes the next `n` sequences of a live channel; returns the last one taken.
            async fn bump(
                tx: &mut Transaction<'_, $db>,
                channel_id: &str,
                n: i64,
            ) -> StoreResult<i64> {
                sqlx::query_scalar(
                    "UPDATE channels SET last_sequence = last_sequence + $2 \
                     WHERE id = $1 AND delete_time IS NULL RETURNING last_sequence",
                )
                .bind(channel_id)
                .bind(n)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or(StoreError::NotFound)
            }

            /// Takes the channel row's lock without changing it (PostgreSQL row lock; SQLite has
            /// one writer), so checks made after it see every earlier change of the channel.
            async fn lock_channel(tx: &mut Transaction<'_, $db>, channel_id: &str) -> StoreResult<()> {
                let n = sqlx::query(
                    "UPDATE channels SET last_sequence = last_sequence \
                     WHERE id = $1 AND delete_time IS NULL",
                )
                .bind(channel_id)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if n == 1 { Ok(()) } else { Err(StoreError::NotFound) }
            }

            /// Owners of the channel, read inside the transaction (after `lock_channel`/`bump`).
            async fn owners_in(tx: &mut Transaction<'_, $db>, channel_id: &str) -> StoreResult<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE channel_id = $1 AND role = 'owner'")
                    .bind(channel_id)
                    .fetch_one(&mut **tx)
                    .await?)
            }

            async fn event(
                tx: &mut Transaction<'_, $db>,
                channel_id: &str,
                sequence: i64,
                payload: &[u8],
            ) -> StoreResult<()> {
                sqlx::query("INSERT INTO events (channel_id, sequence, payload) VALUES ($1, $2, $3)")
                    .bind(channel_id)
                    .bind(sequence)
                    .bind(payload)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// Inserts members with consecutive sequences ending at `last`, one event each.
            async fn insert_members(
                tx: &mut Transaction<'_, $db>,
                actor: Actor<'_>,
                channel_id: &str,
                users: &[(String, Role)],
                last: i64,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<Vec<Changed<MemberRow>>> {
                let now = now_micros();
                let first = last - users.len() as i64 + 1;
                let mut out = Vec::with_capacity(users.len());
                for (i, (user, role)) in users.iter().enumerate() {
                    let sequence = first + i as i64;
                    let row = MemberRow {
                        channel_id: channel_id.to_owned(),
                        user_id: user.clone(),
                        role: role.as_str().to_owned(),
                        join_time: now,
                        join_sequence: sequence,
                        // History from before the join does not count as unread.
                        read_sequence: sequence,
                    };
                    sqlx::query(
                        "INSERT INTO members (channel_id, tenant_id, user_id, role, join_time, \
                         join_sequence, read_sequence) VALUES ($1, $2, $3, $4, $5, $6, $6)",
                    )
                    .bind(channel_id)
                    .bind(actor.tenant_id)
                    .bind(user)
                    .bind(role.as_str())
                    .bind(now)
                    .bind(sequence)
                    .execute(&mut **tx)
                    .await?;
                    let payload = enc(&row, sequence);
                    Self::event(tx, channel_id, sequence, &payload).await?;
                    Self::audit(tx, actor, "create", "members", &format!("{channel_id}/{user}"), None, to_json(&row)).await?;
                    out.push(Changed { row, sequence, payload });
                }
                Ok(out)
            }

            /// Deletes members with consecutive sequences ending at `last`, one event each.
            async fn delete_members(
                tx: &mut Transaction<'_, $db>,
                actor: Actor<'_>,
                rows: Vec<MemberRow>,
                last: i64,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<Vec<Changed<MemberRow>>> {
                let first = last - rows.len() as i64 + 1;
                let mut out = Vec::with_capacity(rows.len());
                for (i, row) in rows.into_iter().enumerate() {
                    let sequence = first + i as i64;
                    sqlx::query("DELETE FROM members WHERE channel_id = $1 AND user_id = $2")
                        .bind(&row.channel_id)
                        .bind(&row.user_id)
                        .execute(&mut **tx)
                        .await?;
                    let payload = enc(&row, sequence);
                    Self::event(tx, &row.channel_id, sequence, &payload).await?;
                    let entity = format!("{}/{}", row.channel_id, row.user_id);
                    Self::audit(tx, actor, "delete", "members", &entity, to_json(&row), None).await?;
                    out.push(Changed { row, sequence, payload });
                }
                Ok(out)
            }

            /// Inserts a visible attachment, if the uploader still belongs to the live channel.
            async fn insert_attachment_in(
                tx: &mut Transaction<'_, $db>,
                actor: Actor<'_>,
                row: &AttachmentRow,
            ) -> StoreResult<()> {
                Self::lock_channel(tx, &row.channel_id).await?;
                let member: Option<String> =
                    sqlx::query_scalar("SELECT user_id FROM members WHERE channel_id = $1 AND user_id = $2")
                        .bind(&row.channel_id)
                        .bind(&row.uploader_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                if member.is_none() {
                    return Err(StoreError::NotFound);
                }
                sqlx::query(
                    "INSERT INTO attachments (id, tenant_id, channel_id, message_id, uploader_id, \
                     file_name, content_type, size_bytes, sha256, storage_key, create_time) \
                     VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&row.id)
                .bind(&row.tenant_id)
                .bind(&row.channel_id)
                .bind(&row.uploader_id)
                .bind(&row.file_name)
                .bind(&row.content_type)
                .bind(row.size_bytes)
                .bind(&row.sha256)
                .bind(&row.storage_key)
                .bind(row.create_time)
                .execute(&mut **tx)
                .await?;
                Self::audit(tx, actor, "create", "attachments", &row.id, None, to_json(row)).await?;
                Ok(())
            }

            async fn find_direct(&self, tenant: &str, key: &str) -> StoreResult<Option<ChannelRow>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM channels WHERE direct_key = $1 AND tenant_id = $2 AND delete_time IS NULL",
                )
                    .bind(key)
                    .bind(tenant)
                    .fetch_optional(&self.write)
                    .await?)
            }

            async fn find_idempotent(
                &self,
                channel_id: &str,
                sender: &str,
                client_message_id: &str,
            ) -> StoreResult<Option<MessageRow>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM messages WHERE channel_id = $1 AND sender_id = $2 \
                     AND client_message_id = $3",
                )
                .bind(channel_id)
                .bind(sender)
                .bind(client_message_id)
                .fetch_optional(&self.write)
                .await?)
            }

            /// Locks the message's channel (by taking its next sequence) and reads the message
            /// after the lock, so checks on it see every earlier change.
            async fn lock_message(
                &self,
                tx: &mut Transaction<'_, $db>,
                tenant: &str,
                message_id: &str,
            ) -> StoreResult<(MessageRow, i64)> {
                let channel_id: String = sqlx::query_scalar(
                    "SELECT channel_id FROM messages WHERE id = $1 AND tenant_id = $2",
                )
                .bind(message_id)
                .bind(tenant)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                let sequence = Self::bump(tx, &channel_id, 1).await?;
                let before: MessageRow = sqlx::query_as("SELECT * FROM messages WHERE id = $1")
                    .bind(message_id)
                    .fetch_one(&mut **tx)
                    .await?;
                if before.delete_time.is_some() {
                    return Err(StoreError::NotFound);
                }
                Ok((before, sequence))
            }
        }

        #[async_trait]
        impl ChannelStore for $store {
            async fn create_group(
                &self,
                actor: Actor<'_>,
                channel: ChannelRow,
                members: &[String],
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)> {
                let mut users = vec![(actor.user_id.to_owned(), Role::Owner)];
                for m in members {
                    if !users.iter().any(|(u, _)| u == m) {
                        users.push((m.clone(), Role::Member));
                    }
                }
                let mut tx = self.write.begin().await?;
                sqlx::query(
                    "INSERT INTO channels (id, tenant_id, kind, name, description, channel_type, \
                     direct_key, last_sequence, create_time, update_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9)",
                )
                .bind(&channel.id)
                .bind(&channel.tenant_id)
                .bind(&channel.kind)
                .bind(&channel.name)
                .bind(&channel.description)
                .bind(&channel.channel_type)
                .bind(&channel.direct_key)
                .bind(channel.create_time)
                .bind(channel.update_time)
                .execute(&mut *tx)
                .await?;
                let last = Self::bump(&mut tx, &channel.id, users.len() as i64).await?;
                let added = Self::insert_members(&mut tx, actor, &channel.id, &users, last, enc).await?;
                let mut channel = channel;
                channel.last_sequence = last;
                Self::audit(&mut tx, actor, "create", "channels", &channel.id, None, to_json(&channel)).await?;
                tx.commit().await?;
                Ok((channel, added))
            }

            async fn direct_channel(
                &self,
                actor: Actor<'_>,
                peer: &str,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)> {
                let (a, b) = if actor.user_id <= peer { (actor.user_id, peer) } else { (peer, actor.user_id) };
                let key = direct_key(actor.tenant_id, a, b);
                if let Some(found) = self.find_direct(actor.tenant_id, &key).await? {
                    return Ok((found, Vec::new()));
                }
                let now = now_micros();
                let mut channel = ChannelRow {
                    id: Uuid::now_v7().to_string(),
                    tenant_id: actor.tenant_id.to_owned(),
                    kind: KIND_DIRECT.to_owned(),
                    name: String::new(),
                    description: String::new(),
                    channel_type: String::new(),
                    direct_key: Some(key.clone()),
                    last_sequence: 0,
                    create_time: now,
                    update_time: now,
                };
                let mut tx = self.write.begin().await?;
                let made = sqlx::query(
                    "INSERT INTO channels (id, tenant_id, kind, name, description, channel_type, \
                     direct_key, last_sequence, create_time, update_time) \
                     VALUES ($1, $2, $3, '', '', '', $4, 0, $5, $5) ON CONFLICT (direct_key) DO NOTHING",
                )
                .bind(&channel.id)
                .bind(&channel.tenant_id)
                .bind(KIND_DIRECT)
                .bind(&key)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if made == 0 {
                    tx.rollback().await?;
                    let found = self.find_direct(actor.tenant_id, &key).await?.ok_or(StoreError::NotFound)?;
                    return Ok((found, Vec::new()));
                }
                let users = [(a.to_owned(), Role::Member), (b.to_owned(), Role::Member)];
                let last = Self::bump(&mut tx, &channel.id, 2).await?;
                let added = Self::insert_members(&mut tx, actor, &channel.id, &users, last, enc).await?;
                channel.last_sequence = last;
                Self::audit(&mut tx, actor, "create", "channels", &channel.id, None, to_json(&channel)).await?;
                tx.commit().await?;
                Ok((channel, added))
            }

            async fn find_direct_channel(
                &self,
                actor: Actor<'_>,
                peer: &str,
            ) -> StoreResult<Option<ChannelRow>> {
                self.find_direct(actor.tenant_id, &direct_key(actor.tenant_id, actor.user_id, peer)).await
            }

            async fn channel(&self, tenant: &str, channel_id: &str) -> StoreResult<ChannelRow> {
                sqlx::query_as(
                    "SELECT * FROM channels WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL",
                )
                .bind(channel_id)
                .bind(tenant)
                .fetch_optional(&self.read)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn update_group(
                &self,
                actor: Actor<'_>,
                channel_id: &str,
                patch: GroupPatch,
            ) -> StoreResult<ChannelRow> {
                let mut tx = self.write.begin().await?;
                let before: ChannelRow = sqlx::query_as(
                    "SELECT * FROM channels WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL",
                )
                .bind(channel_id)
                .bind(actor.tenant_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                let after: ChannelRow = sqlx::query_as(
                    "UPDATE channels SET name = COALESCE($2, name), \
                     description = COALESCE($3, description), \
                     channel_type = COALESCE($4, channel_type), update_time = $5 \
                     WHERE id = $1 RETURNING *",
                )
                .bind(channel_id)
                .bind(patch.name)
                .bind(patch.description)
                .bind(patch.channel_type)
                .bind(now_micros())
                .fetch_one(&mut *tx)
                .await?;
                Self::audit(&mut tx, actor, "update", "channels", channel_id, to_json(&before), to_json(&after)).await?;
                tx.commit().await?;
                Ok(after)
            }

            async fn delete_group(
                &self,
                actor: Actor<'_>,
                channel_id: &str,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<Vec<Changed<MemberRow>>> {
                let mut tx = self.write.begin().await?;
                let before: ChannelRow = sqlx::query_as(
                    "SELECT * FROM channels WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL",
                )
                .bind(channel_id)
                .bind(actor.tenant_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                // Lock first: a member added concurrently must be seen (and removed) here.
                Self::lock_channel(&mut tx, channel_id).await?;
                let rows: Vec<MemberRow> = sqlx::query_as(
                    "SELECT * FROM members WHERE channel_id = $1 ORDER BY join_time, user_id",
                )
                .bind(channel_id)
                .fetch_all(&mut *tx)
                .await?;
                let last = Self::bump(&mut tx, channel_id, rows.len() as i64).await?;
                let removed = Self::delete_members(&mut tx, actor, rows, last, enc).await?;
                sqlx::query("UPDATE channels SET delete_time = $2 WHERE id = $1")
                    .bind(channel_id)
                    .bind(now_micros())
                    .execute(&mut *tx)
                    .await?;
                Self::audit(&mut tx, actor, "delete", "channels", channel_id, to_json(&before), None).await?;
                tx.commit().await?;
                Ok(removed)
            }

            async fn list_channels(
                &self,
                tenant: &str,
                user: &str,
                before: Option<&str>,
                limit: i64,
            ) -> StoreResult<Vec<ChannelRow>> {
                Ok(sqlx::query_as(
                    "SELECT c.* FROM channels c JOIN members m ON m.channel_id = c.id \
                     WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.delete_time IS NULL \
                     AND (CAST($3 AS TEXT) IS NULL OR c.id < $3) ORDER BY c.id DESC LIMIT $4",
                )
                .bind(tenant)
                .bind(user)
                .bind(before)
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }

            async fn member(
                &self,
                tenant: &str,
                channel_id: &str,
                user: &str,
            ) -> StoreResult<Option<MemberRow>> {
                Ok(sqlx::query_as(
                    "SELECT m.* FROM members m JOIN channels c ON c.id = m.channel_id \
                     WHERE m.channel_id = $1 AND m.user_id = $2 AND m.tenant_id = $3 \
                     AND c.delete_time IS NULL",
                )
                .bind(channel_id)
                .bind(user)
                .bind(tenant)
                .fetch_optional(&self.read)
                .await?)
            }

            async fn channel_heads(
                &self,
                tenant: &str,
                user: &str,
                channel_ids: &[String],
            ) -> StoreResult<Vec<(String, i64)>> {
                // The ids travel as one JSON array, so the statement text is the same for any
                // number of them.
                let ids = serde_json::to_string(channel_ids)
                    .map_err(|e| StoreError::Internal(e.to_string()))?;
                Ok(sqlx::query_as(&format!(
                    "SELECT c.id, c.last_sequence FROM channels c \
                     JOIN members m ON m.channel_id = c.id \
                     WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.delete_time IS NULL \
                     AND c.id IN ({})",
                    Self::IDS_OF_JSON_ARRAY
                ))
                .bind(tenant)
                .bind(user)
                .bind(ids)
                .fetch_all(&self.read)
                .await?)
            }

            async fn memberships(
                &self,
                tenant: &str,
                user: &str,
            ) -> StoreResult<Vec<(ChannelRow, MemberRow)>> {
                let members: Vec<MemberRow> = sqlx::query_as(
                    "SELECT * FROM members WHERE tenant_id = $1 AND user_id = $2",
                )
                .bind(tenant)
                .bind(user)
                .fetch_all(&self.read)
                .await?;
                let channels: Vec<ChannelRow> = sqlx::query_as(
                    "SELECT c.* FROM channels c JOIN members m ON m.channel_id = c.id \
                     WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.delete_time IS NULL",
                )
                .bind(tenant)
                .bind(user)
                .fetch_all(&self.read)
                .await?;
                let mut by_id: std::collections::HashMap<String, MemberRow> =
                    members.into_iter().map(|m| (m.channel_id.clone(), m)).collect();
                Ok(channels
                    .into_iter()
                    .filter_map(|c| by_id.remove(&c.id).map(|m| (c, m)))
                    .collect())
            }

            async fn list_members(
                &self,
                channel_id: &str,
                after: Option<(i64, &str)>,
                limit: i64,
            ) -> StoreResult<Vec<MemberRow>> {
                let (t, u) = after.unwrap_or((i64::MIN, ""));
                Ok(sqlx::query_as(
                    "SELECT * FROM members WHERE channel_id = $1 \
                     AND (join_time > $2 OR (join_time = $2 AND user_id > $3)) \
                     ORDER BY join_time, user_id LIMIT $4",
                )
                .bind(channel_id)
                .bind(t)
                .bind(u)
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }

            async fn add_members(
                &self,
                actor: Actor<'_>,
                channel_id: &str,
                users: &[String],
                role: Role,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<Vec<Changed<MemberRow>>> {
                let mut tx = self.write.begin().await?;
                // Lock first, so concurrent calls see each other's members and skip them.
                Self::lock_channel(&mut tx, channel_id).await?;
                let existing: Vec<String> =
                    sqlx::query_scalar("SELECT user_id FROM members WHERE channel_id = $1")
                        .bind(channel_id)
                        .fetch_all(&mut *tx)
                        .await?;
                let mut new: Vec<(String, Role)> = Vec::new();
                for u in users {
                    if !existing.contains(u) && !new.iter().any(|(n, _)| n == u) {
                        new.push((u.clone(), role));
                    }
                }
                if new.is_empty() {
                    tx.rollback().await?;
                    return Ok(Vec::new());
                }
                let last = Self::bump(&mut tx, channel_id, new.len() as i64).await?;
                let added = Self::insert_members(&mut tx, actor, channel_id, &new, last, enc).await?;
                tx.commit().await?;
                Ok(added)
            }

            async fn remove_member(
                &self,
                actor: Actor<'_>,
                channel_id: &str,
                user: &str,
                enc: Encoder<'_, MemberRow>,
            ) -> StoreResult<Changed<MemberRow>> {
                let mut tx = self.write.begin().await?;
                let last = Self::bump(&mut tx, channel_id, 1).await?;
                let row: MemberRow = sqlx::query_as(
                    "SELECT * FROM members WHERE channel_id = $1 AND user_id = $2",
                )
                .bind(channel_id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                if row.role() == Role::Owner && Self::owners_in(&mut tx, channel_id).await? <= 1 {
                    return Err(StoreError::LastOwner);
                }
                let mut removed = Self::delete_members(&mut tx, actor, vec![row], last, enc).await?;
                tx.commit().await?;
                removed.pop().ok_or(StoreError::NotFound)
            }

            async fn set_role(
                &self,
                actor: Actor<'_>,
                channel_id: &str,
                user: &str,
                role: Role,
            ) -> StoreResult<MemberRow> {
                let mut tx = self.write.begin().await?;
                Self::lock_channel(&mut tx, channel_id).await?;
                let before: MemberRow = sqlx::query_as(
                    "SELECT * FROM members WHERE channel_id = $1 AND user_id = $2",
                )
                .bind(channel_id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                if before.role() == Role::Owner && role != Role::Owner && Self::owners_in(&mut tx, channel_id).await? <= 1 {
                    return Err(StoreError::LastOwner);
                }
                let after: MemberRow = sqlx::query_as(
                    "UPDATE members SET role = $3 WHERE channel_id = $1 AND user_id = $2 RETURNING *",
                )
                .bind(channel_id)
                .bind(user)
                .bind(role.as_str())
                .fetch_one(&mut *tx)
                .await?;
                let entity = format!("{channel_id}/{user}");
                Self::audit(&mut tx, actor, "update", "members", &entity, to_json(&before), to_json(&after)).await?;
                tx.commit().await?;
                Ok(after)
            }

            async fn owner_count(&self, channel_id: &str) -> StoreResult<i64> {
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) FROM members WHERE channel_id = $1 AND role = 'owner'",
                )
                .bind(channel_id)
                .fetch_one(&self.read)
                .await?)
            }
        }

        #[async_trait]
        impl MessageStore for $store {
            async fn insert_message(
                &self,
                actor: Actor<'_>,
                msg: NewMessage,
                enc: Encoder<'_, MessageRow>,
            ) -> StoreResult<Inserted> {
                if let Some(key) = &msg.client_message_id {
                    if let Some(first) = self.find_idempotent(&msg.channel_id, actor.user_id, key).await? {
                        return Ok(Inserted::Existing(first));
                    }
                }
                let mut tx = self.write.begin().await?;
                let sequence: i64 = sqlx::query_scalar(
                    "UPDATE channels SET last_sequence = last_sequence + 1 \
                     WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL \
                     RETURNING last_sequence",
                )
                .bind(&msg.channel_id)
                .bind(actor.tenant_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                // Checked after the lock, in a statement of its own: on READ COMMITTED it then
                // sees a removal that committed while this send waited for the lock.
                let member: Option<String> =
                    sqlx::query_scalar("SELECT user_id FROM members WHERE channel_id = $1 AND user_id = $2")
                        .bind(&msg.channel_id)
                        .bind(actor.user_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if member.is_none() {
                    return Err(StoreError::NotFound);
                }
                let row = MessageRow {
                    id: Uuid::now_v7().to_string(),
                    tenant_id: actor.tenant_id.to_owned(),
                    channel_id: msg.channel_id,
                    sender_id: actor.user_id.to_owned(),
                    body: msg.body,
                    subject: msg.subject,
                    parent_message_id: msg.parent_message_id,
                    attachment_ids: serde_json::to_string(&msg.attachment_ids)
                        .unwrap_or_else(|_| "[]".to_owned()),
                    client_message_id: msg.client_message_id,
                    forwarded_from_message_id: msg.forwarded_from_message_id,
                    sequence,
                    version: 1,
                    create_time: now_micros(),
                    update_time: None,
                    delete_time: None,
                    deleted_by: None,
                };
                let inserted = sqlx::query(
                    "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
                     parent_message_id, attachment_ids, client_message_id, \
                     forwarded_from_message_id, sequence, version, create_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12)",
                )
                .bind(&row.id)
                .bind(&row.tenant_id)
                .bind(&row.channel_id)
                .bind(&row.sender_id)
                .bind(&row.body)
                .bind(&row.subject)
                .bind(&row.parent_message_id)
                .bind(&row.attachment_ids)
                .bind(&row.client_message_id)
                .bind(&row.forwarded_from_message_id)
                .bind(row.sequence)
                .bind(row.create_time)
                .execute(&mut *tx)
                .await;
                match inserted.map_err(StoreError::from) {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => {
                        // A concurrent send with the same client_message_id won the race.
                        tx.rollback().await?;
                        let key = row.client_message_id.as_deref().unwrap_or_default();
                        let first = self
                            .find_idempotent(&row.channel_id, &row.sender_id, key)
                            .await?
                            .ok_or(StoreError::Conflict)?;
                        return Ok(Inserted::Existing(first));
                    }
                    Err(e) => return Err(e),
                }
                for (i, attachment_id) in msg.attachment_ids.iter().enumerate() {
                    let linked = sqlx::query(
                        "UPDATE attachments SET message_id = $1 WHERE id = $2 AND channel_id = $3 \
                         AND uploader_id = $4 AND tenant_id = $5 AND message_id IS NULL",
                    )
                    .bind(&row.id)
                    .bind(attachment_id)
                    .bind(&row.channel_id)
                    .bind(&row.sender_id)
                    .bind(&row.tenant_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if linked != 1 {
                        return Err(StoreError::Unlinkable(i));
                    }
                    let after = serde_json::json!({ "message_id": row.id }).to_string();
                    Self::audit(&mut tx, actor, "update", "attachments", attachment_id, None, Some(after)).await?;
                }
                let payload = enc(&row, sequence);
                Self::event(&mut tx, &row.channel_id, sequence, &payload).await?;
                Self::audit(&mut tx, actor, "create", "messages", &row.id, None, to_json(&row)).await?;
                tx.commit().await?;
                Ok(Inserted::New(row, payload))
            }

            async fn insert_messages(
                &self,
                batch: Vec<BatchMessage>,
                enc: Encoder<'_, MessageRow>,
            ) -> StoreResult<Vec<StoreResult<Inserted>>> {
                if let Some(out) = self.insert_messages_optimistic(&batch, enc).await? {
                    return Ok(out);
                }
                let mut out: Vec<Option<StoreResult<Inserted>>> = vec![None; batch.len()];
                // (channel, tenant) → batch positions, channels in id order: every batch takes
                // its locks in the same order.
                let mut by_channel: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
                for (i, b) in batch.iter().enumerate() {
                    by_channel
                        .entry((b.msg.channel_id.clone(), b.tenant_id.clone()))
                        .or_default()
                        .push(i);
                }
                let mut batch: Vec<Option<BatchMessage>> = batch.into_iter().map(Some).collect();
                let mut rows: Vec<(usize, MessageRow)> = Vec::new();
                // Repeats of a client_message_id within the batch: (position, row index).
                let mut repeats: Vec<(usize, usize)> = Vec::new();
                // Where a command takes several statements (SQLite), BEGIN goes with the
                // advancing UPDATE and the membership SELECT, and COMMIT with the INSERTs: two
                // trips to the connection's thread for a batch, where a sqlx transaction with
                // a statement per trip took five.
                let waited = std::time::Instant::now();
                let (mut tx, begin) = if Self::STATEMENTS_IN_ONE_COMMAND {
                    let conn = self.write.acquire().await?;
                    (WriteTransaction::Manual(ManualTransaction::new(conn)), "BEGIN IMMEDIATE; ")
                } else {
                    (WriteTransaction::Sqlx(self.write.begin().await?), "")
                };
                // PostgreSQL's includes the BEGIN's round trip (sqlx sends it on acquiring).
                crate::metrics::write_acquired(waited.elapsed());
                // Four statements whatever the batch holds: lock, advance, members, keys. Each
                // list is padded to a power of two with rows that match nothing (ids are never
                // empty), so a few statement texts cover every batch and stay prepared.
                if Self::LOCK_CHANNELS_IN_ORDER {
                    // Concurrent batches take their channels' row locks in id order, so they
                    // never wait on each other in a cycle (workers own disjoint channels, but
                    // another server process sharing the database does not know which).
                    let mut ids: Vec<&str> = by_channel.keys().map(|(c, _)| c.as_str()).collect();
                    ids.dedup();
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT id FROM channels WHERE id IN (");
                    let mut list = q.separated(", ");
                    for i in 0..ids.len().next_power_of_two() {
                        list.push_bind(ids.get(i).copied().unwrap_or(""));
                    }
                    // NO KEY: like the UPDATE that follows, so inserts that only reference a
                    // channel (foreign-key checks take KEY SHARE) are not held up.
                    // Bytewise order, as the batch lists them (and as chat_append_messages
                    // takes them), whatever the database's collation.
                    q.push(") ORDER BY id COLLATE \"C\" FOR NO KEY UPDATE");
                    q.build().fetch_all(&mut *tx).await?;
                }
                // Every channel of the batch moves on by its count of messages; RETURNING gives
                // the new last sequence, so the batch's messages take `last - n + 1 ..= last`.
                let keys: Vec<(&str, &str, i64)> = by_channel
                    .iter()
                    .map(|((c, t), p)| (c.as_str(), t.as_str(), p.len() as i64))
                    .collect();
                // A block: the builders borrow the batch, which is taken apart below.
                let tagged: Vec<(String, String, String, i64)> = {
                let mut q = sqlx::QueryBuilder::<$db>::new(begin);
                q.push(
                    "UPDATE channels SET last_sequence = channels.last_sequence + d.column3 FROM (VALUES ",
                );
                push_padded_rows(&mut q, &keys, ("", "", 0), |q, (c, t, n)| {
                    q.push_bind(c).push(", ").push_bind(t).push(", ").push_bind(n);
                });
                // Rows of the shape (kind, a, b, n), so that the membership rows can follow
                // in the same command: 'L' (channel, tenant, new last sequence) and 'M'
                // (channel, member, 0).
                q.push(
                    ") AS d WHERE channels.id = d.column1 AND channels.tenant_id = d.column2 \
                     AND channels.delete_time IS NULL \
                     RETURNING CAST('L' AS TEXT), channels.id, channels.tenant_id, channels.last_sequence",
                );
                // Membership is read in a statement of its own, after the locks: on READ
                // COMMITTED a check inside the UPDATE (a sub-select) would keep the snapshot
                // from before the lock wait and miss a removal that committed meanwhile.
                // (SQLite has one writer and no such wait: the two go as one command.)
                let mut pairs: Vec<(&str, &str)> = Vec::new();
                for (key, positions) in &by_channel {
                    for &i in positions {
                        if let Some(b) = &batch[i] {
                            pairs.push((key.0.as_str(), b.user_id.as_str()));
                        }
                    }
                }
                pairs.sort_unstable();
                pairs.dedup();
                fn members_query<'a>(
                    q: &mut sqlx::QueryBuilder<'a, $db>,
                    pairs: &[(&'a str, &'a str)],
                ) {
                    q.push(
                        "SELECT CAST('M' AS TEXT), m.channel_id, m.user_id, CAST(0 AS BIGINT) \
                         FROM (VALUES ",
                    );
                    push_padded_rows(q, pairs, ("", ""), |q, (c, u)| {
                        q.push_bind(c).push(", ").push_bind(u);
                    });
                    q.push(") AS d JOIN members m ON m.channel_id = d.column1 AND m.user_id = d.column2");
                }
                if Self::STATEMENTS_IN_ONE_COMMAND {
                    q.push("; ");
                    members_query(&mut q, &pairs);
                    q.build_query_as().fetch_all(&mut *tx).await?
                } else {
                    let mut rows: Vec<(String, String, String, i64)> =
                        q.build_query_as().fetch_all(&mut *tx).await?;
                    let mut q = sqlx::QueryBuilder::<$db>::new("");
                    members_query(&mut q, &pairs);
                    rows.extend(
                        q.build_query_as::<(String, String, String, i64)>()
                            .fetch_all(&mut *tx)
                            .await?,
                    );
                    rows
                }
                };
                let mut lasts: HashMap<(String, String), i64> = HashMap::new();
                let mut member_rows: Vec<(String, String)> = Vec::new();
                for (kind, a, b, n) in tagged {
                    if kind == "L" {
                        lasts.insert((a, b), n);
                    } else {
                        member_rows.push((a, b));
                    }
                }
                let members: std::collections::HashSet<(&str, &str)> =
                    member_rows.iter().map(|(c, u)| (c.as_str(), u.as_str())).collect();
                // Messages already stored under a client_message_id of this batch (under the
                // channel locks nobody else can insert one of these keys now).
                let mut wanted: Vec<(&str, &str, &str)> = Vec::new();
                for ((channel, _), positions) in &by_channel {
                    for &i in positions {
                        if let Some(b) = &batch[i] {
                            if let Some(key) = &b.msg.client_message_id {
                                wanted.push((channel.as_str(), b.user_id.as_str(), key.as_str()));
                            }
                        }
                    }
                }
                wanted.sort_unstable();
                wanted.dedup();
                let stored_rows: Vec<MessageRow> = if wanted.is_empty() {
                    Vec::new()
                } else {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT m.* FROM (VALUES ");
                    push_padded_rows(&mut q, &wanted, ("", "", ""), |q, (c, u, k)| {
                        q.push_bind(c).push(", ").push_bind(u).push(", ").push_bind(k);
                    });
                    q.push(
                        ") AS d JOIN messages m ON m.channel_id = d.column1 \
                         AND m.sender_id = d.column2 AND m.client_message_id = d.column3",
                    );
                    q.build_query_as().fetch_all(&mut *tx).await?
                };
                let stored: HashMap<(&str, &str, &str), &MessageRow> = stored_rows
                    .iter()
                    .filter_map(|r| {
                        let key = r.client_message_id.as_deref()?;
                        Some(((r.channel_id.as_str(), r.sender_id.as_str(), key), r))
                    })
                    .collect();
                // (channel, tenant, last sequence once committed) of every live channel.
                let mut finals: Vec<(&str, &str, i64)> = Vec::with_capacity(lasts.len());
                for (key, positions) in &by_channel {
                    let channel = &key.0;
                    let n = positions.len() as i64;
                    let Some(&last) = lasts.get(key) else {
                        for &i in positions {
                            out[i] = Some(Err(StoreError::NotFound));
                        }
                        continue;
                    };
                    let mut keys: HashMap<(String, String), usize> = HashMap::new();
                    let mut next = last - n;
                    for &i in positions {
                        let Some(b) = batch[i].take() else { continue };
                        if !members.contains(&(channel.as_str(), b.user_id.as_str())) {
                            out[i] = Some(Err(StoreError::NotFound));
                            continue;
                        }
                        if let Some(key) = &b.msg.client_message_id {
                            let k = (b.user_id.clone(), key.clone());
                            if let Some(&r) = keys.get(&k) {
                                repeats.push((i, r));
                                continue;
                            }
                            if let Some(&first) =
                                stored.get(&(channel.as_str(), b.user_id.as_str(), key.as_str()))
                            {
                                out[i] = Some(Ok(Inserted::Existing(first.clone())));
                                continue;
                            }
                            keys.insert(k, rows.len());
                        }
                        next += 1;
                        // Id and time are set once every lock is held.
                        rows.push((i, batch_row(b, String::new(), next, 0)));
                    }
                    finals.push((channel.as_str(), key.1.as_str(), next));
                    if next != last {
                        // Some were refused: give back the sequences they would have taken.
                        sqlx::query("UPDATE channels SET last_sequence = $1 WHERE id = $2")
                            .bind(next)
                            .bind(channel)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                // Ids (UUIDv7) and times are taken now that every lock is held, so they grow
                // with the sequence as on the single-message path.
                let now = now_micros();
                for (_, r) in rows.iter_mut() {
                    r.id = Uuid::now_v7().to_string();
                    r.create_time = now;
                }
                let payloads: Vec<Vec<u8>> = rows.iter().map(|(_, r)| enc(r, r.sequence)).collect();
                let audits: Vec<(String, Option<String>)> = rows
                    .iter()
                    .map(|(_, r)| (Uuid::now_v7().to_string(), to_json(r)))
                    .collect();
                let mut at = 0;
                let mut committed = false;
                for size in insert_sizes(rows.len(), Self::POWER_OF_TWO_INSERTS) {
                    let chunk = &rows[at..at + size];
                    let payloads = &payloads[at..at + size];
                    let audits = &audits[at..at + size];
                    at += size;
                    // The three INSERTs go to the database in one command where it takes
                    // several statements in one (SQLite: one trip to its worker thread, not
                    // three), else one by one.
                    let mut q = sqlx::QueryBuilder::<$db>::new("");
                    q.push(
                        "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
                         parent_message_id, attachment_ids, client_message_id, \
                         forwarded_from_message_id, sequence, version, create_time) ",
                    );
                    q.push_values(chunk, |mut v, (_, r)| {
                        v.push_bind(&r.id)
                            .push_bind(&r.tenant_id)
                            .push_bind(&r.channel_id)
                            .push_bind(&r.sender_id)
                            .push_bind(&r.body)
                            .push_bind(&r.subject)
                            .push_bind(&r.parent_message_id)
                            .push_bind(&r.attachment_ids)
                            .push_bind(&r.client_message_id)
                            .push_bind(&r.forwarded_from_message_id)
                            .push_bind(r.sequence)
                            .push_bind(1i64)
                            .push_bind(r.create_time);
                    });
                    if Self::STATEMENTS_IN_ONE_COMMAND {
                        q.push("; ");
                    } else {
                        q.build().execute(&mut *tx).await?;
                        q.reset();
                    }
                    q.push("INSERT INTO events (channel_id, sequence, payload) ");
                    q.push_values(chunk.iter().zip(payloads), |mut v, ((_, r), p)| {
                        v.push_bind(&r.channel_id).push_bind(r.sequence).push_bind(p.as_slice());
                    });
                    if Self::STATEMENTS_IN_ONE_COMMAND {
                        q.push("; ");
                    } else {
                        q.build().execute(&mut *tx).await?;
                        q.reset();
                    }
                    q.push(
                        "INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, \
                         actor_id, before_json, after_json, create_time) ",
                    );
                    q.push_values(chunk.iter().zip(audits), |mut v, ((_, r), (id, after))| {
                        v.push_bind(id)
                            .push_bind(&r.tenant_id)
                            .push_bind("create")
                            .push_bind("messages")
                            .push_bind(&r.id)
                            .push_bind(&r.sender_id)
                            .push_bind(None::<String>)
                            .push_bind(after)
                            .push_bind(now);
                    });
                    if at == rows.len() && Self::STATEMENTS_IN_ONE_COMMAND {
                        q.push("; COMMIT");
                        committed = true;
                    }
                    q.build().execute(&mut *tx).await?;
                }
                match tx {
                    WriteTransaction::Sqlx(t) => t.commit().await?,
                    WriteTransaction::Manual(mut t) => {
                        if !committed {
                            sqlx::query("COMMIT").execute(&mut *t).await?;
                        }
                        t.committed();
                    }
                }
                self.committed_generally(&finals);
                Ok(batch_outcomes(out, rows, payloads, repeats))
            }

            fn write_concurrency(&self) -> usize {
                Self::write_workers()
            }

            fn commit_paths(&self) -> CommitPaths {
                self.paths()
            }

            async fn message(&self, tenant: &str, message_id: &str) -> StoreResult<MessageRow> {
                sqlx::query_as("SELECT * FROM messages WHERE id = $1 AND tenant_id = $2")
                    .bind(message_id)
                    .bind(tenant)
                    .fetch_optional(&self.read)
                    .await?
                    .ok_or(StoreError::NotFound)
            }

            async fn list_messages(
                &self,
                viewer: (&str, &str),
                channel_id: &str,
                parent: Option<&str>,
                before_sequence: Option<i64>,
                limit: i64,
            ) -> StoreResult<Vec<MessageRow>> {
                let before = before_sequence.unwrap_or(i64::MAX);
                let sql = history_sql(parent.is_some(), limit);
                // Rows through sqlx: ListMessages sends `list_messages_encoded`, and the tests
                // compare the two, so this path decodes independently of that one.
                let mut rows = self
                    .sqlx_history_rows(&sql, channel_id, before, viewer, parent)
                    .await?;
                rows.truncate(usize::try_from(limit).unwrap_or(0));
                Ok(rows)
            }

            async fn list_messages_encoded(
                &self,
                viewer: (&str, &str),
                channel_id: &str,
                parent: Option<&str>,
                before_sequence: Option<i64>,
                limit: i64,
            ) -> StoreResult<EncodedMessages> {
                let before = before_sequence.unwrap_or(i64::MAX);
                let sql = history_sql(parent.is_some(), limit);
                self.history_encoded(sql, channel_id, before, viewer, parent, limit)
                    .await
            }

            async fn update_message(
                &self,
                actor: Actor<'_>,
                message_id: &str,
                patch: MessagePatch,
                enc: Encoder<'_, MessageRow>,
            ) -> StoreResult<Changed<MessageRow>> {
                let mut tx = self.write.begin().await?;
                let (before, sequence) = self.lock_message(&mut tx, actor.tenant_id, message_id).await?;
                if patch.expected_version.is_some_and(|v| v != before.version) {
                    return Err(StoreError::Stale);
                }
                let row: MessageRow = sqlx::query_as(
                    "UPDATE messages SET body = COALESCE($2, body), subject = COALESCE($3, subject), \
                     version = version + 1, update_time = $4 WHERE id = $1 RETURNING *",
                )
                .bind(message_id)
                .bind(patch.body)
                .bind(patch.subject)
                .bind(now_micros())
                .fetch_one(&mut *tx)
                .await?;
                let payload = enc(&row, sequence);
                Self::event(&mut tx, &row.channel_id, sequence, &payload).await?;
                Self::audit(&mut tx, actor, "update", "messages", message_id, to_json(&before), to_json(&row)).await?;
                tx.commit().await?;
                Ok(Changed { row, sequence, payload })
            }

            async fn delete_message(
                &self,
                actor: Actor<'_>,
                message_id: &str,
                enc: Encoder<'_, MessageRow>,
            ) -> StoreResult<Changed<MessageRow>> {
                let mut tx = self.write.begin().await?;
                let (before, sequence) = self.lock_message(&mut tx, actor.tenant_id, message_id).await?;
                let row: MessageRow = sqlx::query_as(
                    "UPDATE messages SET version = version + 1, delete_time = $2, deleted_by = $3 \
                     WHERE id = $1 RETURNING *",
                )
                .bind(message_id)
                .bind(now_micros())
                .bind(actor.user_id)
                .fetch_one(&mut *tx)
                .await?;
                let payload = enc(&row, sequence);
                Self::event(&mut tx, &row.channel_id, sequence, &payload).await?;
                Self::audit(&mut tx, actor, "delete", "messages", message_id, to_json(&before), to_json(&row)).await?;
                tx.commit().await?;
                Ok(Changed { row, sequence, payload })
            }

            async fn count_messages(&self, channel_id: &str) -> StoreResult<i64> {
                Ok(sqlx::query_scalar(
                    "SELECT COUNT(*) FROM messages WHERE channel_id = $1 AND delete_time IS NULL",
                )
                .bind(channel_id)
                .fetch_one(&self.read)
                .await?)
            }
        }

        #[async_trait]
        impl ReadStateStore for $store {
            async fn mark_read(&self, channel_id: &str, user: &str, sequence: i64) -> StoreResult<(i64, bool)> {
                let mut tx = self.write.begin().await?;
                let moved = sqlx::query(
                    "UPDATE members SET read_sequence = $3 \
                     WHERE channel_id = $1 AND user_id = $2 AND read_sequence < $3",
                )
                .bind(channel_id)
                .bind(user)
                .bind(sequence)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0;
                let marker: i64 = sqlx::query_scalar(
                    "SELECT read_sequence FROM members WHERE channel_id = $1 AND user_id = $2",
                )
                .bind(channel_id)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                tx.commit().await?;
                Ok((marker, moved))
            }

            async fn set_favorite(
                &self,
                tenant: &str,
                user: &str,
                message_id: &str,
                favorite: bool,
            ) -> StoreResult<()> {
                if favorite {
                    sqlx::query(
                        "INSERT INTO favorites (tenant_id, user_id, message_id, create_time) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (message_id, user_id) DO NOTHING",
                    )
                    .bind(tenant)
                    .bind(user)
                    .bind(message_id)
                    .bind(now_micros())
                    .execute(&self.write)
                    .await?;
                } else {
                    sqlx::query("DELETE FROM favorites WHERE message_id = $1 AND user_id = $2")
                        .bind(message_id)
                        .bind(user)
                        .execute(&self.write)
                        .await?;
                }
                Ok(())
            }

            async fn recipients(&self, msg: &MessageRow) -> StoreResult<Vec<RecipientState>> {
                let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                    "SELECT m.user_id, m.read_sequence, \
                     (SELECT COUNT(*) FROM favorites f WHERE f.message_id = $2 AND f.user_id = m.user_id) \
                     FROM members m WHERE m.channel_id = $1 ORDER BY m.join_time, m.user_id",
                )
                .bind(&msg.channel_id)
                .bind(&msg.id)
                .fetch_all(&self.read)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(user_id, read_sequence, favorites)| RecipientState {
                        read: user_id == msg.sender_id || read_sequence >= msg.sequence,
                        favorite: favorites > 0,
                        user_id,
                    })
                    .collect())
            }

            async fn unread_counts(&self, tenant: &str, user: &str) -> StoreResult<Vec<(String, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT m.channel_id, COUNT(msg.id) FROM members m \
                     LEFT JOIN messages msg ON msg.channel_id = m.channel_id \
                     AND msg.sequence > m.read_sequence AND msg.sender_id <> m.user_id \
                     AND msg.delete_time IS NULL \
                     WHERE m.tenant_id = $1 AND m.user_id = $2 \
                     GROUP BY m.channel_id ORDER BY m.channel_id",
                )
                .bind(tenant)
                .bind(user)
                .fetch_all(&self.read)
                .await?)
            }
        }

        #[async_trait]
        impl EventStore for $store {
            async fn events(
                &self,
                channel_id: &str,
                after: i64,
                up_to: i64,
                limit: i64,
            ) -> StoreResult<Vec<EventRow>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM events WHERE channel_id = $1 AND sequence > $2 \
                     AND sequence <= $3 ORDER BY sequence LIMIT $4",
                )
                .bind(channel_id)
                .bind(after)
                .bind(up_to)
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }
        }

        #[async_trait]
        impl AttachmentStore for $store {
            async fn insert_attachment(&self, actor: Actor<'_>, row: AttachmentRow) -> StoreResult<AttachmentRow> {
                let mut tx = self.write.begin().await?;
                Self::insert_attachment_in(&mut tx, actor, &row).await?;
                tx.commit().await?;
                Ok(row)
            }

            async fn attachment(&self, tenant: &str, id: &str) -> StoreResult<AttachmentRow> {
                sqlx::query_as("SELECT * FROM attachments WHERE id = $1 AND tenant_id = $2")
                    .bind(id)
                    .bind(tenant)
                    .fetch_optional(&self.read)
                    .await?
                    .ok_or(StoreError::NotFound)
            }

            async fn list_attachments(
                &self,
                channel_id: &str,
                message_id: Option<&str>,
                viewer: &str,
                before: Option<&str>,
                limit: i64,
            ) -> StoreResult<Vec<AttachmentRow>> {
                Ok(sqlx::query_as(
                    "SELECT a.* FROM attachments a WHERE a.channel_id = $1 \
                     AND (CAST($2 AS TEXT) IS NULL OR a.message_id = $2) \
                     AND (CAST($3 AS TEXT) IS NULL OR a.id < $3) \
                     AND ((a.message_id IS NULL AND a.uploader_id = $5) OR EXISTS (\
                         SELECT 1 FROM messages m WHERE m.id = a.message_id AND m.delete_time IS NULL)) \
                     ORDER BY a.id DESC LIMIT $4",
                )
                .bind(channel_id)
                .bind(message_id)
                .bind(before)
                .bind(limit)
                .bind(viewer)
                .fetch_all(&self.read)
                .await?)
            }

            async fn delete_attachment(&self, actor: Actor<'_>, id: &str) -> StoreResult<AttachmentRow> {
                let mut tx = self.write.begin().await?;
                let row: AttachmentRow = sqlx::query_as(
                    "DELETE FROM attachments WHERE id = $1 AND tenant_id = $2 RETURNING *",
                )
                .bind(id)
                .bind(actor.tenant_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                Self::audit(&mut tx, actor, "delete", "attachments", id, to_json(&row), None).await?;
                tx.commit().await?;
                Ok(row)
            }

            async fn unlinked_before(&self, before: i64, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM attachments WHERE message_id IS NULL AND create_time < $1 LIMIT $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }

            async fn attachments_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
                Ok(sqlx::query_as(
                    "SELECT a.* FROM channels c JOIN attachments a ON a.channel_id = c.id \
                     WHERE c.delete_time IS NOT NULL LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }

            async fn sweep_attachment(&self, id: &str) -> StoreResult<bool> {
                let mut tx = self.write.begin().await?;
                let row: Option<AttachmentRow> = sqlx::query_as(
                    "DELETE FROM attachments WHERE id = $1 AND (message_id IS NULL \
                     OR channel_id IN (SELECT id FROM channels WHERE delete_time IS NOT NULL)) \
                     RETURNING *",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    return Ok(false);
                };
                let actor = Actor { tenant_id: &row.tenant_id, user_id: "system:sweep" };
                Self::audit(&mut tx, actor, "delete", "attachments", id, to_json(&row), None).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn create_upload(
                &self,
                row: UploadRow,
                max_open: i64,
                max_open_bytes: i64,
            ) -> StoreResult<Option<(i64, i64)>> {
                let mut tx = self.write.begin_with(Self::BEGIN_WRITE).await?;
                if let Some(lock) = Self::LOCK_UPLOADER {
                    sqlx::query(lock)
                        .bind(format!("{}\n{}", row.tenant_id, row.uploader_id))
                        .execute(&mut *tx)
                        .await?;
                }
                let (open, bytes): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM uploads \
                     WHERE tenant_id = $1 AND uploader_id = $2",
                )
                .bind(&row.tenant_id)
                .bind(&row.uploader_id)
                .fetch_one(&mut *tx)
                .await?;
                if open >= max_open || bytes.saturating_add(row.size_bytes) > max_open_bytes {
                    // At once, so the uploader's lock is released now, not when the pool
                    // next touches the connection.
                    tx.rollback().await?;
                    return Ok(Some((open, bytes)));
                }
                sqlx::query(
                    "INSERT INTO uploads (id, tenant_id, channel_id, uploader_id, file_name, \
                     content_type, size_bytes, sha256, committed_bytes, create_time) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
                )
                .bind(&row.id)
                .bind(&row.tenant_id)
                .bind(&row.channel_id)
                .bind(&row.uploader_id)
                .bind(&row.file_name)
                .bind(&row.content_type)
                .bind(row.size_bytes)
                .bind(&row.sha256)
                .bind(row.create_time)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(None)
            }

            async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow> {
                sqlx::query_as("SELECT * FROM uploads WHERE id = $1 AND tenant_id = $2")
                    .bind(id)
                    .bind(tenant)
                    .fetch_optional(&self.write)
                    .await?
                    .ok_or(StoreError::NotFound)
            }

            async fn commit_chunk(&self, id: &str, from: i64, to: i64, key: &str) -> StoreResult<bool> {
                let mut tx = self.write.begin().await?;
                let n = sqlx::query("UPDATE uploads SET committed_bytes = $3 WHERE id = $1 AND committed_bytes = $2")
                    .bind(id)
                    .bind(from)
                    .bind(to)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n != 1 {
                    return Ok(false);
                }
                sqlx::query("INSERT INTO upload_chunks (upload_id, byte_offset, storage_key) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(from)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT storage_key FROM upload_chunks WHERE upload_id = $1 ORDER BY byte_offset",
                )
                .bind(id)
                .fetch_all(&self.write)
                .await?)
            }

            async fn complete_upload(&self, actor: Actor<'_>, upload_id: &str, row: AttachmentRow) -> StoreResult<AttachmentRow> {
                let mut tx = self.write.begin().await?;
                let n = sqlx::query("DELETE FROM uploads WHERE id = $1")
                    .bind(upload_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n != 1 {
                    return Err(StoreError::NotFound);
                }
                sqlx::query("DELETE FROM upload_chunks WHERE upload_id = $1")
                    .bind(upload_id)
                    .execute(&mut *tx)
                    .await?;
                Self::insert_attachment_in(&mut tx, actor, &row).await?;
                tx.commit().await?;
                Ok(row)
            }

            async fn uploads_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<UploadRow>> {
                Ok(sqlx::query_as(
                    "SELECT u.* FROM channels c JOIN uploads u ON u.channel_id = c.id \
                     WHERE c.delete_time IS NOT NULL LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }

            async fn uploads_before(&self, before: i64, limit: i64) -> StoreResult<Vec<UploadRow>> {
                Ok(sqlx::query_as("SELECT * FROM uploads WHERE create_time < $1 LIMIT $2")
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&self.read)
                    .await?)
            }

            async fn delete_upload(&self, id: &str) -> StoreResult<()> {
                let mut tx = self.write.begin().await?;
                sqlx::query("DELETE FROM uploads WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM upload_chunks WHERE upload_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn insert_download(&self, row: DownloadRow) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO attachment_downloads (id, tenant_id, attachment_id, user_id, \
                     download_time, bytes_sent, completed) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&row.id)
                .bind(&row.tenant_id)
                .bind(&row.attachment_id)
                .bind(&row.user_id)
                .bind(row.download_time)
                .bind(row.bytes_sent)
                .bind(row.completed)
                .execute(&self.write)
                .await?;
                Ok(())
            }

            async fn finish_download(&self, id: &str, bytes_sent: i64, completed: bool) -> StoreResult<()> {
                sqlx::query("UPDATE attachment_downloads SET bytes_sent = $2, completed = $3 WHERE id = $1")
                    .bind(id)
                    .bind(bytes_sent)
                    .bind(i64::from(completed))
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn list_downloads(&self, attachment_id: &str, before: Option<&str>, limit: i64) -> StoreResult<Vec<DownloadRow>> {
                Ok(sqlx::query_as(
                    "SELECT * FROM attachment_downloads WHERE attachment_id = $1 \
                     AND (CAST($2 AS TEXT) IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
                )
                .bind(attachment_id)
                .bind(before)
                .bind(limit)
                .fetch_all(&self.read)
                .await?)
            }
        }

        impl Store for $store {
            fn close(&self) -> BoxFuture<'_, ()> {
                Box::pin(async move {
                    self.write.close().await;
                    self.read.close().await;
                })
            }
        }
    };
}

impl SqliteStore {
    /// One writer connection: one group commit at a time.
    fn write_workers() -> usize {
        1
    }
    /// One writer: no other transaction can hold a channel row, so no lock order is needed.
    const LOCK_CHANNELS_IN_ORDER: bool = false;
    /// One INSERT per table per batch, of the batch's exact size: SQLite parses a statement in
    /// microseconds, less than the round trip to its worker thread that a second one costs.
    const POWER_OF_TWO_INSERTS: bool = false;
    /// sqlx runs every statement of a query text on SQLite (binding `?` in order across
    /// them), in one trip to the connection's worker thread.
    const STATEMENTS_IN_ONE_COMMAND: bool = true;
    /// The quota's check and insert take the database's write lock at once (`IMMEDIATE`), so
    /// they cannot interleave with another writer's, in this process or another.
    const LOCK_UPLOADER: Option<&'static str> = None;
    /// How a transaction that reads before it writes starts.
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    /// The text values of the JSON array bound to `$3`, as a subquery.
    const IDS_OF_JSON_ARRAY: &'static str = "SELECT value FROM json_each($3)";
}

impl SqliteStore {
    /// Every SQLite batch takes the general path: its statements run in-process, and the
    /// three INSERTs already go to the connection's thread in one command.
    async fn insert_messages_optimistic(
        &self,
        _batch: &[BatchMessage],
        _enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Option<Vec<StoreResult<Inserted>>>> {
        Ok(None)
    }

    fn committed_generally(&self, _channels: &[(&str, &str, i64)]) {}

    /// Not counted on SQLite.
    fn paths(&self) -> CommitPaths {
        CommitPaths::default()
    }
}

/// One group-commit batch laid out for `chat_append_messages`, given each channel's last
/// sequence: the new rows with their sequences, ids and encoded events, and what every position
/// of the batch gets.
struct BatchPlan<'b> {
    /// Outcomes decided already: `NotFound` for unknown channels, repeats below.
    out: Vec<Option<StoreResult<Inserted>>>,
    /// (batch position, new row), in channel order, each channel's rows in batch order.
    rows: Vec<(usize, MessageRow)>,
    /// The encoded event of each row.
    payloads: Vec<Vec<u8>>,
    /// Repeats of a client_message_id within the batch: (position, index into `rows`).
    repeats: Vec<(usize, usize)>,
    /// (channel, tenant, last sequence now, last sequence after the batch).
    channels: Vec<(&'b str, &'b str, i64, i64)>,
    now: i64,
}

impl<'b> BatchPlan<'b> {
    /// Lays out `batch` for channels whose last sequences are `last_of` (a channel not in it
    /// gets `NotFound`): sequences follow on gap-free in batch order, ids are UUIDv7 taken in
    /// that order.
    fn new(
        batch: &'b [BatchMessage],
        by_channel: &BTreeMap<(&'b str, &'b str), Vec<usize>>,
        last_of: &HashMap<(&str, &str), i64>,
        enc: Encoder<'_, MessageRow>,
    ) -> BatchPlan<'b> {
        let now = now_micros();
        let mut out: Vec<Option<StoreResult<Inserted>>> = vec![None; batch.len()];
        let mut rows: Vec<(usize, MessageRow)> = Vec::with_capacity(batch.len());
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut channels = Vec::with_capacity(by_channel.len());
        for (&(channel, tenant), positions) in by_channel {
            let Some(&last) = last_of.get(&(channel, tenant)) else {
                for &i in positions {
                    out[i] = Some(Err(StoreError::NotFound));
                }
                continue;
            };
            let mut next = last;
            let mut keys: HashMap<(&str, &str), usize> = HashMap::new();
            for &i in positions {
                let b = &batch[i];
                if let Some(key) = &b.msg.client_message_id {
                    match keys.entry((b.user_id.as_str(), key.as_str())) {
                        std::collections::hash_map::Entry::Occupied(first) => {
                            repeats.push((i, *first.get()));
                            continue;
                        }
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            slot.insert(rows.len());
                        }
                    }
                }
                next += 1;
                rows.push((
                    i,
                    batch_row(b.clone(), Uuid::now_v7().to_string(), next, now),
                ));
            }
            channels.push((channel, tenant, last, next));
        }
        let payloads = rows.iter().map(|(_, r)| enc(r, r.sequence)).collect();
        BatchPlan {
            out,
            rows,
            payloads,
            repeats,
            channels,
            now,
        }
    }

    /// Binds $1-$16 of `chat_append_messages`: the rows as parallel arrays, each channel's new
    /// last sequence, the create time.
    fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments> {
        let rows = &self.rows;
        let text =
            |f: fn(&MessageRow) -> &str| -> Vec<&str> { rows.iter().map(|(_, r)| f(r)).collect() };
        let opt = |f: fn(&MessageRow) -> Option<&str>| -> Vec<Option<&str>> {
            rows.iter().map(|(_, r)| f(r)).collect()
        };
        q.bind(text(|r| &r.id))
            .bind(text(|r| &r.tenant_id))
            .bind(text(|r| &r.channel_id))
            .bind(text(|r| &r.sender_id))
            .bind(text(|r| &r.body))
            .bind(text(|r| &r.subject))
            .bind(opt(|r| r.parent_message_id.as_deref()))
            .bind(opt(|r| r.client_message_id.as_deref()))
            .bind(opt(|r| r.forwarded_from_message_id.as_deref()))
            .bind(rows.iter().map(|(_, r)| r.sequence).collect::<Vec<i64>>())
            .bind(&self.payloads)
            .bind(
                rows.iter()
                    .map(|_| Uuid::now_v7().to_string())
                    .collect::<Vec<String>>(),
            )
            .bind(
                rows.iter()
                    .map(|(_, r)| to_json(r))
                    .collect::<Vec<Option<String>>>(),
            )
            .bind(self.channels.iter().map(|c| c.0).collect::<Vec<&str>>())
            .bind(self.channels.iter().map(|c| c.3).collect::<Vec<i64>>())
            .bind(self.now)
    }

    /// The outcome of every position once the rows are committed.
    fn committed(self) -> Vec<StoreResult<Inserted>> {
        batch_outcomes(self.out, self.rows, self.payloads, self.repeats)
    }
}

/// Channels whose last sequence a PostgreSQL store has last written, as a hint for the next
/// batch (every write re-checks it under lock). Forgotten wholesale past this many channels.
const KNOWN_SEQUENCES: usize = 65_536;

impl PostgresStore {
    /// The group commit's common case (every sender a member, no `client_message_id` already
    /// stored) in one round trip: a call of `chat_append_messages` (migration 0003) in
    /// autocommit, with the batch laid out here on the channels' last sequences as this store
    /// last left them. The function locks the channels, checks those sequences and the
    /// assumption after the locks (so on READ COMMITTED it sees every membership change that
    /// committed while it waited), and writes everything or nothing. Channels this store has
    /// not written lately cost one read before.
    ///
    /// `Ok(None)` when the function wrote nothing (another writer moved a channel on, or the
    /// assumption failed, or a concurrent process stored one of the keys first): the caller
    /// takes the general path, which sorts out each message on its own, and the batch's
    /// channels are read afresh next time. Channels that are missing, deleted or of another
    /// tenant are answered `NotFound` here, as there.
    async fn insert_messages_optimistic(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Option<Vec<StoreResult<Inserted>>>> {
        let mut by_channel: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        for (i, b) in batch.iter().enumerate() {
            by_channel
                .entry((b.msg.channel_id.as_str(), b.tenant_id.as_str()))
                .or_default()
                .push(i);
        }
        let mut last_of: HashMap<(&str, &str), i64> = HashMap::new();
        let mut unknown: Vec<&str> = Vec::new();
        {
            let known = self.known();
            for &(c, t) in by_channel.keys() {
                match known.get(c) {
                    Some((tenant, last)) if tenant == t => {
                        last_of.insert((c, t), *last);
                    }
                    _ => unknown.push(c),
                }
            }
        }
        unknown.dedup();
        // One connection for both statements, its wait measured (chat_db_acquire_seconds).
        let waited = std::time::Instant::now();
        let mut conn = self.write.acquire().await?;
        crate::metrics::write_acquired(waited.elapsed());
        let read: Vec<(String, String, i64)> = if unknown.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT id, tenant_id, last_sequence FROM channels \
                 WHERE id = ANY($1) AND delete_time IS NULL",
            )
            .bind(&unknown)
            .fetch_all(&mut *conn)
            .await?
        };
        for (c, t, last) in &read {
            if let Some((&(c, t), _)) = by_channel.get_key_value(&(c.as_str(), t.as_str())) {
                last_of.insert((c, t), *last);
            }
        }
        let plan = BatchPlan::new(batch, &by_channel, &last_of, enc);
        if plan.rows.is_empty() {
            return Ok(Some(plan.committed()));
        }
        let status = plan
            .bind(sqlx::query_scalar::<_, i32>(
                "SELECT chat_append_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
                 $12, $13, $14, $15, $16, $17, $18)",
            ))
            .bind(plan.channels.iter().map(|c| c.1).collect::<Vec<&str>>())
            .bind(plan.channels.iter().map(|c| c.2).collect::<Vec<i64>>())
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from);
        match status {
            Ok(0) => {
                self.remember(plan.channels.iter().map(|&(c, t, _, last)| (c, t, last)));
                self.one_call.fetch_add(1, Ordering::Relaxed);
                Ok(Some(plan.committed()))
            }
            // 1: another writer moved a channel on (an edit, a membership change, another
            // process): read it afresh next time.
            Ok(1) => {
                self.known()
                    .retain(|c, _| !plan.channels.iter().any(|p| p.0 == c));
                Ok(None)
            }
            // 2: a sender is not a member, or a key is stored already; or a concurrent process
            // stored one of the keys first (Conflict). The sequences were right.
            Ok(_) | Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Notes the last sequences a committed batch left its channels at.
    fn remember<'a>(&self, channels: impl ExactSizeIterator<Item = (&'a str, &'a str, i64)>) {
        let mut known = self.known();
        if known.len() + channels.len() > KNOWN_SEQUENCES {
            known.clear();
        }
        for (channel, tenant, last) in channels {
            known.insert(channel.to_owned(), (tenant.to_owned(), last));
        }
    }

    /// The hints; a panic while they were held leaves them as they were (hints only).
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, i64)>> {
        self.known_sequences
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A batch the general path committed: its channels' sequences are known again.
    fn committed_generally(&self, channels: &[(&str, &str, i64)]) {
        self.remember(channels.iter().copied());
        self.general.fetch_add(1, Ordering::Relaxed);
    }

    fn paths(&self) -> CommitPaths {
        CommitPaths {
            one_call: self.one_call.load(Ordering::Relaxed),
            general: self.general.load(Ordering::Relaxed),
        }
    }
}

impl PostgresStore {
    /// Batches in flight at once, each for its own share of the channels: while one waits for
    /// its commit (the WAL flush), another gathers and sends its statements. One per core, 2 to
    /// 16: on the 2-core bench box, 2 did 7.4k sends/s at 64 senders and 4 no more.
    fn write_workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 16))
    }
    /// Concurrent batches lock their channels with
    /// `SELECT … ORDER BY id COLLATE "C" FOR NO KEY UPDATE` first.
    const LOCK_CHANNELS_IN_ORDER: bool = true;
    /// Multi-row INSERTs in power-of-two sizes, so every statement text is prepared once (a
    /// new text per batch size showed as parse time in PostgreSQL's profile).
    const POWER_OF_TWO_INSERTS: bool = true;
    /// The extended query protocol takes one statement per prepared query.
    const STATEMENTS_IN_ONE_COMMAND: bool = false;
    /// Serializes one uploader's CreateUpload calls for the quota check (`$1`: tenant and
    /// user), until the transaction ends.
    const LOCK_UPLOADER: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))");
    /// How a transaction that reads before it writes starts (the lock above serializes it).
    const BEGIN_WRITE: &'static str = "BEGIN";
    /// The text values of the JSON array bound to `$3`, as a subquery.
    const IDS_OF_JSON_ARRAY: &'static str = "SELECT jsonb_array_elements_text(CAST($3 AS jsonb))";
}

impl_store!(SqliteStore, Sqlite);
impl_store!(PostgresStore, Postgres);

#[cfg(test)]
mod tests {
    use super::insert_sizes;

    #[test]
    fn insert_sizes_are_powers_of_two_that_add_up() {
        assert_eq!(
            insert_sizes(0, true).collect::<Vec<_>>(),
            Vec::<usize>::new()
        );
        assert_eq!(insert_sizes(1, true).collect::<Vec<_>>(), vec![1]);
        assert_eq!(insert_sizes(37, true).collect::<Vec<_>>(), vec![32, 4, 1]);
        assert_eq!(insert_sizes(256, true).collect::<Vec<_>>(), vec![256]);
        assert_eq!(
            insert_sizes(600, true).collect::<Vec<_>>(),
            vec![256, 256, 64, 16, 8]
        );
        for n in 0..1000 {
            let sizes: Vec<usize> = insert_sizes(n, true).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 256));
            let exact: Vec<usize> = insert_sizes(n, false).collect();
            assert_eq!(exact.iter().sum::<usize>(), n);
            assert!(exact.iter().all(|s| *s <= 256));
            assert_eq!(exact.len(), n.div_ceil(256));
        }
    }
}
