//! MySQL 8.0+ and MariaDB 10.6+: a pool for writes and one for reads, InnoDB row locks on
//! `channels` ordering each channel's writes, as on PostgreSQL.
//!
//! What differs from the other two, and why:
//! - `?` placeholders, bound in text order (a value used twice is bound twice);
//! - no `RETURNING` on UPDATE (MariaDB has it on INSERT and DELETE only, MySQL nowhere): a
//!   change is followed by a read of the row, inside the transaction that holds its lock;
//! - every session runs at READ COMMITTED (set on connect), so a statement after a lock wait
//!   sees what committed meanwhile, as on PostgreSQL: at InnoDB's default REPEATABLE READ the
//!   membership check after a channel's lock would read the snapshot of the transaction's
//!   first read. It also takes no gap locks, which keeps concurrent inserts from deadlocking;
//! - the connection's character set is `utf8mb4` with the byte-exact `utf8mb4_bin`
//!   collation, as every table's (migrations/mysql), and the session adds
//!   `STRICT_ALL_TABLES` to `sql_mode`: a value too long for its column is an error, never
//!   truncated (the API refuses such values before, with the same limits as elsewhere);
//! - sqlx connects with `CLIENT_FOUND_ROWS`, so `rows_affected` counts matched rows, as the
//!   other databases do, also when an UPDATE changes nothing.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{Executor, Transaction};

use super::backend::Backend;
use super::batch::{self, Grouped};
use super::*;

mod rows;

/// MySQL / MariaDB error numbers (<https://dev.mysql.com/doc/mysql-errors/8.0/en/>,
/// <https://mariadb.com/kb/en/mariadb-error-codes/>) that mean storage trouble: 2006 / 2013
/// (server gone away, connection lost), 1040 / 1203 (too many connections), 1053 (server
/// shutting down), 1927 (connection killed), 1021 (disk full), 1114 (table full), 1030 (the
/// storage engine failed), 1158-1161 (network read or write failed), 1290 / 1836 / 1792
/// (read-only server or transaction), 1317 (query interrupted), 3024 / 1969 (statement time
/// limit, MySQL's / MariaDB's),
/// 4031 (idle session closed by the server).
pub fn mysql_unavailable(code: u16) -> bool {
    matches!(
        code,
        2006 | 2013 | 1040 | 1203 | 1053 | 1927 | 1021 | 1114 | 1030 | 1158
            ..=1161 | 1290 | 1836 | 1792 | 1317 | 3024 | 4031
    )
}

/// Error numbers that mean the transaction lost a race and can run again at once: 1213
/// (deadlock: InnoDB rolled the transaction back), 1205 (lock wait timeout), 1615 (prepared
/// statement needs re-preparing: a table changed under it).
pub fn mysql_retryable(code: u16) -> bool {
    matches!(code, 1213 | 1205 | 1615)
}

/// The error a MySQL error number becomes; `None`: a bug or a broken schema.
pub(super) fn error_kind(code: u16) -> Option<fn(String) -> StoreError> {
    if mysql_retryable(code) {
        Some(StoreError::Retry)
    } else if mysql_unavailable(code) {
        Some(StoreError::Unavailable)
    } else {
        None
    }
}

/// The store on a MySQL or MariaDB database.
#[derive(Clone, Debug)]
pub struct MySqlStore {
    write: MySqlPool,
    read: MySqlPool,
}

/// Session settings of every connection (see the module page).
///
/// The lock wait is cut from InnoDB's 50 s to 10 s: a group commit that times out (1205) is
/// retried up to 4 times, and its senders wait meanwhile.
const SESSION_SETUP: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
     SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES'); \
     SET SESSION innodb_lock_wait_timeout = 10";

