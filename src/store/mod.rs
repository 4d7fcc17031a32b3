//! Persistence: one repository trait per entity, one module per database.
//!
//! Every method that changes data is one transaction that also writes the audit row and, for
//! anything a live feed shows, the channel's next event: the channel row's `last_sequence` is
//! bumped inside the transaction, so sequences are gap-free and in commit order (the channel
//! row stays locked until commit: PostgreSQL's and MySQL's row locks, SQLite's one writer).
//!
//! # Layout
//! - this file: the traits, the row types, [`StoreError`], [`connect`] by URL scheme;
//! - `flows.rs`: the traits implemented once for every database: which statements each
//!   change runs, in which order, under which lock;
//! - [`backend`]: [`backend::Backend`], the statements a database module provides;
//! - `batch.rs`: the group commit's planning (refusals, repeats, sequences, outcomes);
//! - [`sqlite`], [`postgres`], [`mysql`]: each database's SQL, pools, error codes and
//!   migrations folder, read top to bottom.
//!
//! Times are microseconds since the Unix epoch, ids UUID text.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

pub mod backend;
mod batch;
mod flows;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

pub use mysql::{mysql_retryable, mysql_unavailable, MySqlStore};
pub use postgres::{postgres_unavailable, PostgresStore};
pub use sqlite::{sqlite_unavailable, SqliteStore};

/// Microseconds since the Unix epoch, the unit of every stored time.
pub fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// `sqlite:` URLs.
    Sqlite,
    /// `postgres:` / `postgresql:` URLs.
    Postgres,
    /// `mysql:` / `mariadb:` URLs (MySQL 8.0+, MariaDB 10.6+).
    Mysql,
}

impl Database {
    /// Picks the database from a URL's scheme; `None` for an unknown scheme.
    pub fn from_url(url: &str) -> Option<Database> {
        match url.split(':').next().unwrap_or_default() {
            "sqlite" => Some(Database::Sqlite),
            "postgres" | "postgresql" => Some(Database::Postgres),
            "mysql" | "mariadb" => Some(Database::Mysql),
            _ => None,
        }
    }
}

/// Opens the database at `url` (creating a SQLite file and its folder when missing), with
/// PostgreSQL's `search_path` set to `schema` when given (the others have no schemas), and
/// applies the embedded migrations of that database (`migrations/<database>/`) unless
/// `migrate` is false.
///
/// Errors: an unknown scheme or a bad URL (`StoreError::Internal`), an unreachable server
/// (`StoreError::Unavailable`), a failed migration (`StoreError::Internal`).
pub async fn connect(
    url: &str,
    schema: Option<&str>,
    migrate: bool,
) -> StoreResult<Arc<dyn Store>> {
    match Database::from_url(url) {
        Some(Database::Sqlite) => Ok(SqliteStore::connect(url, migrate).await?),
        Some(Database::Postgres) => Ok(PostgresStore::connect(url, schema, migrate).await?),
        Some(Database::Mysql) => Ok(MySqlStore::connect(url, migrate).await?),
        None => Err(StoreError::Internal(format!(
            "unsupported database URL scheme in {:?} (use sqlite:, postgres: or mysql:)",
            url.split(':').next().unwrap_or_default()
        ))),
    }
}

/// Applies a database's embedded migrations.
async fn migrate<'a, A>(migrator: sqlx::migrate::Migrator, pool: A) -> StoreResult<()>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    migrator
        .run(pool)
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))
}

/// Has each metrics scrape sample `store`'s pools, for as long as the store lives.
fn watch_pools<S: Send + Sync + 'static>(
    store: &Arc<S>,
    pools: fn(&S) -> [crate::metrics::PoolSample; 2],
) {
    let weak = Arc::downgrade(store);
    crate::metrics::watch_pools(move || weak.upgrade().map(|s| pools(&s).to_vec()));
}

/// A pool's state for `chat_db_pool_*` (sampled at each scrape).
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

