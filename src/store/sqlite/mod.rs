//! SQLite: the embedded default. One writer connection (SQLite allows one writer; queueing in
//! the pool instead of in `SQLITE_BUSY` retries keeps writes fair and fast), a pool of sqlx
//! readers for point lookups, and rusqlite readers for history pages ([`read`]); WAL lets the
//! readers run beside the writer. With one writer no transaction can hold a channel row while
//! another waits, so no lock order is needed; `$n` placeholders, `RETURNING` and
//! `ON CONFLICT` as in SQLite 3.35+.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{FromRow, Sqlite, Transaction};

use super::backend::Backend;
use super::batch::{self, Grouped};
use super::*;

pub mod read;

use read::{HistoryBinds, SqliteReaders};

/// SQLite result codes (sqlx reports the extended code, such as 778 = SQLITE_IOERR_WRITE; the
/// primary code is its low byte, <https://sqlite.org/rescode.html>) that mean storage trouble:
/// 5 BUSY, 6 LOCKED, 7 NOMEM, 8 READONLY, 10 IOERR, 13 FULL (a full disk), 14 CANTOPEN.
/// BUSY and LOCKED come after the busy timeout: another process held the file that long.
pub fn sqlite_unavailable(code: i64) -> bool {
    matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14)
}

/// The error a SQLite result code (as sqlx reports it, in decimal) becomes; `None`: a bug.
pub(super) fn error_kind(code: &str) -> Option<fn(String) -> StoreError> {
    code.parse()
        .is_ok_and(sqlite_unavailable)
        .then_some(StoreError::Unavailable as fn(String) -> StoreError)
}

/// Bytes of the database file each SQLite history reader maps (`PRAGMA mmap_size`): pages are
/// read from the page cache in place instead of copied by a `pread` each. The mapped pages
/// are the kernel's page cache, shared and reclaimable, but they count in the process's RSS
/// once touched.
const READER_MMAP_BYTES: u64 = 1 << 30;

/// Concurrent history queries (rusqlite connections; see [`SqliteReaders::run`] for which
/// thread runs each).
const HISTORY_READERS: usize = 4;

/// How long a statement waits for a lock before failing as unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections (each a thread of sqlx's) for the other reads: lookups of a member, a channel,
/// a message, the events a feed replays. One per two cores, from 2 to 8.
///
/// Each is a thread that allocates the rows it reads, and memory it allocated and the runtime's
/// threads freed stays with it while it is idle (mimalloc returns a page to its owning thread
/// only when that thread allocates again). So every idle reader thread holds memory from the
/// last burst of reads: in chat-bench scenario 4 (10,000 Subscribe streams opened, each
/// reading its membership and channel) 8 readers on 2 cores left 16.2-16.4 KiB per stream,
/// 4 left 13.7-15.1 and 2 left 11.7-14.2, with fan-out and sends within noise (sends do not
/// read here; history has its own readers).
fn point_readers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2).clamp(2, 8) as u32
}

/// The store on one SQLite file (or an in-memory database).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// History pages: read through rusqlite, without sqlx's per-row hand-over. `None` for an
    /// in-memory database, which only sqlx's connections share; its pages go through `read`.
    history: Option<SqliteReaders>,
}

impl SqliteStore {
    /// Opens (creating the file and its folder when missing) and migrates unless `migrate` is
    /// false. Errors as [`super::connect`].
    pub async fn connect(url: &str, migrate: bool) -> StoreResult<Arc<SqliteStore>> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // Temporary structures in memory: the writer's profile under group commit showed
            // files created, unlinked and closed for every batch.
            .pragma("temp_store", "memory");
        if let Some(parent) = std::path::Path::new(opts.get_filename()).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", parent.display())))?;
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
            super::migrate(sqlx::migrate!("migrations/sqlite"), &write).await?;
        }
        let path = opts.get_filename().to_path_buf();
        // sqlx names an in-memory database `file:sqlx-in-memory-…` (or keeps `:memory:`): a
        // name only its own shared-cache connections can open.
        let in_memory = path
            .to_str()
            .is_some_and(|p| p.starts_with("file:") || p == ":memory:");
        let read = SqlitePoolOptions::new()
            .max_connections(point_readers())
            .test_before_acquire(false)
            // A list (up to MAX_PAGE_SIZE + 1 rows) is handed over without the worker thread
            // stopping to wait for the reader: at the default of 50 rows, a page of 50 (51 rows
            // asked for) blocked it once per page.
            .connect_with(opts.read_only(true).row_buffer_size(256))
            .await?;
        let history = (!in_memory)
            .then(|| SqliteReaders::new(path, HISTORY_READERS, READER_MMAP_BYTES, BUSY_TIMEOUT));
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

    /// The rows of a history query through sqlx, on the read pool.
    async fn sqlx_history(
        &self,
        sql: &str,
        channel_id: &str,
        before: i64,
        (tenant, user): (&str, &str),
        parent: Option<&str>,
    ) -> StoreResult<Vec<sqlx::sqlite::SqliteRow>> {
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
}