impl MySqlStore {
    /// Connects (`mysql://` or `mariadb://` URL) and migrates unless `migrate` is false.
    /// Errors as [`super::connect`].
    pub async fn connect(url: &str, migrate: bool) -> StoreResult<Arc<MySqlStore>> {
        let url = url
            .strip_prefix("mariadb:")
            .map_or_else(|| url.to_owned(), |rest| format!("mysql:{rest}"));
        let opts = MySqlConnectOptions::from_str(&url)?
            .charset("utf8mb4")
            .collation("utf8mb4_bin");
        let pool = |max: u32| {
            MySqlPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(SESSION_SETUP).await?;
                        Ok(())
                    })
                })
        };
        let write = pool(16).connect_with(opts.clone()).await?;
        if migrate {
            super::migrate(sqlx::migrate!("migrations/mysql"), &write).await?;
        }
        let read = pool(32).connect_with(opts).await?;
        let store = Arc::new(MySqlStore { write, read });
        watch_pools(&store, |s| {
            [pool_sample("write", &s.write), pool_sample("read", &s.read)]
        });
        Ok(store)
    }

    /// The rows of a history query, on the read pool (binds as [`history_sql`] orders them).
    async fn history(
        &self,
        sql: &str,
        channel_id: &str,
        before: i64,
        (tenant, user): (&str, &str),
        parent: Option<&str>,
    ) -> StoreResult<Vec<sqlx::mysql::MySqlRow>> {
        let mut query = sqlx::query(sql).bind(channel_id);
        if let Some(parent) = parent {
            query = query.bind(parent);
        }
        Ok(query
            .bind(before)
            .bind(channel_id)
            .bind(user)
            .bind(tenant)
            .fetch_all(&self.read)
            .await?)
    }

    /// The group commit in one transaction: lock the channels in id order and read their
    /// sequences, read memberships and stored keys, set the channels' new last sequences,
    /// insert (in power-of-two chunks: sqlx prepares each statement text once per
    /// connection), commit. Seven round trips, whatever the batch holds.
    async fn write_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        let grouped = Grouped::new(batch);
        let waited = std::time::Instant::now();
        let mut tx = self.write.begin().await?;
        crate::metrics::write_acquired(waited.elapsed());
        // Row locks in the primary key's order (utf8mb4_bin: bytewise, as the batch sorts
        // them; the index is forced so no plan can scan and lock other channels), so concurrent batches never wait on each other in a cycle. Lists are padded
        // to a power of two with values that match nothing (ids are never empty).
        let ids = grouped.channel_ids();
        let mut q = sqlx::QueryBuilder::<MySql>::new(
            "SELECT id, tenant_id, last_sequence FROM channels FORCE INDEX (PRIMARY) WHERE id IN (",
        );
        let mut list = q.separated(", ");
        for i in 0..ids.len().next_power_of_two() {
            list.push_bind(ids.get(i).copied().unwrap_or(""));
        }
        q.push(") AND delete_time IS NULL ORDER BY id FOR UPDATE");
        let locked: Vec<(String, String, i64)> = q
            .build()
            .try_map(rows::text_text_int)
            .fetch_all(&mut *tx)
            .await?;
        // After the locks: at READ COMMITTED these see every change committed while waiting.
        let mut q = sqlx::QueryBuilder::<MySql>::new(
            "SELECT channel_id, user_id FROM members WHERE (channel_id, user_id) IN (",
        );
        batch::push_padded_rows(&mut q, &grouped.member_pairs(), ("", ""), |q, (c, u)| {
            q.push_bind(c).push(", ").push_bind(u);
        });
        q.push(")");
        let members: Vec<(String, String)> = q
            .build()
            .try_map(rows::text_text)
            .fetch_all(&mut *tx)
            .await?;
        let keys = grouped.keys();
        let stored_rows: Vec<MessageRow> = if keys.is_empty() {
            Vec::new()
        } else {
            let mut q = sqlx::QueryBuilder::<MySql>::new(
                "SELECT * FROM messages WHERE (channel_id, sender_id, client_message_id) IN (",
            );
            batch::push_padded_rows(&mut q, &keys, ("", "", ""), |q, (c, u, k)| {
                q.push_bind(c)
                    .push(", ")
                    .push_bind(u)
                    .push(", ")
                    .push_bind(k);
            });
            q.push(")");
            q.build().try_map(rows::message).fetch_all(&mut *tx).await?
        };
        let plan = grouped.plan_from(&locked, false, &members, &stored_rows, enc);
        if plan.rows.is_empty() {
            tx.rollback().await?;
            return Ok(plan.committed());
        }
        // Every channel that takes messages moves to its new last sequence in one statement.
        let moved = plan.moved();
        let mut q = sqlx::QueryBuilder::<MySql>::new("UPDATE channels SET last_sequence = CASE id");
        for i in 0..moved.len().next_power_of_two() {
            let (id, last) = moved.get(i).copied().unwrap_or(("", 0));
            q.push(" WHEN ")
                .push_bind(id)
                .push(" THEN ")
                .push_bind(last);
        }
        q.push(" ELSE last_sequence END WHERE id IN (");
        let mut list = q.separated(", ");
        for i in 0..moved.len().next_power_of_two() {
            list.push_bind(moved.get(i).map_or("", |m| m.0));
        }
        q.push(")");
        q.build().execute(&mut *tx).await?;
        for range in batch::insert_chunks(&plan, true) {
            for table in batch::Insert::ALL {
                let mut q = sqlx::QueryBuilder::<MySql>::new("");
                batch::push_insert(&mut q, &plan, range.clone(), table);
                q.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(plan.committed())
    }
}

