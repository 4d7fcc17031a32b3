//! What each database module provides: its SQL, one method per statement (or per short,
//! fixed run of statements), and nothing else. The transactions that combine them — which
//! rows are locked first, what is checked after the locks, which event and audit rows go
//! with a change — are written once, in [`super::flows`], for every database.
//!
//! A method that takes `tx` runs inside the caller's transaction; one that takes only `&self`
//! runs on its own on a pool (reads on the read pool unless noted). Every method returns
//! [`StoreError`] as [`From<sqlx::Error>`] classifies it (`NotFound` where a row the statement
//! needs is missing, `Conflict` on a unique key, `Unavailable` / `Retry` by the database's own
//! codes).

use async_trait::async_trait;

use super::*;

/// The SQL of one database. Implemented by [`super::sqlite::SqliteStore`],
/// [`super::postgres::PostgresStore`] and [`super::mysql::MySqlStore`]; the store traits are
/// implemented once for every `Backend` in [`super::flows`].
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A transaction on the write pool (`sqlx::Transaction` of the database).
    type Tx: Send;

    // ---- transactions ----

    /// Starts a transaction that will write.
    async fn begin(&self) -> StoreResult<Self::Tx>;
    /// Commits.
    async fn commit(&self, tx: Self::Tx) -> StoreResult<()>;
    /// Rolls back at once (dropping `tx` also rolls back, but only when the pool next touches
    /// the connection; this releases locks now).
    async fn rollback(&self, tx: Self::Tx) -> StoreResult<()>;
    /// Starts the transaction of a CreateUpload and serializes it with every other one of the
    /// same `(tenant, uploader)` until it ends, so the quota's check and insert cannot
    /// interleave with another's (SQLite: the database's write lock, PostgreSQL: an advisory
    /// transaction lock, MySQL: a row lock on `upload_locks`).
    async fn begin_upload(&self, tenant: &str, uploader: &str) -> StoreResult<Self::Tx>;

    // ---- channels: the sequence and the row lock ----

    /// Takes the next `n` sequences of the live channel `channel_id` of `tenant`, locking its
    /// row until the transaction ends; returns the last sequence taken. `NotFound` when there
    /// is no such live channel.
    async fn bump(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
        n: i64,
    ) -> StoreResult<i64>;
    /// Locks the live channel's row without changing it, so checks made after it see every
    /// earlier change of the channel. `NotFound` when there is no such live channel.
    async fn lock_channel(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<()>;
    /// Inserts a channel row as given.
    async fn insert_channel(&self, tx: &mut Self::Tx, channel: &ChannelRow) -> StoreResult<()>;
    /// Inserts a direct channel unless its `direct_key` exists; false when it did.
    async fn insert_direct_channel(
        &self,
        tx: &mut Self::Tx,
        channel: &ChannelRow,
    ) -> StoreResult<bool>;
    /// The live channel of the tenant, read in the transaction.
    async fn channel_in(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        channel_id: &str,
    ) -> StoreResult<Option<ChannelRow>>;
    /// Applies `patch` (fields left `None` keep their value) and `update_time`; returns the row.
    async fn update_channel(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        patch: &GroupPatch,
        update_time: i64,
    ) -> StoreResult<ChannelRow>;
    /// Sets the channel's `delete_time`.
    async fn mark_channel_deleted(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        delete_time: i64,
    ) -> StoreResult<()>;
    /// The live direct channel with this key, read on the write pool (so a channel another
    /// call just made is seen).
    async fn find_direct(&self, tenant: &str, direct_key: &str) -> StoreResult<Option<ChannelRow>>;

    // ---- members ----

    /// Members of the channel in join order (`join_time`, then `user_id`).
    async fn members_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<Vec<MemberRow>>;
    /// One member row, read in the transaction.
    async fn member_in(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>>;
    /// Owners of the channel, counted in the transaction.
    async fn owners_in(&self, tx: &mut Self::Tx, channel_id: &str) -> StoreResult<i64>;
    /// Inserts a member row (`read_sequence` as given).
    async fn insert_member(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        row: &MemberRow,
    ) -> StoreResult<()>;
    /// Deletes a member row.
    async fn delete_member(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<()>;
    /// Sets a member's role; returns the row.
    async fn update_role(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
        role: Role,
    ) -> StoreResult<MemberRow>;

    // ---- the event log and the audit log ----

    /// Appends an event to the channel's log.
    async fn insert_event(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        sequence: i64,
        payload: &[u8],
    ) -> StoreResult<()>;
    /// Appends an audit row.
    async fn insert_audit(&self, tx: &mut Self::Tx, row: &AuditRow) -> StoreResult<()>;

    // ---- messages ----

    /// The message stored under `(channel, sender, client_message_id)`, read on the write pool.
    async fn find_idempotent(
        &self,
        channel_id: &str,
        sender: &str,
        client_message_id: &str,
    ) -> StoreResult<Option<MessageRow>>;
    /// Inserts a message row as given; `Conflict` when its `client_message_id` is taken.
    async fn insert_message_row(&self, tx: &mut Self::Tx, row: &MessageRow) -> StoreResult<()>;
    /// Links an unlinked attachment of the message's channel, sender and tenant to the
    /// message; false when there is no such attachment.
    async fn link_attachment(
        &self,
        tx: &mut Self::Tx,
        message: &MessageRow,
        attachment_id: &str,
    ) -> StoreResult<bool>;
    /// The channel of a message of the tenant (deleted or not).
    async fn message_channel(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        message_id: &str,
    ) -> StoreResult<Option<String>>;
    /// A message row, read in the transaction; `NotFound` when missing.
    async fn message_in(&self, tx: &mut Self::Tx, message_id: &str) -> StoreResult<MessageRow>;
    /// Applies an edit (`None` keeps the field), bumps the version, sets `update_time`;
    /// returns the row.
    async fn update_message_row(
        &self,
        tx: &mut Self::Tx,
        message_id: &str,
        body: Option<&str>,
        subject: Option<&str>,
        update_time: i64,
    ) -> StoreResult<MessageRow>;
    /// Soft-deletes: bumps the version, sets `delete_time` and `deleted_by`; returns the row.
    async fn delete_message_row(
        &self,
        tx: &mut Self::Tx,
        message_id: &str,
        delete_time: i64,
        deleted_by: &str,
    ) -> StoreResult<MessageRow>;
    /// See [`MessageStore::insert_messages`]: the group commit, which each database writes its
    /// own way around the shared planning of [`super::batch`]. Called again by the flow when it
    /// fails with `StoreError::Retry`.
    async fn insert_batch(
        &self,
        batch: &[BatchMessage],
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>>;
    /// See [`MessageStore::write_concurrency`].
    fn write_concurrency(&self) -> usize;
    /// See [`MessageStore::commit_paths`].
    fn commit_paths(&self) -> CommitPaths;

    // ---- read markers ----

    /// Moves the read marker to `sequence` if it is below; whether it moved.
    async fn advance_read_marker(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
        sequence: i64,
    ) -> StoreResult<bool>;
    /// The read marker, if the user is a member.
    async fn read_marker(
        &self,
        tx: &mut Self::Tx,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<i64>>;

    // ---- attachments and uploads ----

    /// Inserts an attachment row (unlinked: `message_id` is written as NULL).
    async fn insert_attachment_row(
        &self,
        tx: &mut Self::Tx,
        row: &AttachmentRow,
    ) -> StoreResult<()>;
    /// Deletes the tenant's attachment row; returns it, `None` when missing.
    async fn delete_attachment_row(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        id: &str,
    ) -> StoreResult<Option<AttachmentRow>>;
    /// Deletes the attachment row if it is unlinked or its channel is deleted; returns it.
    async fn delete_swept_attachment(
        &self,
        tx: &mut Self::Tx,
        id: &str,
    ) -> StoreResult<Option<AttachmentRow>>;
    /// The uploader's unfinished uploads: `(count, declared bytes)`.
    async fn open_uploads(
        &self,
        tx: &mut Self::Tx,
        tenant: &str,
        uploader: &str,
    ) -> StoreResult<(i64, i64)>;
    /// Inserts an upload row with `committed_bytes` 0.
    async fn insert_upload(&self, tx: &mut Self::Tx, row: &UploadRow) -> StoreResult<()>;
    /// Moves `committed_bytes` from `from` to `to`; false when it was not `from`.
    async fn advance_upload(
        &self,
        tx: &mut Self::Tx,
        id: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<bool>;
    /// Records the chunk stored at `key` for the bytes from `offset`.
    async fn insert_chunk(
        &self,
        tx: &mut Self::Tx,
        id: &str,
        offset: i64,
        key: &str,
    ) -> StoreResult<()>;
    /// Deletes an upload row; false when it was not there.
    async fn delete_upload_row(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<bool>;
    /// Deletes an upload's chunk records.
    async fn delete_chunks(&self, tx: &mut Self::Tx, id: &str) -> StoreResult<()>;

    // ---- reads, each one statement: the store traits' methods of the same names ----

    /// See [`ChannelStore::channel`].
    async fn channel(&self, tenant: &str, channel_id: &str) -> StoreResult<ChannelRow>;
    /// See [`ChannelStore::list_channels`].
    async fn list_channels(
        &self,
        tenant: &str,
        user: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<ChannelRow>>;
    /// See [`ChannelStore::member`].
    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>>;
    /// See [`ChannelStore::last_sequences`].
    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>>;
    /// See [`ChannelStore::channel_heads`].
    async fn channel_heads(
        &self,
        tenant: &str,
        user: &str,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, i64)>>;
    /// The user's member rows in the tenant.
    async fn member_rows_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<MemberRow>>;
    /// The live channels the user is a member of in the tenant.
    async fn channels_of(&self, tenant: &str, user: &str) -> StoreResult<Vec<ChannelRow>>;
    /// See [`ChannelStore::list_members`].
    async fn list_members(
        &self,
        channel_id: &str,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> StoreResult<Vec<MemberRow>>;
    /// See [`ChannelStore::owner_count`].
    async fn owner_count(&self, channel_id: &str) -> StoreResult<i64>;
    /// See [`MessageStore::message`].
    async fn message(&self, tenant: &str, message_id: &str) -> StoreResult<MessageRow>;
    /// See [`MessageStore::list_messages`].
    async fn list_messages(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<MessageRow>>;
    /// See [`MessageStore::list_messages_encoded`].
    async fn list_messages_encoded(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
        write_row: RowWriter,
    ) -> StoreResult<EncodedRows>;
    /// See [`MessageStore::count_messages`].
    async fn count_messages(&self, channel_id: &str) -> StoreResult<i64>;
    /// See [`ReadStateStore::set_favorite`].
    async fn set_favorite(
        &self,
        tenant: &str,
        user: &str,
        message_id: &str,
        favorite: bool,
    ) -> StoreResult<()>;
    /// Each member of the message's channel in join order: `(user_id, read_sequence, whether
    /// the message is their favourite)`.
    async fn recipient_rows(&self, msg: &MessageRow) -> StoreResult<Vec<(String, i64, bool)>>;
    /// See [`ReadStateStore::unread_counts`].
    async fn unread_counts(&self, tenant: &str, user: &str) -> StoreResult<Vec<(String, i64)>>;
    /// See [`EventStore::events`].
    async fn events(
        &self,
        channel_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>>;
    /// See [`AttachmentStore::attachment`].
    async fn attachment(&self, tenant: &str, id: &str) -> StoreResult<AttachmentRow>;
    /// See [`AttachmentStore::list_attachments`].
    async fn list_attachments(
        &self,
        channel_id: &str,
        message_id: Option<&str>,
        viewer: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AttachmentRow>>;
    /// See [`AttachmentStore::unlinked_before`].
    async fn unlinked_before(&self, before: i64, limit: i64) -> StoreResult<Vec<AttachmentRow>>;
    /// See [`AttachmentStore::attachments_of_deleted_channels`].
    async fn attachments_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<AttachmentRow>>;
    /// See [`AttachmentStore::upload`] (read on the write pool: a chunk just committed is seen).
    async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow>;
    /// See [`AttachmentStore::chunk_keys`] (read on the write pool).
    async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>>;
    /// See [`AttachmentStore::uploads_of_deleted_channels`].
    async fn uploads_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<UploadRow>>;
    /// See [`AttachmentStore::uploads_before`].
    async fn uploads_before(&self, before: i64, limit: i64) -> StoreResult<Vec<UploadRow>>;
    /// See [`AttachmentStore::insert_download`].
    async fn insert_download(&self, row: &DownloadRow) -> StoreResult<()>;
    /// See [`AttachmentStore::finish_download`].
    async fn finish_download(&self, id: &str, bytes_sent: i64, completed: bool) -> StoreResult<()>;
    /// See [`AttachmentStore::list_downloads`].
    async fn list_downloads(
        &self,
        attachment_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DownloadRow>>;
    /// Closes the pools.
    async fn close(&self);
}