/// Errors of the storage layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The row the operation needs does not exist (or is not visible to the tenant).
    #[error("not found")]
    NotFound,
    /// A uniqueness rule would be broken (for example a repeated `client_message_id`).
    #[error("conflict")]
    Conflict,
    /// The change would leave a group without an owner.
    #[error("the last owner cannot leave or step down")]
    LastOwner,
    /// The row changed since the version the caller gave (a stale etag).
    #[error("stale version")]
    Stale,
    /// The attachment at this index of `attachment_ids` cannot be linked: unknown, another
    /// channel's or uploader's, or linked already.
    #[error("attachment {0} cannot be linked")]
    Unlinkable(usize),
    /// The database could not be reached, timed out, or is out of space: retryable later
    /// (answered `UNAVAILABLE`).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The transaction lost a race with another (a deadlock, a lock-wait timeout, a
    /// serialization failure) and wrote nothing: running it again may succeed at once. The
    /// group commit retries; elsewhere it is answered `UNAVAILABLE`.
    #[error("transaction aborted by a concurrent one: {0}")]
    Retry(String),
    /// Any other database error: a bug or a broken schema.
    #[error("database error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    /// Classifies a database error by the database's own codes ([`sqlite_unavailable`],
    /// [`postgres_unavailable`], [`mysql_unavailable`], [`mysql_retryable`]).
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::Database(d) => match database_error_kind(d.as_ref()) {
                Some(kind) => kind(e.to_string()),
                None => StoreError::Internal(e.to_string()),
            },
            sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

/// `StoreError::Retry` or `StoreError::Unavailable` for a database error that is one, by the
/// rules of the database that raised it; `None` for a bug or a broken schema (`Internal`).
fn database_error_kind(d: &dyn sqlx::error::DatabaseError) -> Option<fn(String) -> StoreError> {
    if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        sqlite::error_kind(d.code().as_deref().unwrap_or_default())
    } else if let Some(my) = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        mysql::error_kind(my.number())
    } else {
        postgres::error_kind(d.code().as_deref().unwrap_or_default())
    }
}

/// Result of the storage layer.
pub type StoreResult<T> = Result<T, StoreError>;

/// `group` or `direct`, as stored in `channels.kind`.
pub const KIND_GROUP: &str = "group";
/// Most ids one [`ChannelStore::last_sequences`] call takes.
pub const MAX_HEADS_PER_READ: usize = 1000;
/// See [`KIND_GROUP`].
pub const KIND_DIRECT: &str = "direct";

/// A channel row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ChannelRow {
    pub id: String,
    pub tenant_id: String,
    /// [`KIND_GROUP`] or [`KIND_DIRECT`].
    pub kind: String,
    pub name: String,
    pub description: String,
    pub channel_type: String,
    /// `tenant\nuser-a\nuser-b` (users sorted) for direct channels.
    pub direct_key: Option<String>,
    pub last_sequence: i64,
    pub create_time: i64,
    pub update_time: i64,
}

/// Role names as stored in `members.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Full control of the group.
    Owner,
    /// Manages members and content.
    Admin,
    /// Reads and writes.
    Member,
}