/// The text of a history query that selects [`MESSAGE_COLUMNS`] for `limit` rows or a few
/// more (see [`history_fetch_limit`]). Binds, in order: channel, the thread's parent when
/// `thread`, before, channel, user, tenant. It returns rows only to a member of the live
/// channel (a constant sub-query, evaluated once per statement).
///
/// The index is forced. Left to itself, MariaDB 10.11 picks a `ref` scan on the channel id
/// alone (key_len 146, not the range on `(channel_id, sequence)`) whenever its estimate of the
/// rows below `before` is a large share of the table, and then walks the index backwards from
/// the channel's newest message, filtering on `sequence < ?`: on a 1,000,000-message channel a
/// page 100,000 messages back read 100,051 index entries and rows (Handler_read_prev) and took
/// 330 ms, a page half-way back 500,051. With the hint it is a range scan that reads the 50
/// (or 51) rows it returns, wherever the page is (0.1 ms). The hint names the index each
/// variant's keyset walk needs: `messages_by_thread` for a thread.
fn history_sql(thread: bool, limit: i64) -> String {
    let (index, thread) = if thread {
        ("messages_by_thread", "AND parent_message_id = ? ")
    } else {
        ("messages_by_sequence", "")
    };
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages FORCE INDEX ({index}) \
         WHERE channel_id = ? {thread}AND sequence < ? \
         AND delete_time IS NULL AND EXISTS (SELECT 1 FROM members mb \
         JOIN channels c ON c.id = mb.channel_id WHERE mb.channel_id = ? AND mb.user_id = ? \
         AND mb.tenant_id = ? AND c.delete_time IS NULL) \
         ORDER BY sequence DESC LIMIT {}",
        history_fetch_limit(limit)
    )
}