/// The text of a history query that selects [`MESSAGE_COLUMNS`] for `limit` rows or a few
/// more (see [`history_fetch_limit`]): `$1` channel, `$2` before, `$3` user, `$4` tenant, and
/// `$5` the thread's parent when `thread`. It returns rows only to a member of the live
/// channel (a constant sub-query, evaluated once per statement).
fn history_sql(thread: bool, limit: i64) -> String {
    let thread = if thread {
        "AND parent_message_id = $5 "
    } else {
        ""
    };
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel_id = $1 {thread}AND sequence < $2 \
         AND delete_time IS NULL AND EXISTS (SELECT 1 FROM members mb \
         JOIN channels c ON c.id = mb.channel_id WHERE mb.channel_id = $1 AND mb.user_id = $3 \
         AND mb.tenant_id = $4 AND c.delete_time IS NULL) \
         ORDER BY sequence DESC LIMIT {}",
        history_fetch_limit(limit)
    )
}

/// A transaction run by hand on a pooled connection, so that BEGIN and COMMIT can share a
/// command with other statements (each command is a trip to the connection's worker thread).
/// Dropped before [`ManualTransaction::committed`], on an error or a cancelled future, it
/// closes the connection instead of returning it to the pool: SQLite rolls the transaction
/// back when its connection ends.
struct ManualTransaction {
    conn: sqlx::pool::PoolConnection<Sqlite>,
    done: bool,
}

impl ManualTransaction {
    /// The COMMIT went through: the connection goes back to the pool.
    fn committed(mut self) {
        self.done = true;
    }
}

impl Drop for ManualTransaction {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// The rows a group commit's first command reads: `('L', channel, tenant, new last sequence)`
/// for each channel it advanced, `('M', channel, member, 0)` for each sender who is a member.
type Tagged = (String, String, String, i64);

impl SqliteStore {
    /// The group commit in two trips to the writer's thread: BEGIN, the advancing UPDATE and
    /// the membership SELECT in one command; the stored-keys SELECT (when the batch has keys);
    /// the INSERTs and COMMIT in one command. A sqlx transaction, one statement per trip, took
    /// five.
    async fn write_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        let grouped = Grouped::new(batch);
        let waited = std::time::Instant::now();
        let mut tx = ManualTransaction {
            conn: self.write.acquire().await?,
            done: false,
        };
        crate::metrics::write_acquired(waited.elapsed());
        // Every channel moves on by its count of messages; RETURNING gives the new last
        // sequence. Each list is padded to a power of two with rows that match nothing (ids
        // are never empty), so a few statement texts cover every batch.
        let counts = grouped.counts();
        let mut q = sqlx::QueryBuilder::<Sqlite>::new(
            "BEGIN IMMEDIATE; UPDATE channels SET last_sequence = channels.last_sequence \
             + d.column3 FROM (VALUES ",
        );
        batch::push_padded_rows(&mut q, &counts, ("", "", 0), |q, (c, t, n)| {
            q.push_bind(c)
                .push(", ")
                .push_bind(t)
                .push(", ")
                .push_bind(n);
        });
        q.push(
            ") AS d WHERE channels.id = d.column1 AND channels.tenant_id = d.column2 \
             AND channels.delete_time IS NULL RETURNING CAST('L' AS TEXT), channels.id, \
             channels.tenant_id, channels.last_sequence; \
             SELECT CAST('M' AS TEXT), m.channel_id, m.user_id, CAST(0 AS BIGINT) FROM (VALUES ",
        );
        batch::push_padded_rows(&mut q, &grouped.member_pairs(), ("", ""), |q, (c, u)| {
            q.push_bind(c).push(", ").push_bind(u);
        });
        q.push(") AS d JOIN members m ON m.channel_id = d.column1 AND m.user_id = d.column2");
        let tagged: Vec<Tagged> = q.build_query_as().fetch_all(&mut *tx.conn).await?;
        let mut members: Vec<(String, String)> = Vec::new();
        let mut advanced: Vec<(String, String, i64)> = Vec::new();
        for (kind, a, b, n) in tagged {
            if kind == "L" {
                advanced.push((a, b, n));
            } else {
                members.push((a, b));
            }
        }
        let keys = grouped.keys();
        let stored_rows: Vec<MessageRow> = if keys.is_empty() {
            Vec::new()
        } else {
            let mut q = sqlx::QueryBuilder::<Sqlite>::new("SELECT m.* FROM (VALUES ");
            batch::push_padded_rows(&mut q, &keys, ("", "", ""), |q, (c, u, k)| {
                q.push_bind(c)
                    .push(", ")
                    .push_bind(u)
                    .push(", ")
                    .push_bind(k);
            });
            q.push(
                ") AS d JOIN messages m ON m.channel_id = d.column1 \
                 AND m.sender_id = d.column2 AND m.client_message_id = d.column3",
            );
            q.build_query_as().fetch_all(&mut *tx.conn).await?
        };
        let plan = grouped.plan_from(&advanced, true, &members, &stored_rows, enc);
        let mut q = sqlx::QueryBuilder::<Sqlite>::new("");
        for (channel, last) in plan.give_backs(&advanced) {
            // Some were refused: give back the sequences they would have taken.
            q.push("UPDATE channels SET last_sequence = ")
                .push_bind(last)
                .push(" WHERE id = ")
                .push_bind(channel)
                .push("; ");
        }
        // INSERTs of the batch's exact size (up to 256 rows each; SQLite parses a statement
        // in microseconds, less than the round trip to its worker thread that a second command
        // costs), all in the one command with the COMMIT.
        for range in batch::insert_chunks(&plan, false) {
            for table in batch::Insert::ALL {
                batch::push_insert(&mut q, &plan, range.clone(), table);
                q.push("; ");
            }
        }
        q.push("COMMIT");
        q.build().execute(&mut *tx.conn).await?;
        tx.committed();
        Ok(plan.committed())
    }
}