impl Role {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
    /// Parses the stored text; unknown text (which the schema's CHECK forbids) reads as Member.
    pub fn parse(s: &str) -> Role {
        match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }
    /// Owner or admin.
    pub fn is_manager(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A member row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MemberRow {
    pub channel_id: String,
    pub user_id: String,
    pub role: String,
    pub join_time: i64,
    pub join_sequence: i64,
    pub read_sequence: i64,
}

impl MemberRow {
    /// The parsed role.
    pub fn role(&self) -> Role {
        Role::parse(&self.role)
    }
}

/// A message row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MessageRow {
    pub id: String,
    pub tenant_id: String,
    pub channel_id: String,
    pub sender_id: String,
    pub body: String,
    pub subject: String,
    pub parent_message_id: Option<String>,
    /// JSON array of attachment ids.
    pub attachment_ids: String,
    pub client_message_id: Option<String>,
    pub forwarded_from_message_id: Option<String>,
    pub sequence: i64,
    /// Bumped on every change; the API's `etag`.
    pub version: i64,
    pub create_time: i64,
    pub update_time: Option<i64>,
    pub delete_time: Option<i64>,
    pub deleted_by: Option<String>,
}

/// One audit row: who changed what, with the row before and after as JSON.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub id: String,
    pub tenant_id: String,
    /// `create`, `update` or `delete`.
    pub operation: &'static str,
    /// The table of the changed row.
    pub table: &'static str,
    /// The changed row's id (`channel/user` for a member).
    pub entity_id: String,
    /// The acting user, or `system:sweep`.
    pub actor_id: String,
    pub before_json: Option<String>,
    pub after_json: Option<String>,
    pub create_time: i64,
}

/// The columns of `messages` in [`MessageRow`]'s field order: what a history query selects,
/// and the indexes [`MessageColumns`] reads them by.
pub const MESSAGE_COLUMNS: &str = "id, tenant_id, channel_id, sender_id, body, subject, \
     parent_message_id, attachment_ids, client_message_id, forwarded_from_message_id, \
     sequence, version, create_time, update_time, delete_time, deleted_by";

/// A database row of a history query, read by column index in [`MESSAGE_COLUMNS`] order.
pub trait MessageColumns {
    /// Text column `i`, borrowed from the row; NULL reads as empty. `Internal` when the
    /// column is not text.
    fn text(&self, i: usize) -> StoreResult<&str>;
    /// Integer column `i`; NULL reads as `None`. `Internal` when it is not an integer.
    fn integer(&self, i: usize) -> StoreResult<Option<i64>>;
}

/// A row of any sqlx database as [`MessageColumns`] (a wrapper: sqlx's rows are foreign types).
pub(crate) struct SqlxRow<'r, R>(pub &'r R);

impl<R> MessageColumns for SqlxRow<'_, R>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> &'a str: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, i: usize) -> StoreResult<&str> {
        Ok(self.0.try_get::<Option<&str>, _>(i)?.unwrap_or_default())
    }

    fn integer(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.0.try_get(i)?)
    }
}

/// The LIMITs a history query is written with (page sizes 10, 25, 50, 100 and 200, plus the
/// row that tells whether a next page exists): a request's limit is rounded up to the next.
const HISTORY_LIMIT_STEPS: [i64; 5] = [11, 26, 51, 101, 201];

/// The LIMIT a history query for `limit` rows is written with, into its text rather than
/// bound: with `LIMIT $n` PostgreSQL cannot cost a generic plan (it assumes a tenth of the
/// table), so it planned every page again, half of its CPU per page; with the size known the
/// generic plan costs what a custom one does, and it is kept after five executions. Rounded
/// up to one of [`HISTORY_LIMIT_STEPS`], so a handful of texts stay prepared whatever sizes
/// clients ask for; the callers drop the extra rows.
fn history_fetch_limit(limit: i64) -> i64 {
    HISTORY_LIMIT_STEPS
        .into_iter()
        .find(|&step| step >= limit)
        .unwrap_or(limit)
}

/// Writes one message of a history page from its row: appends its bytes to `out` and returns
/// its sequence. Errors: the row's (a column of an unexpected type); nothing is appended then.
pub type RowWriter = fn(out: &mut Vec<u8>, row: &dyn MessageColumns) -> StoreResult<i64>;

/// A history page as [`RowWriter`] wrote it: the messages' bytes one after another, and each
/// message's `(sequence, end offset in bytes)`, in page order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedRows {
    pub bytes: Vec<u8>,
    pub ends: Vec<(i64, usize)>,
}