/// Deletes the attachment row read (and locked) just before, if there was one; returns it.
async fn delete_locked_attachment(
    tx: &mut Transaction<'static, MySql>,
    row: Option<AttachmentRow>,
) -> StoreResult<Option<AttachmentRow>> {
    if let Some(row) = &row {
        sqlx::query("DELETE FROM attachments WHERE id = ?")
            .bind(&row.id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(row)
}

/// Appends `ids` as the `IN (…)` list of `q` and closes it, padded to a power of two with ids
/// that match nothing (ids are never empty): at most 1,024 binds for 1,000 ids, so a handful
/// of statement texts are prepared, not one per count.
fn push_padded_ids<'a>(q: &mut sqlx::QueryBuilder<'a, MySql>, ids: &'a [String]) {
    let mut list = q.separated(", ");
    for i in 0..ids.len().next_power_of_two() {
        list.push_bind(ids.get(i).map_or("", String::as_str));
    }
    q.push(")");
}

#[async_trait]
impl Backend for MySqlStore {
    type Tx = Transaction<'static, MySql>;

    async fn begin(&self) -> StoreResult<Self::Tx> {
        Ok(self.write.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.rollback().await?)
    }

    /// A row lock on the uploader's row of `upload_locks` (made on first use), held until the
    /// transaction ends.
    async fn begin_upload(&self, tenant: &str, uploader: &str) -> StoreResult<Self::Tx> {
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "INSERT INTO upload_locks (tenant_id, uploader_id) VALUES (?, ?) \
             ON DUPLICATE KEY UPDATE uploader_id = uploader_id",
        )
        .bind(tenant)
        .bind(uploader)
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }

    async fn bump(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
        n: i64,
    ) -> StoreResult<i64> {
        let matched = sqlx::query(
            "UPDATE channels SET last_sequence = last_sequence + ? \
             WHERE id = ? AND tenant_id = ? AND delete_time IS NULL",
        )
        .bind(n)
        .bind(channel_id)
        .bind(tenant)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if matched != 1 {
            return Err(StoreError::NotFound);
        }
        Ok(
            sqlx::query_scalar("SELECT last_sequence FROM channels WHERE id = ?")
                .bind(channel_id)
                .fetch_one(&mut **tx)
                .await?,
        )
    }

    async fn lock_channel(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<()> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT last_sequence FROM channels WHERE id = ? AND tenant_id = ? \
             AND delete_time IS NULL FOR UPDATE",
        )
        .bind(channel_id)
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await?;
        found.map(|_| ()).ok_or(StoreError::NotFound)
    }

    async fn insert_channel(&self, tx: &mut Self::Tx, channel: &ChannelRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO channels (id, tenant_id, kind, name, description, channel_type, \
             direct_key, last_sequence, create_time, update_time) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
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

    /// A plain INSERT: a duplicate `direct_key` fails the statement only (InnoDB keeps the
    /// transaction), and the flow rolls back. `INSERT IGNORE` would also hide other errors.
    async fn insert_direct_channel(
        &self,
        tx: &mut Self::Tx,
        channel: &ChannelRow,
    ) -> StoreResult<bool> {
        match self.insert_channel(tx, channel).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn channel_in(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<Option<ChannelRow>> {
        Ok(sqlx::query(
            "SELECT * FROM channels WHERE id = ? AND tenant_id = ? AND delete_time IS NULL",
        )
        .bind(channel_id)
        .bind(tenant)
        .try_map(rows::channel)
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
        sqlx::query(
            "UPDATE channels SET name = COALESCE(?, name), \
             description = COALESCE(?, description), \
             channel_type = COALESCE(?, channel_type), update_time = ? WHERE id = ?",
        )
        .bind(&patch.name)
        .bind(&patch.description)
        .bind(&patch.channel_type)
        .bind(update_time)
        .bind(channel_id)
        .execute(&mut **tx)
        .await?;
        Ok(sqlx::query("SELECT * FROM channels WHERE id = ?")
            .bind(channel_id)
            .try_map(rows::channel)
            .fetch_one(&mut **tx)
            .await?)
    }

    async fn mark_channel_deleted(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        delete_time: i64,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE channels SET delete_time = ? WHERE id = ?")
            .bind(delete_time)
            .bind(channel_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn find_direct(&self, tenant: &str, direct_key: &str) -> StoreResult<Option<ChannelRow>> {
        Ok(sqlx::query(
            "SELECT * FROM channels WHERE direct_key = ? AND tenant_id = ? \
             AND delete_time IS NULL",
        )
        .bind(direct_key)
        .bind(tenant)
        .try_map(rows::channel)
        .fetch_optional(&self.write)
        .await?)
    }

    async fn members_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<Vec<MemberRow>> {
        Ok(
            sqlx::query("SELECT * FROM members WHERE channel_id = ? ORDER BY join_time, user_id")
                .bind(channel_id)
                .try_map(rows::member)
                .fetch_all(&mut **tx)
                .await?,
        )
    }

    async fn member_in(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>> {
        Ok(
            sqlx::query("SELECT * FROM members WHERE channel_id = ? AND user_id = ?")
                .bind(channel_id)
                .bind(user)
                .try_map(rows::member)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn owners_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM members WHERE channel_id = ? AND role = 'owner'",
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
             join_sequence, read_sequence) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        sqlx::query("DELETE FROM members WHERE channel_id = ? AND user_id = ?")
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
        sqlx::query("UPDATE members SET role = ? WHERE channel_id = ? AND user_id = ?")
            .bind(role.as_str())
            .bind(channel_id)
            .bind(user)
            .execute(&mut **tx)
            .await?;
        self.member_in(tx, channel_id, user)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn insert_event(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        sequence: i64,
        payload: &[u8],
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO events (channel_id, sequence, payload) VALUES (?, ?, ?)")
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        Ok(sqlx::query(
            "SELECT * FROM messages WHERE channel_id = ? AND sender_id = ? \
             AND client_message_id = ?",
        )
        .bind(channel_id)
        .bind(sender)
        .bind(client_message_id)
        .try_map(rows::message)
        .fetch_optional(&self.write)
        .await?)
    }

    async fn insert_message_row(&self, tx: &mut Self::Tx, row: &MessageRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, channel_id, sender_id, body, subject, \
             parent_message_id, attachment_ids, client_message_id, \
             forwarded_from_message_id, sequence, version, create_time) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            "UPDATE attachments SET message_id = ? WHERE id = ? AND channel_id = ? \
             AND uploader_id = ? AND tenant_id = ? AND message_id IS NULL",
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
            sqlx::query("SELECT channel_id FROM messages WHERE id = ? AND tenant_id = ?")
                .bind(message_id)
                .bind(tenant)
                .try_map(rows::text0)
                .fetch_optional(&mut **tx)
                .await?,
        )
    }

    async fn message_in(&self, tx: &mut Self::Tx, message_id: &str) -> StoreResult<MessageRow> {
        Ok(sqlx::query("SELECT * FROM messages WHERE id = ?")
            .bind(message_id)
            .try_map(rows::message)
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
        sqlx::query(
            "UPDATE messages SET body = COALESCE(?, body), subject = COALESCE(?, subject), \
             version = version + 1, update_time = ? WHERE id = ?",
        )
        .bind(body)
        .bind(subject)
        .bind(update_time)
        .bind(message_id)
        .execute(&mut **tx)
        .await?;
        self.message_in(tx, message_id).await
    }

    async fn delete_message_row(
        &self,
        tx: &mut Self::Tx,
        message_id: &str,
        delete_time: i64,
        deleted_by: &str,
    ) -> StoreResult<MessageRow> {
        sqlx::query(
            "UPDATE messages SET version = version + 1, delete_time = ?, deleted_by = ? \
             WHERE id = ?",
        )
        .bind(delete_time)
        .bind(deleted_by)
        .bind(message_id)
        .execute(&mut **tx)
        .await?;
        self.message_in(tx, message_id).await
    }

    async fn insert_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        self.write_batch(batch, enc).await
    }

    /// Batches in flight at once, each for its own share of the channels, as on PostgreSQL:
    /// while one waits for its commit (the redo log flush), another gathers its statements.
    /// One per core: on the 2-core bench box 8 workers did fewer sends at 16 senders than 2
    /// (2.1k/s against 3.3k/s; smaller batches, more MariaDB CPU per send; BENCHMARKS.md).
    fn write_concurrency(&self) -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 16))
    }

    /// Not counted: every batch takes the one path.
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
            "UPDATE members SET read_sequence = ? \
             WHERE channel_id = ? AND user_id = ? AND read_sequence < ?",
        )
        .bind(sequence)
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
            "SELECT read_sequence FROM members WHERE channel_id = ? AND user_id = ?",
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
             VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
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
        let row: Option<AttachmentRow> =
            sqlx::query("SELECT * FROM attachments WHERE id = ? AND tenant_id = ? FOR UPDATE")
                .bind(id)
                .bind(tenant)
                .try_map(rows::attachment)
                .fetch_optional(&mut **tx)
                .await?;
        delete_locked_attachment(tx, row).await
    }

    async fn delete_swept_attachment(
        &self,
        tx: &mut Self::Tx,
        id: &str,
    ) -> StoreResult<Option<AttachmentRow>> {
        let row: Option<AttachmentRow> = sqlx::query(
            "SELECT * FROM attachments WHERE id = ? AND (message_id IS NULL \
             OR channel_id IN (SELECT id FROM channels WHERE delete_time IS NOT NULL)) \
             FOR UPDATE",
        )
        .bind(id)
        .try_map(rows::attachment)
        .fetch_optional(&mut **tx)
        .await?;
        delete_locked_attachment(tx, row).await
    }

    async fn open_uploads(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        uploader: &str,
    ) -> StoreResult<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size_bytes), 0) AS SIGNED) FROM uploads \
             WHERE tenant_id = ? AND uploader_id = ?",
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
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
            "UPDATE uploads SET committed_bytes = ? WHERE id = ? AND committed_bytes = ?",
        )
        .bind(to)
        .bind(id)
        .bind(from)
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
            "INSERT INTO upload_chunks (upload_id, byte_offset, storage_key) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(offset)
        .bind(key)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn delete_upload_row(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM uploads WHERE id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn delete_chunks(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM upload_chunks WHERE upload_id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn channel(&self, tenant: &str, channel_id: &str) -> StoreResult<ChannelRow> {
        sqlx::query("SELECT * FROM channels WHERE id = ? AND tenant_id = ? AND delete_time IS NULL")
            .bind(channel_id)
            .bind(tenant)
            .try_map(rows::channel)
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
        Ok(sqlx::query(
            "SELECT c.* FROM channels c JOIN members m ON m.channel_id = c.id \
             WHERE m.tenant_id = ? AND m.user_id = ? AND c.delete_time IS NULL \
             AND (? IS NULL OR c.id < ?) ORDER BY c.id DESC LIMIT ?",
        )
        .bind(tenant)
        .bind(user)
        .bind(before)
        .bind(before)
        .bind(limit)
        .try_map(rows::channel)
        .fetch_all(&self.read)
        .await?)
    }

    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>> {
        Ok(sqlx::query(
            "SELECT m.* FROM members m JOIN channels c ON c.id = m.channel_id \
             WHERE m.channel_id = ? AND m.user_id = ? AND m.tenant_id = ? \
             AND c.delete_time IS NULL",
        )
        .bind(channel_id)
        .bind(user)
        .bind(tenant)
        .try_map(rows::member)
        .fetch_optional(&self.read)
        .await?)
    }

    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        if channel_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = sqlx::QueryBuilder::<MySql>::new(
            "SELECT id, tenant_id, last_sequence FROM channels WHERE id IN (",
        );
        push_padded_ids(&mut q, channel_ids);
        Ok(q.build()
            .try_map(rows::text_text_int)
            .fetch_all(&self.read)
            .await?)
    }

    async fn channel_heads(
        &self,
        tenant: &str,
        user: &str,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, i64)>> {
        if channel_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = sqlx::QueryBuilder::<MySql>::new(
            "SELECT c.id, c.last_sequence FROM channels c JOIN members m ON m.channel_id = c.id \
             WHERE m.tenant_id = ",
        );
        q.push_bind(tenant)
            .push(" AND m.user_id = ")
            .push_bind(user)
            .push(" AND c.delete_time IS NULL AND c.id IN (");
        push_padded_ids(&mut q, channel_ids);
        Ok(q.build()
            .try_map(rows::text_int)
            .fetch_all(&self.read)
            .await?)
    }

    async fn member_rows_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<MemberRow>> {
        Ok(
            sqlx::query("SELECT * FROM members WHERE tenant_id = ? AND user_id = ?")
                .bind(tenant)
                .bind(user)
                .try_map(rows::member)
                .fetch_all(&self.read)
                .await?,
        )
    }

    async fn channels_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<ChannelRow>> {
        Ok(sqlx::query(
            "SELECT c.* FROM channels c JOIN members m ON m.channel_id = c.id \
             WHERE m.tenant_id = ? AND m.user_id = ? AND c.delete_time IS NULL",
        )
        .bind(tenant)
        .bind(user)
        .try_map(rows::channel)
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
        Ok(sqlx::query(
            "SELECT * FROM members WHERE channel_id = ? \
             AND (join_time > ? OR (join_time = ? AND user_id > ?)) \
             ORDER BY join_time, user_id LIMIT ?",
        )
        .bind(channel_id)
        .bind(t)
        .bind(t)
        .bind(u)
        .bind(limit)
        .try_map(rows::member)
        .fetch_all(&self.read)
        .await?)
    }

    async fn owner_count(&self, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM members WHERE channel_id = ? AND role = 'owner'",
        )
        .bind(channel_id)
        .fetch_one(&self.read)
        .await?)
    }

    async fn message(&self, tenant: &str, message_id: &str) -> StoreResult<MessageRow> {
        sqlx::query("SELECT * FROM messages WHERE id = ? AND tenant_id = ?")
            .bind(message_id)
            .bind(tenant)
            .try_map(rows::message)
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
        let found = self
            .history(&sql, channel_id, before, viewer, parent)
            .await?;
        found
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|r| rows::message(r).map_err(StoreError::from))
            .collect()
    }

    async fn list_messages_encoded(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
        write_row: RowWriter,
    ) -> StoreResult<EncodedRows> {
        let before = before_sequence.unwrap_or(i64::MAX);
        let sql = history_sql(parent.is_some(), limit);
        let found = self
            .history(&sql, channel_id, before, viewer, parent)
            .await?;
        EncodedRows::of_rows(&found, limit, write_row, rows::HistoryRow)
    }

    async fn count_messages(&self, channel_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE channel_id = ? AND delete_time IS NULL",
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
                 VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE create_time = create_time",
            )
            .bind(tenant)
            .bind(user)
            .bind(message_id)
            .bind(now_micros())
            .execute(&self.write)
            .await?;
        } else {
            sqlx::query("DELETE FROM favorites WHERE message_id = ? AND user_id = ?")
                .bind(message_id)
                .bind(user)
                .execute(&self.write)
                .await?;
        }
        Ok(())
    }

    async fn recipient_rows(&self, msg: &MessageRow) -> StoreResult<Vec<(String, i64, bool)>> {
        let rows: Vec<(String, i64, i64)> = sqlx::query(
            "SELECT m.user_id, m.read_sequence, CAST(EXISTS (SELECT 1 FROM favorites f \
             WHERE f.message_id = ? AND f.user_id = m.user_id) AS SIGNED) \
             FROM members m WHERE m.channel_id = ? ORDER BY m.join_time, m.user_id",
        )
        .bind(&msg.id)
        .bind(&msg.channel_id)
        .try_map(rows::text_int_int)
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user, read, favorite)| (user, read, favorite != 0))
            .collect())
    }

    /// A count per membership in a sub-query, not a join: MariaDB 10.11 planned the join's
    /// `msg.sequence > m.read_sequence` as a filter over the whole channel (200,001 index
    /// rows read for 10 unread in a 200k-message channel), the sub-query as a range on
    /// `(channel_id, sequence)` (11 rows).
    async fn unread_counts(&self, tenant: &str, user: &str) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query(
            "SELECT m.channel_id, (SELECT COUNT(*) FROM messages msg \
             WHERE msg.channel_id = m.channel_id AND msg.sequence > m.read_sequence \
             AND msg.sender_id <> m.user_id AND msg.delete_time IS NULL) \
             FROM members m WHERE m.tenant_id = ? AND m.user_id = ? ORDER BY m.channel_id",
        )
        .bind(tenant)
        .bind(user)
        .try_map(rows::text_int)
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
        Ok(sqlx::query(
            "SELECT * FROM events WHERE channel_id = ? AND sequence > ? \
             AND sequence <= ? ORDER BY sequence LIMIT ?",
        )
        .bind(channel_id)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .try_map(rows::event)
        .fetch_all(&self.read)
        .await?)
    }

    async fn attachment(&self, tenant: &str, id: &str) -> StoreResult<AttachmentRow> {
        sqlx::query("SELECT * FROM attachments WHERE id = ? AND tenant_id = ?")
            .bind(id)
            .bind(tenant)
            .try_map(rows::attachment)
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
        Ok(sqlx::query(
            "SELECT a.* FROM attachments a WHERE a.channel_id = ? \
             AND (? IS NULL OR a.message_id = ?) AND (? IS NULL OR a.id < ?) \
             AND ((a.message_id IS NULL AND a.uploader_id = ?) OR EXISTS (\
                 SELECT 1 FROM messages m WHERE m.id = a.message_id AND m.delete_time IS NULL)) \
             ORDER BY a.id DESC LIMIT ?",
        )
        .bind(channel_id)
        .bind(message_id)
        .bind(message_id)
        .bind(before)
        .bind(before)
        .bind(viewer)
        .bind(limit)
        .try_map(rows::attachment)
        .fetch_all(&self.read)
        .await?)
    }

    async fn unlinked_before(&self, before: i64, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
        Ok(sqlx::query(
            "SELECT * FROM attachments WHERE message_id IS NULL AND create_time < ? LIMIT ?",
        )
        .bind(before)
        .bind(limit)
        .try_map(rows::attachment)
        .fetch_all(&self.read)
        .await?)
    }

    async fn attachments_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
        Ok(sqlx::query(
            "SELECT a.* FROM channels c JOIN attachments a ON a.channel_id = c.id \
             WHERE c.delete_time IS NOT NULL LIMIT ?",
        )
        .bind(limit)
        .try_map(rows::attachment)
        .fetch_all(&self.read)
        .await?)
    }

    async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow> {
        sqlx::query("SELECT * FROM uploads WHERE id = ? AND tenant_id = ?")
            .bind(id)
            .bind(tenant)
            .try_map(rows::upload)
            .fetch_optional(&self.write)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query(
            "SELECT storage_key FROM upload_chunks WHERE upload_id = ? ORDER BY byte_offset",
        )
        .bind(id)
        .try_map(rows::text0)
        .fetch_all(&self.write)
        .await?)
    }

    async fn uploads_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<UploadRow>> {
        Ok(sqlx::query(
            "SELECT u.* FROM channels c JOIN uploads u ON u.channel_id = c.id \
             WHERE c.delete_time IS NOT NULL LIMIT ?",
        )
        .bind(limit)
        .try_map(rows::upload)
        .fetch_all(&self.read)
        .await?)
    }

    async fn uploads_before(&self, before: i64, limit: i64) -> StoreResult<Vec<UploadRow>> {
        Ok(
            sqlx::query("SELECT * FROM uploads WHERE create_time < ? LIMIT ?")
                .bind(before)
                .bind(limit)
                .try_map(rows::upload)
                .fetch_all(&self.read)
                .await?,
        )
    }

    async fn insert_download(&self, row: &DownloadRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO attachment_downloads (id, tenant_id, attachment_id, user_id, \
             download_time, bytes_sent, completed) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        sqlx::query("UPDATE attachment_downloads SET bytes_sent = ?, completed = ? WHERE id = ?")
            .bind(bytes_sent)
            .bind(i64::from(completed))
            .bind(id)
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
        Ok(sqlx::query(
            "SELECT * FROM attachment_downloads WHERE attachment_id = ? \
             AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(attachment_id)
        .bind(before)
        .bind(before)
        .bind(limit)
        .try_map(rows::download)
        .fetch_all(&self.read)
        .await?)
    }

    async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}
