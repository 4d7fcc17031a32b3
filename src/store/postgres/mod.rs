//! PostgreSQL: a pool for writes and one for reads (so history readers never hold up a
//! commit); the channel row's lock (`FOR NO KEY UPDATE`, taken by the UPDATE that bumps its
//! sequence) orders each channel's writes. Statements use `$n` placeholders, `RETURNING`,
//! `ON CONFLICT` and `UPDATE … FROM (VALUES …)`. Group commits go in one round trip through
//! `chat_append_messages` (migration 0003) when the store knows its channels' sequences, and
//! through the general path otherwise.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{FromRow, Postgres, Transaction};

use super::backend::Backend;
use super::batch::{self, BatchPlan, Grouped};
use super::*;

/// PostgreSQL SQLSTATEs (<https://www.postgresql.org/docs/current/errcodes-appendix.html>)
/// that mean storage trouble: class 08 (connection exception), 53 (insufficient resources:
/// disk full 53100, out of memory 53200, too many connections 53300), 58 (system error: I/O
/// 58030), 57P0x (shutting down, cannot connect now), 57014 (statement cancelled),
/// 25006 (read-only transaction: a standby, or a primary turned read-only), 40001 / 40P01
/// (serialization failure, deadlock: see [`error_kind`]).
pub fn postgres_unavailable(sqlstate: &str) -> bool {
    ["08", "53", "58", "57P0"]
        .iter()
        .any(|class| sqlstate.starts_with(class))
        || matches!(sqlstate, "57014" | "25006" | "40001" | "40P01")
}

/// The error a SQLSTATE becomes: `Retry` for a serialization failure (40001) or a deadlock
/// (40P01), where the transaction lost a race and can run again at once; `Unavailable` for
/// the rest of [`postgres_unavailable`]; `None`: a bug.
pub(super) fn error_kind(sqlstate: &str) -> Option<fn(String) -> StoreError> {
    if matches!(sqlstate, "40001" | "40P01") {
        Some(StoreError::Retry)
    } else if postgres_unavailable(sqlstate) {
        Some(StoreError::Unavailable)
    } else {
        None
    }
}

/// Channels whose last sequence the store has last written, as a hint for the next batch
/// (every write re-checks it under lock). Forgotten wholesale past this many channels.
const KNOWN_SEQUENCES: usize = 65_536;