impl EncodedRows {
    /// Appends the message `write_row` writes from `row`.
    pub fn push(&mut self, write_row: RowWriter, row: &dyn MessageColumns) -> StoreResult<()> {
        let start = self.bytes.len();
        match write_row(&mut self.bytes, row) {
            Ok(sequence) => {
                self.ends.push((sequence, self.bytes.len()));
                Ok(())
            }
            Err(e) => {
                self.bytes.truncate(start);
                Err(e)
            }
        }
    }

    /// The first `limit` of `rows` (`limit` below 0 reads as 0), each as `columns` reads it.
    pub(crate) fn of_rows<'r, R: 'r, C: MessageColumns>(
        rows: impl IntoIterator<Item = &'r R>,
        limit: i64,
        write_row: RowWriter,
        columns: impl Fn(&'r R) -> C,
    ) -> StoreResult<EncodedRows> {
        let mut page = EncodedRows::default();
        for row in rows.into_iter().take(usize::try_from(limit).unwrap_or(0)) {
            page.push(write_row, &columns(row))?;
        }
        Ok(page)
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// One stored event of a channel's feed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub channel_id: String,
    pub sequence: i64,
    /// The encoded `chat.v1.SubscribeResponse`.
    pub payload: Vec<u8>,
}

/// Turns a committed change into the bytes of its feed event. The store calls it inside the
/// transaction, once the sequence is known, so the stored event and the live one are the same.
pub type Encoder<'a, T> = &'a (dyn Fn(&T, i64) -> Vec<u8> + Send + Sync);

/// The unique key of the direct channel of two users in a tenant (order of users irrelevant).
pub fn direct_key(tenant: &str, a: &str, b: &str) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    format!("{tenant}\n{a}\n{b}")
}

/// Who is acting, for the audit log and tenancy.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub tenant_id: &'a str,
    pub user_id: &'a str,
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub channel_id: String,
    pub body: String,
    pub subject: String,
    pub parent_message_id: Option<String>,
    pub attachment_ids: Vec<String>,
    pub client_message_id: Option<String>,
    pub forwarded_from_message_id: Option<String>,
}

/// One message of a group commit ([`MessageStore::insert_messages`]): who sends what.
#[derive(Debug, Clone)]
pub struct BatchMessage {
    pub tenant_id: String,
    pub user_id: String,
    pub msg: NewMessage,
}

/// Counts of committed group-commit batches by the way they were written
/// ([`MessageStore::commit_paths`]). SQLite counts neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitPaths {
    /// PostgreSQL: batches written by one call of `chat_append_messages`.
    pub one_call: u64,
    /// PostgreSQL: batches written by the general path (a check of the one call failed, or it
    /// was not tried).
    pub general: u64,
}

/// What happened to an insert.
#[derive(Debug, Clone)]
pub enum Inserted {
    /// A new message, with its event payload.
    New(MessageRow, Vec<u8>),
    /// The sender's `client_message_id` was seen before: the first message.
    Existing(MessageRow),
}

/// The result of a change that made a feed event.
#[derive(Debug, Clone)]
pub struct Changed<T> {
    pub row: T,
    pub sequence: i64,
    pub payload: Vec<u8>,
}

/// Fields of a message to change.
#[derive(Debug, Clone, Default)]
pub struct MessagePatch {
    pub body: Option<String>,
    pub subject: Option<String>,
    /// Refuse the change (`StoreError::Conflict`) unless the version is still this.
    pub expected_version: Option<i64>,
}

/// Fields of a group to change.
#[derive(Debug, Clone, Default)]
pub struct GroupPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub channel_type: Option<String>,
}

/// Per-member state of one message.
#[derive(Debug, Clone)]
pub struct RecipientState {
    pub user_id: String,
    pub read: bool,
    pub favorite: bool,
}