#[async_trait]
impl Backend for SqliteStore {
    type Tx = Transaction<'static, Sqlite>;

    async fn begin(&self) -> StoreResult<Self::Tx> {
        Ok(self.write.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.rollback().await?)
    }

    /// The database's write lock from the start (`BEGIN IMMEDIATE`), so the quota's check
    /// and insert cannot interleave with another writer's, in this process or another.
    async fn begin_upload(&self, _tenant: &str, _uploader: &str) -> StoreResult<Self::Tx> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn bump(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
        n: i64,
    ) -> StoreResult<i64> {
        sqlx::query_scalar(
            "UPDATE channels SET last_sequence = last_sequence + $3 \
             WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL RETURNING last_sequence",
        )
        .bind(channel_id)
        .bind(tenant)
        .bind(n)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(StoreError::NotFound)
    }

    async fn lock_channel(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<()> {
        // An UPDATE, not a SELECT: the transaction takes the database's write lock here,
        // waiting out the busy timeout if another process holds it; a transaction that read
        // first and writes later would fail at once with SQLITE_BUSY instead.
        let n = sqlx::query(
            "UPDATE channels SET last_sequence = last_sequence \
             WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL",
        )
        .bind(channel_id)
        .bind(tenant)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn insert_channel(&self, tx: &mut Self::Tx, channel: &ChannelRow) -> StoreResult<()> {
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
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn insert_direct_channel(
        &self,
        tx: &mut Self::Tx,
        channel: &ChannelRow,
    ) -> StoreResult<bool> {
        let made = sqlx::query(
            "INSERT INTO channels (id, tenant_id, kind, name, description, channel_type, \
             direct_key, last_sequence, create_time, update_time) \
             VALUES ($1, $2, $3, '', '', '', $4, 0, $5, $5) ON CONFLICT (direct_key) DO NOTHING",
        )
        .bind(&channel.id)
        .bind(&channel.tenant_id)
        .bind(&channel.kind)
        .bind(&channel.direct_key)
        .bind(channel.create_time)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(made == 1)
    }

    async fn channel_in(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<Option<ChannelRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM channels WHERE id = $1 AND tenant_id = $2 AND delete_time IS NULL",
        )
        .bind(channel_id)
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await?)
    }

    async fn update_channel(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        patch: &GroupPatch,
        update_time: i64,
    ) -> StoreResult<ChannelRow> {
        Ok(sqlx::query_as(
            "UPDATE channels SET name = COALESCE($2, name), \
             description = COALESCE($3, description), \
             channel_type = COALESCE($4, channel_type), update_time = $5 \
             WHERE id = $1 RETURNING *",
        )
        .bind(channel_id)
        .bind(&patch.name)
        .bind(&patch.description)
        .bind(&patch.channel_type)
        .bind(update_time)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn mark_channel_deleted(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        delete_time: i64,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE channels SET delete_time = $2 WHERE id = $1")
            .bind(channel_id)
            .bind(delete_time)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn find_direct(&self, tenant: &str, direct_key: &str) -> StoreResult<Option<ChannelRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM channels WHERE direct_key = $1 AND tenant_id = $2 \
             AND delete_time IS NULL",
        )
        .bind(direct_key)
        .bind(tenant)
        .fetch_optional(&self.write)
        .await?)
    }

    async fn members_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<Vec<MemberRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM members WHERE channel_id = $1 ORDER BY join_time, user_id",
        )
        .bind(channel_id)
        .fetch_all(&mut **tx)
        .await?)
    }

    async fn member_in(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM members WHERE channel_id = $1 AND user_id = $2")
                .bind(channel_id)
                .bind(user)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn owners_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM members WHERE channel_id = $1 AND role = 'owner'",
        )
        .bind(channel_id)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn insert_member(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        row: &MemberRow,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO members (channel_id, tenant_id, user_id, role, join_time, \
             join_sequence, read_sequence) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&row.channel_id)
        .bind(tenant)
        .bind(&row.user_id)
        .bind(&row.role)
        .bind(row.join_time)
        .bind(row.join_sequence)
        .bind(row.read_sequence)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn delete_member(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM members WHERE channel_id = $1 AND user_id = $2")
            .bind(channel_id)
            .bind(user)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn update_role(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
        role: Role,
    ) -> StoreResult<MemberRow> {
        Ok(sqlx::query_as(
            "UPDATE members SET role = $3 WHERE channel_id = $1 AND user_id = $2 RETURNING *",
        )
        .bind(channel_id)
        .bind(user)
        .bind(role.as_str())
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn insert_event(
        &self,
        tx: &mut Self::Tx,
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

    async fn insert_audit(&self, tx: &mut Self::Tx, row: &AuditRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_logs (id, tenant_id, operation, table_name, entity_id, \
             actor_id, before_json, after_json, create_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(row.operation)
        .bind(row.table)
        .bind(&row.entity_id)
        .bind(&row.actor_id)
        .bind(&row.before_json)
        .bind(&row.after_json)
        .bind(row.create_time)
        .execute(&mut **tx)
        .await?;
        Ok(())
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

    async fn insert_message_row(&self, tx: &mut Self::Tx, row: &MessageRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
             parent_message_id, attachment_ids, client_message_id, \
             forwarded_from_message_id, sequence, version, create_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
        .bind(row.version)
        .bind(row.create_time)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn link_attachment(
        &self,
        tx: &mut Self::Tx,
        message: &MessageRow,
        attachment_id: &str,
    ) -> StoreResult<bool> {
        let linked = sqlx::query(
            "UPDATE attachments SET message_id = $1 WHERE id = $2 AND channel_id = $3 \
             AND uploader_id = $4 AND tenant_id = $5 AND message_id IS NULL",
        )
        .bind(&message.id)
        .bind(attachment_id)
        .bind(&message.channel_id)
        .bind(&message.sender_id)
        .bind(&message.tenant_id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(linked == 1)
    }

    async fn message_channel(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        message_id: &str,
    ) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT channel_id FROM messages WHERE id = $1 AND tenant_id = $2")
                .bind(message_id)
                .bind(tenant)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn message_in(&self, tx: &mut Self::Tx, message_id: &str) -> StoreResult<MessageRow> {
        Ok(sqlx::query_as("SELECT * FROM messages WHERE id = $1")
            .bind(message_id)
            .fetch_one(&mut **tx)
            .await?)
    }

    async fn update_message_row(
        &self,
        tx: &mut Self::Tx,
        message_id: &str,
        body: Option<&str>,
        subject: Option<&str>,
        update_time: i64,
    ) -> StoreResult<MessageRow> {
        Ok(sqlx::query_as(
            "UPDATE messages SET body = COALESCE($2, body), subject = COALESCE($3, subject), \
             version = version + 1, update_time = $4 WHERE id = $1 RETURNING *",
        )
        .bind(message_id)
        .bind(body)
        .bind(subject)
        .bind(update_time)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn delete_message_row(
        &self,
        tx: &mut Self::Tx,
        message_id: &str,
        delete_time: i64,
        deleted_by: &str,
    ) -> StoreResult<MessageRow> {
        Ok(sqlx::query_as(
            "UPDATE messages SET version = version + 1, delete_time = $2, deleted_by = $3 \
             WHERE id = $1 RETURNING *",
        )
        .bind(message_id)
        .bind(delete_time)
        .bind(deleted_by)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn insert_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        self.write_batch(batch, enc).await
    }

    /// One writer connection: one group commit at a time.
    fn write_concurrency(&self) -> usize {
        1
    }

    /// Not counted on SQLite: every batch takes the one path.
    fn commit_paths(&self) -> CommitPaths {
        CommitPaths::default()
    }

    async fn advance_read_marker(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
        sequence: i64,
    ) -> StoreResult<bool> {
        let moved = sqlx::query(
            "UPDATE members SET read_sequence = $3 \
             WHERE channel_id = $1 AND user_id = $2 AND read_sequence < $3",
        )
        .bind(channel_id)
        .bind(user)
        .bind(sequence)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(moved > 0)
    }

    async fn read_marker(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT read_sequence FROM members WHERE channel_id = $1 AND user_id = $2",
        )
        .bind(channel_id)
        .bind(user)
        .fetch_optional(&mut **tx)
        .await?)
    }

    async fn insert_attachment_row(
        &self,
        tx: &mut Self::Tx,
        row: &AttachmentRow,
    ) -> StoreResult<()> {
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
        Ok(())
    }

    async fn delete_attachment_row(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        id: &str,
    ) -> StoreResult<Option<AttachmentRow>> {
        Ok(
            sqlx::query_as("DELETE FROM attachments WHERE id = $1 AND tenant_id = $2 RETURNING *")
                .bind(id)
                .bind(tenant)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn delete_swept_attachment(
        &self,
        tx: &mut Self::Tx,
        id: &str,
    ) -> StoreResult<Option<AttachmentRow>> {
        Ok(sqlx::query_as(
            "DELETE FROM attachments WHERE id = $1 AND (message_id IS NULL \
             OR channel_id IN (SELECT id FROM channels WHERE delete_time IS NOT NULL)) \
             RETURNING *",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
    }

    async fn open_uploads(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        uploader: &str,
    ) -> StoreResult<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM uploads \
             WHERE tenant_id = $1 AND uploader_id = $2",
        )
        .bind(tenant)
        .bind(uploader)
        .fetch_one(&mut **tx)
        .await?)
    }

    async fn insert_upload(&self, tx: &mut Self::Tx, row: &UploadRow) -> StoreResult<()> {
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
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn advance_upload(
        &self,
        tx: &mut Self::Tx,
        id: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE uploads SET committed_bytes = $3 WHERE id = $1 AND committed_bytes = $2",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn insert_chunk(
        &self,
        tx: &mut Self::Tx,
        id: &str,
        offset: i64,
        key: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO upload_chunks (upload_id, byte_offset, storage_key) VALUES ($1, $2, $3)",
        )
        .bind(id)
        .bind(offset)
        .bind(key)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn delete_upload_row(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM uploads WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn delete_chunks(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM upload_chunks WHERE upload_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
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
             AND ($3 IS NULL OR c.id < $3) ORDER BY c.id DESC LIMIT $4",
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

    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        // The ids travel as one JSON array, so the statement text is the same for any number.
        let ids =
            serde_json::to_string(channel_ids).map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok(sqlx::query_as(
            "SELECT id, tenant_id, last_sequence FROM channels \
             WHERE id IN (SELECT value FROM json_each($1))",
        )
        .bind(ids)
        .fetch_all(&self.read)
        .await?)
    }

    async fn channel_heads(
        &self,
        tenant: &str,
        user: &str,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, i64)>> {
        // The ids travel as one JSON array, so the statement text is the same for any number.
        let ids =
            serde_json::to_string(channel_ids).map_err(|e| StoreError::Internal(e.to_string()))?;
        Ok(sqlx::query_as(
            "SELECT c.id, c.last_sequence FROM channels c \
             JOIN members m ON m.channel_id = c.id \
             WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.delete_time IS NULL \
             AND c.id IN (SELECT value FROM json_each($3))",
        )
        .bind(tenant)
        .bind(user)
        .bind(ids)
        .fetch_all(&self.read)
        .await?)
    }

    async fn member_rows_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<MemberRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM members WHERE tenant_id = $1 AND user_id = $2")
                .bind(tenant)
                .bind(user)
                .fetch_all(&self.read)
                .await?,
        )
    }

    async fn channels_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<ChannelRow>> {
        Ok(sqlx::query_as(
            "SELECT c.* FROM channels c JOIN members m ON m.channel_id = c.id \
             WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.delete_time IS NULL",
        )
        .bind(tenant)
        .bind(user)
        .fetch_all(&self.read)
        .await?)
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

    async fn owner_count(&self, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM members WHERE channel_id = $1 AND role = 'owner'",
        )
        .bind(channel_id)
        .fetch_one(&self.read)
        .await?)
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
        // Rows through sqlx: ListMessages sends `list_messages_encoded`, and the tests compare
        // the two, so this path decodes independently of that one.
        let before = before_sequence.unwrap_or(i64::MAX);
        let sql = history_sql(parent.is_some(), limit);
        let rows = self
            .sqlx_history(&sql, channel_id, before, viewer, parent)
            .await?;
        rows.iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|r| MessageRow::from_row(r).map_err(StoreError::from))
            .collect()
    }

    /// Through the rusqlite history readers, or sqlx for an in-memory database.
    async fn list_messages_encoded(
        &self,
        (tenant, user): (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
        write_row: RowWriter,
    ) -> StoreResult<EncodedRows> {
        let before = before_sequence.unwrap_or(i64::MAX);
        let sql = history_sql(parent.is_some(), limit);
        let Some(history) = &self.history else {
            let rows = self
                .sqlx_history(&sql, channel_id, before, (tenant, user), parent)
                .await?;
            return EncodedRows::of_rows(&rows, limit, write_row, SqlxRow);
        };
        let binds = HistoryBinds::new(channel_id, user, tenant, parent);
        let limit = usize::try_from(limit).unwrap_or(0);
        history
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(&sql).map_err(read::store_error)?;
                let mut rows = stmt
                    .query(binds.params(&before).as_slice())
                    .map_err(read::store_error)?;
                let mut page = EncodedRows::default();
                while page.len() < limit {
                    let Some(row) = rows.next().map_err(read::store_error)? else {
                        break;
                    };
                    page.push(write_row, row)?;
                }
                Ok(page)
            })
            .await
    }

    async fn count_messages(&self, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE channel_id = $1 AND delete_time IS NULL",
        )
        .bind(channel_id)
        .fetch_one(&self.read)
        .await?)
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

    async fn recipient_rows(&self, msg: &MessageRow) -> StoreResult<Vec<(String, i64, bool)>> {
        Ok(sqlx::query_as(
            "SELECT m.user_id, m.read_sequence, EXISTS (SELECT 1 FROM favorites f \
             WHERE f.message_id = $2 AND f.user_id = m.user_id) \
             FROM members m WHERE m.channel_id = $1 ORDER BY m.join_time, m.user_id",
        )
        .bind(&msg.channel_id)
        .bind(&msg.id)
        .fetch_all(&self.read)
        .await?)
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
             AND ($2 IS NULL OR a.message_id = $2) AND ($3 IS NULL OR a.id < $3) \
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

    async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow> {
        sqlx::query_as("SELECT * FROM uploads WHERE id = $1 AND tenant_id = $2")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.write)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT storage_key FROM upload_chunks WHERE upload_id = $1 ORDER BY byte_offset",
        )
        .bind(id)
        .fetch_all(&self.write)
        .await?)
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
        Ok(
            sqlx::query_as("SELECT * FROM uploads WHERE create_time < $1 LIMIT $2")
                .bind(before)
                .bind(limit)
                .fetch_all(&self.read)
                .await?,
        )
    }

    async fn insert_download(&self, row: &DownloadRow) -> StoreResult<()> {
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
        sqlx::query(
            "UPDATE attachment_downloads SET bytes_sent = $2, completed = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(bytes_sent)
        .bind(i64::from(completed))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn list_downloads(
        &self,
        attachment_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DownloadRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM attachment_downloads WHERE attachment_id = $1 \
             AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(attachment_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}