/// The store on a PostgreSQL database (one schema of it).
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
    /// Connects (with `search_path` set to `schema` when given) and migrates unless `migrate`
    /// is false. Errors as [`super::connect`].
    pub async fn connect(
        url: &str,
        schema: Option<&str>,
        migrate: bool,
    ) -> StoreResult<Arc<PostgresStore>> {
        let mut opts = PgConnectOptions::from_str(url)?;
        if let Some(schema) = schema {
            opts = opts.options([("search_path", schema)]);
        }
        let write = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await?;
        if migrate {
            super::migrate(sqlx::migrate!("migrations/postgres"), &write).await?;
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

    /// The rows of a history query, on the read pool.
    async fn history(
        &self,
        sql: &str,
        channel_id: &str,
        before: i64,
        (tenant, user): (&str, &str),
        parent: Option<&str>,
    ) -> StoreResult<Vec<sqlx::postgres::PgRow>> {
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

/// Binds $1-$16 of `chat_append_messages`: the rows as parallel arrays, each channel's new
/// last sequence, the create time.
fn bind_plan<'q, O>(
    plan: &'q BatchPlan<'_>,
    q: sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments>,
) -> sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments> {
    let rows = &plan.rows;
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
        .bind(&plan.payloads)
        .bind(
            plan.audits
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<&str>>(),
        )
        .bind(
            plan.audits
                .iter()
                .map(|(_, j)| j.as_deref())
                .collect::<Vec<Option<&str>>>(),
        )
        .bind(plan.channels.iter().map(|c| c.0).collect::<Vec<&str>>())
        .bind(plan.channels.iter().map(|c| c.3).collect::<Vec<i64>>())
        .bind(plan.now)
}

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
    async fn write_batch_in_one_call(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Option<Vec<StoreResult<Inserted>>>> {
        let grouped = Grouped::new(batch);
        let mut last_of: HashMap<(&str, &str), i64> = HashMap::new();
        let mut unknown: Vec<&str> = Vec::new();
        {
            let known = self.known();
            for &(c, t) in grouped.by_channel.keys() {
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
            if let Some((&(c, t), _)) = grouped.by_channel.get_key_value(&(c.as_str(), t.as_str()))
            {
                last_of.insert((c, t), *last);
            }
        }
        // Assumed here, checked by the function under the locks.
        let plan = grouped.plan(&last_of, |_, _| true, &HashMap::new(), enc);
        if plan.rows.is_empty() {
            return Ok(Some(plan.committed()));
        }
        let status = bind_plan(
            &plan,
            sqlx::query_scalar::<_, i32>(
                "SELECT chat_append_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
                 $12, $13, $14, $15, $16, $17, $18)",
            ),
        )
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

    /// The general group commit, one statement per round trip in one transaction: lock the
    /// channels in id order, advance them, read memberships and stored keys, give back the
    /// sequences of refused messages, insert (in power-of-two chunks, so every statement text
    /// is prepared once; a new text per batch size showed as parse time in PostgreSQL's
    /// profile), commit.
    async fn write_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        let grouped = Grouped::new(batch);
        let waited = std::time::Instant::now();
        let mut tx = self.write.begin().await?;
        // Includes the BEGIN's round trip (sqlx sends it on acquiring).
        crate::metrics::write_acquired(waited.elapsed());
        // Concurrent batches take their channels' row locks in id order, so they never wait
        // on each other in a cycle (workers own disjoint channels, but another server process
        // sharing the database does not know which). NO KEY, like the UPDATE that follows, so
        // inserts that only reference a channel are not held up; bytewise order, as the batch
        // lists them and chat_append_messages takes them, whatever the database's collation.
        // Each list is padded to a power of two with rows that match nothing.
        let ids = grouped.channel_ids();
        let mut q = sqlx::QueryBuilder::<Postgres>::new("SELECT id FROM channels WHERE id IN (");
        let mut list = q.separated(", ");
        for i in 0..ids.len().next_power_of_two() {
            list.push_bind(ids.get(i).copied().unwrap_or(""));
        }
        q.push(") ORDER BY id COLLATE \"C\" FOR NO KEY UPDATE");
        q.build().fetch_all(&mut *tx).await?;
        // Every channel moves on by its count of messages; RETURNING gives the new last.
        let counts = grouped.counts();
        let mut q = sqlx::QueryBuilder::<Postgres>::new(
            "UPDATE channels SET last_sequence = channels.last_sequence + d.column3 FROM (VALUES ",
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
             AND channels.delete_time IS NULL \
             RETURNING channels.id, channels.tenant_id, channels.last_sequence",
        );
        let advanced: Vec<(String, String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        // Membership in a statement of its own, after the locks: on READ COMMITTED a check
        // inside the UPDATE (a sub-select) would keep the snapshot from before the lock wait
        // and miss a removal that committed meanwhile.
        let mut q =
            sqlx::QueryBuilder::<Postgres>::new("SELECT m.channel_id, m.user_id FROM (VALUES ");
        batch::push_padded_rows(&mut q, &grouped.member_pairs(), ("", ""), |q, (c, u)| {
            q.push_bind(c).push(", ").push_bind(u);
        });
        q.push(") AS d JOIN members m ON m.channel_id = d.column1 AND m.user_id = d.column2");
        let members: Vec<(String, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
        // Messages already stored under a key of this batch (under the channel locks nobody
        // else can insert one of these keys now).
        let keys = grouped.keys();
        let stored_rows: Vec<MessageRow> = if keys.is_empty() {
            Vec::new()
        } else {
            let mut q = sqlx::QueryBuilder::<Postgres>::new("SELECT m.* FROM (VALUES ");
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
            q.build_query_as().fetch_all(&mut *tx).await?
        };
        let plan = grouped.plan_from(&advanced, true, &members, &stored_rows, enc);
        for (channel, last) in plan.give_backs(&advanced) {
            // Some were refused: give back the sequences they would have taken.
            sqlx::query("UPDATE channels SET last_sequence = $1 WHERE id = $2")
                .bind(last)
                .bind(channel)
                .execute(&mut *tx)
                .await?;
        }
        for range in batch::insert_chunks(&plan, true) {
            for table in batch::Insert::ALL {
                let mut q = sqlx::QueryBuilder::<Postgres>::new("");
                batch::push_insert(&mut q, &plan, range.clone(), table);
                q.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        self.remember(plan.channels.iter().map(|&(c, t, _, last)| (c, t, last)));
        self.general.fetch_add(1, Ordering::Relaxed);
        Ok(plan.committed())
    }
}

#[async_trait]
impl Backend for PostgresStore {
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> StoreResult<Self::Tx> {
        Ok(self.write.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()> {
        Ok(tx.rollback().await?)
    }

    /// A transaction-level advisory lock on the uploader, held until the transaction ends.
    async fn begin_upload(&self, tenant: &str, uploader: &str) -> StoreResult<Self::Tx> {
        let mut tx = self.write.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("{tenant}\n{uploader}"))
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
        // An update that changes nothing still takes the row lock (FOR NO KEY UPDATE's), so
        // inserts that only reference the channel (foreign keys take KEY SHARE) go on.
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
        if let Some(out) = self.write_batch_in_one_call(batch, enc).await? {
            return Ok(out);
        }
        self.write_batch(batch, enc).await
    }

    /// Batches in flight at once, each for its own share of the channels: while one waits for
    /// its commit (the WAL flush), another gathers and sends its statements. One per core, 2
    /// to 16: on the 2-core bench box, 2 did 7.4k sends/s at 64 senders and 4 no more.
    fn write_concurrency(&self) -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 16))
    }

    fn commit_paths(&self) -> CommitPaths {
        CommitPaths {
            one_call: self.one_call.load(Ordering::Relaxed),
            general: self.general.load(Ordering::Relaxed),
        }
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

    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        Ok(
            sqlx::query_as("SELECT id, tenant_id, last_sequence FROM channels WHERE id = ANY($1)")
                .bind(channel_ids)
                .fetch_all(&self.read)
                .await?,
        )
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
             AND c.id IN (SELECT jsonb_array_elements_text(CAST($3 AS jsonb)))",
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
            .history(&sql, channel_id, before, viewer, parent)
            .await?;
        rows.iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .map(|r| MessageRow::from_row(r).map_err(StoreError::from))
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
        let rows = self
            .history(&sql, channel_id, before, viewer, parent)
            .await?;
        EncodedRows::of_rows(&rows, limit, write_row, SqlxRow)
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
             AND (CAST($2 AS TEXT) IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
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