/// Channels and their membership.
#[async_trait]
pub trait ChannelStore: Send + Sync {
    /// Creates a group with the creator as owner and `members` as members, writing a
    /// MemberAdded event per member. Returns the channel and the events, in sequence order.
    async fn create_group(
        &self,
        actor: Actor<'_>,
        channel: ChannelRow,
        members: &[String],
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)>;
    /// Finds or makes the direct channel of two users (events for the two MemberAdded when made).
    async fn direct_channel(
        &self,
        actor: Actor<'_>,
        peer: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)>;
    /// The direct channel of the actor and `peer`, if it exists (nothing is made).
    async fn find_direct_channel(
        &self,
        actor: Actor<'_>,
        peer: &str,
    ) -> StoreResult<Option<ChannelRow>>;
    /// A live (not deleted) channel of the tenant.
    async fn channel(&self, tenant: &str, channel_id: &str) -> StoreResult<ChannelRow>;
    /// Changes a group's fields.
    async fn update_group(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        patch: GroupPatch,
    ) -> StoreResult<ChannelRow>;
    /// Marks a group deleted and removes every member, writing their MemberRemoved events.
    async fn delete_group(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Vec<Changed<MemberRow>>>;
    /// The caller's channels, newest first, ids below `before` (exclusive) when given.
    async fn list_channels(
        &self,
        tenant: &str,
        user: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<ChannelRow>>;
    /// The membership row, if the user is a member of the live channel.
    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>>;
    /// The channels of `channel_ids` that exist (deleted or not), each as `(id, tenant, last
    /// sequence)`, in no order, in one query for up to [`MAX_HEADS_PER_READ`] ids: what the
    /// cross-node head check compares with what its node's feeds were sent.
    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>>;
    /// Of `channel_ids`, the live channels `user` is a member of, with each one's last
    /// sequence, in one query whatever their number (Subscribe lists up to 1,000).
    async fn channel_heads(
        &self,
        tenant: &str,
        user: &str,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, i64)>>;
    /// Channel rows and membership rows of all the user's channels.
    async fn memberships(
        &self,
        tenant: &str,
        user: &str,
    ) -> StoreResult<Vec<(ChannelRow, MemberRow)>>;
    /// Members in join order, after the `(join_time, user_id)` key when given.
    async fn list_members(
        &self,
        channel_id: &str,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> StoreResult<Vec<MemberRow>>;
    /// Adds members (existing ones are skipped), writing a MemberAdded event each.
    async fn add_members(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        users: &[String],
        role: Role,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Vec<Changed<MemberRow>>>;
    /// Removes a member, writing a MemberRemoved event.
    async fn remove_member(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        user: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Changed<MemberRow>>;
    /// Changes a member's role.
    async fn set_role(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        user: &str,
        role: Role,
    ) -> StoreResult<MemberRow>;
    /// How many owners the channel has.
    async fn owner_count(&self, channel_id: &str) -> StoreResult<i64>;
}

/// Messages.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Stores a message as the channel's next event, links its attachments, writes the audit row.
    /// `StoreError::NotFound` when the sender is not a member; a repeated `client_message_id`
    /// gives `Inserted::Existing`; an attachment that cannot be linked gives
    /// `StoreError::Conflict`.
    async fn insert_message(
        &self,
        actor: Actor<'_>,
        msg: NewMessage,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Inserted>;
    /// Group commit: stores several messages (without attachments) in one transaction, each as
    /// its channel's next event with its audit row, exactly as [`Self::insert_message`] would
    /// one by one in batch order. Channels are locked in id order, so concurrent batches cannot
    /// deadlock. Each message gets its own outcome: `NotFound` (no such channel in the tenant,
    /// or the sender is not a member), `Existing` for a repeated `client_message_id` (also when
    /// repeated within the batch), else `New`; none of these affect the others. The outer
    /// error means the transaction failed and nothing was stored.
    async fn insert_messages(
        &self,
        batch: Vec<BatchMessage>,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>>;
    /// How many group-commit transactions may run at once: 1 for SQLite (one writer), one per
    /// core (2 to 16) for PostgreSQL, where concurrent batches overlap their round trips and
    /// commits. Each worker then owns a share of the channels.
    fn write_concurrency(&self) -> usize;
    /// How this store's group commits went so far (for metrics and tests).
    fn commit_paths(&self) -> CommitPaths;
    /// One message of the tenant (deleted ones included).
    async fn message(&self, tenant: &str, message_id: &str) -> StoreResult<MessageRow>;
    /// Live messages of a channel (or one thread), newest first, below `before_sequence`, as
    /// rows (ListMessages sends [`MessageStore::list_messages_encoded`]; tests compare the two);
    /// none unless `viewer` (`(tenant, user)`) is a member of the channel and it is not deleted.
    /// An empty page is therefore either: the caller tells them apart with
    /// [`ChannelStore::member`].
    async fn list_messages(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<MessageRow>>;
    /// [`MessageStore::list_messages`] with each message written by `write_row` straight
    /// from the database row (ListMessages passes `crate::page::write_message`, which writes
    /// the wire form of `chat.v1.Message`), without a [`MessageRow`] in between.
    async fn list_messages_encoded(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
        write_row: RowWriter,
    ) -> StoreResult<EncodedRows>;
    /// Edits a message as a new event.
    async fn update_message(
        &self,
        actor: Actor<'_>,
        message_id: &str,
        patch: MessagePatch,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Changed<MessageRow>>;
    /// Soft-deletes a message as a new event.
    async fn delete_message(
        &self,
        actor: Actor<'_>,
        message_id: &str,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Changed<MessageRow>>;
    /// Live messages in a channel.
    async fn count_messages(&self, channel_id: &str) -> StoreResult<i64>;
}

/// Read markers and favourites: the seed's per-recipient state.
#[async_trait]
pub trait ReadStateStore: Send + Sync {
    /// Moves the marker forward to `sequence` (never back); returns the marker after the call
    /// and whether this call moved it (false when it was at or past `sequence` already).
    async fn mark_read(
        &self,
        channel_id: &str,
        user: &str,
        sequence: i64,
    ) -> StoreResult<(i64, bool)>;
    /// Stars or unstars.
    async fn set_favorite(
        &self,
        tenant: &str,
        user: &str,
        message_id: &str,
        favorite: bool,
    ) -> StoreResult<()>;
    /// Each member's state for one message.
    async fn recipients(&self, msg: &MessageRow) -> StoreResult<Vec<RecipientState>>;
    /// `(channel_id, unread)` for every channel of the user.
    async fn unread_counts(&self, tenant: &str, user: &str) -> StoreResult<Vec<(String, i64)>>;
}

/// The per-channel event log that feeds replay from.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Events of a channel with `after < sequence <= up_to`, in order, at most `limit`.
    async fn events(
        &self,
        channel_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>>;
}

/// An attachment row (visible once its upload completed).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AttachmentRow {
    pub id: String,
    pub tenant_id: String,
    pub channel_id: String,
    pub message_id: Option<String>,
    pub uploader_id: String,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: i64,
    /// Lower-case hex SHA-256 of the content, computed by the server.
    pub sha256: String,
    /// Object key in blob storage.
    pub storage_key: String,
    pub create_time: i64,
}

/// A resumable upload in progress.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct UploadRow {
    pub id: String,
    pub tenant_id: String,
    pub channel_id: String,
    pub uploader_id: String,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: i64,
    /// Expected SHA-256 (lower-case hex), or empty.
    pub sha256: String,
    pub committed_bytes: i64,
    pub create_time: i64,
}

/// One download.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DownloadRow {
    pub id: String,
    pub tenant_id: String,
    pub attachment_id: String,
    pub user_id: String,
    pub download_time: i64,
    pub bytes_sent: i64,
    /// 1 when the download reached the end of the file.
    pub completed: i64,
}

/// Attachments, resumable uploads and the download audit.
#[async_trait]
pub trait AttachmentStore: Send + Sync {
    /// Makes an uploaded attachment visible (with its audit row). `StoreError::NotFound` when the
    /// uploader is no longer a member of the live channel.
    async fn insert_attachment(
        &self,
        actor: Actor<'_>,
        row: AttachmentRow,
    ) -> StoreResult<AttachmentRow>;
    /// One attachment of the tenant.
    async fn attachment(&self, tenant: &str, id: &str) -> StoreResult<AttachmentRow>;
    /// Attachments of a channel (or of one message when `message_id` is set) that `viewer` may
    /// see — linked to a message that is not deleted, or the viewer's own unlinked uploads —
    /// newest first, ids below `before` when given.
    async fn list_attachments(
        &self,
        channel_id: &str,
        message_id: Option<&str>,
        viewer: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AttachmentRow>>;
    /// Deletes an attachment row (with its audit row); returns it.
    async fn delete_attachment(&self, actor: Actor<'_>, id: &str) -> StoreResult<AttachmentRow>;
    /// Unlinked attachments created before `before` (for the sweep).
    async fn unlinked_before(&self, before: i64, limit: i64) -> StoreResult<Vec<AttachmentRow>>;
    /// Attachments of deleted groups, linked or not (for the sweep): nobody can reach or
    /// delete them any more.
    async fn attachments_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<AttachmentRow>>;
    /// Deletes an attachment row for the sweep (with an audit row by `system:sweep`) if it is
    /// still unlinked or its channel is deleted; false otherwise (linked meanwhile).
    async fn sweep_attachment(&self, id: &str) -> StoreResult<bool>;
    /// Records a resumable upload unless its uploader would then have more than `max_open`
    /// unfinished uploads or more than `max_open_bytes` declared by them, checked and written
    /// in one transaction (PostgreSQL takes a transaction-level advisory lock on the uploader,
    /// SQLite the database's write lock from the start), so concurrent calls cannot pass the
    /// limit together.
    /// Returns `None` when recorded, else the uploader's unfinished `(count, declared bytes)`.
    async fn create_upload(
        &self,
        row: UploadRow,
        max_open: i64,
        max_open_bytes: i64,
    ) -> StoreResult<Option<(i64, i64)>>;
    /// One upload of the tenant.
    async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow>;
    /// Commits the chunk stored at `key` for bytes `from..to`: moves `committed_bytes` from
    /// `from` to `to` and records the key, in one transaction; false when `committed_bytes` was
    /// not `from` any more (or the upload is gone).
    async fn commit_chunk(&self, id: &str, from: i64, to: i64, key: &str) -> StoreResult<bool>;
    /// Storage keys of an upload's committed chunks, in offset order.
    async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>>;
    /// Completes an upload: deletes its row and inserts the attachment, in one transaction.
    async fn complete_upload(
        &self,
        actor: Actor<'_>,
        upload_id: &str,
        row: AttachmentRow,
    ) -> StoreResult<AttachmentRow>;
    /// Unfinished uploads of deleted groups (for the sweep): nobody can complete them, and they
    /// would count against their uploaders' limit until the TTL.
    async fn uploads_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<UploadRow>>;
    /// Uploads created before `before` (for the sweep).
    async fn uploads_before(&self, before: i64, limit: i64) -> StoreResult<Vec<UploadRow>>;
    /// Deletes an upload row and its chunk records; false when there was no such row (another
    /// call, say another node's sweep, deleted it first).
    async fn delete_upload(&self, id: &str) -> StoreResult<bool>;
    /// Writes a download record.
    async fn insert_download(&self, row: DownloadRow) -> StoreResult<()>;
    /// Updates a download record when the download ends.
    async fn finish_download(&self, id: &str, bytes_sent: i64, completed: bool) -> StoreResult<()>;
    /// Download records of an attachment, newest first, ids below `before` when given.
    async fn list_downloads(
        &self,
        attachment_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DownloadRow>>;
}

/// Everything the domain needs from a database.
pub trait Store:
    ChannelStore + MessageStore + ReadStateStore + EventStore + AttachmentStore
{
    /// Closes the pools.
    fn close(&self) -> futures::future::BoxFuture<'_, ()>;
}
