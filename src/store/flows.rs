//! The store traits, implemented once for every database ([`Backend`]): each change is one
//! transaction of the backend's statements, in the order written here.
//!
//! The rules every flow keeps (see the module page of [`super`]):
//! - a change that a feed shows takes the channel's next sequence with [`Backend::bump`],
//!   which also locks the channel row until commit, so sequences are gap-free and in commit
//!   order; checks that must see concurrent changes (membership, owners, an existing member)
//!   are read after that lock;
//! - every change writes its audit row, and its events, in the same transaction;
//! - returning early with an error drops the transaction, which rolls it back.

use async_trait::async_trait;
use futures::future::BoxFuture;
use uuid::Uuid;

use super::backend::Backend;
use super::*;

/// How many times a transaction that lost a race with another (a deadlock, a lock-wait
/// timeout, a serialization failure: [`StoreError::Retry`]) is tried in all before the error
/// reaches the caller as `Unavailable`. Nothing of a failed attempt was written.
const ATTEMPTS: usize = 4;

/// Runs `attempt` until it does not fail with [`StoreError::Retry`], at most [`ATTEMPTS`]
/// times, counting each retry (`chat_db_retries_total`).
async fn with_retries<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut tried = 1;
    loop {
        match attempt().await {
            Err(StoreError::Retry(_)) if tried < ATTEMPTS => {
                crate::metrics::transaction_retried();
                tried += 1;
            }
            Err(StoreError::Retry(e)) => return Err(StoreError::Unavailable(e)),
            done => return done,
        }
    }
}

/// One try of [`AttachmentStore::create_upload`].
async fn create_upload_once<B: Backend>(
    b: &B,
    row: &UploadRow,
    max_open: i64,
    max_open_bytes: i64,
) -> StoreResult<Option<(i64, i64)>> {
    let mut tx = b.begin_upload(&row.tenant_id, &row.uploader_id).await?;
    let (open, bytes) = b
        .open_uploads(&mut tx, &row.tenant_id, &row.uploader_id)
        .await?;
    if open >= max_open || bytes.saturating_add(row.size_bytes) > max_open_bytes {
        // At once, so the uploader's lock is released now.
        b.rollback(tx).await?;
        return Ok(Some((open, bytes)));
    }
    b.insert_upload(&mut tx, row).await?;
    b.commit(tx).await?;
    Ok(None)
}

/// The audit row of a change by `actor`, written at `now_micros()`: `before` and `after` are
/// the rows as JSON (`None` for a creation's before and a deletion's after).
pub(super) fn audit_row(
    actor: Actor<'_>,
    operation: &'static str,
    table: &'static str,
    entity_id: &str,
    before: Option<String>,
    after: Option<String>,
) -> AuditRow {
    AuditRow {
        id: Uuid::now_v7().to_string(),
        tenant_id: actor.tenant_id.to_owned(),
        operation,
        table,
        entity_id: entity_id.to_owned(),
        actor_id: actor.user_id.to_owned(),
        before_json: before,
        after_json: after,
        create_time: now_micros(),
    }
}

/// A row as the audit log's JSON.
pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// The creator as owner, then `members` (the creator and repeats skipped) as members.
fn group_members(creator: &str, members: &[String]) -> Vec<(String, Role)> {
    let mut users = vec![(creator.to_owned(), Role::Owner)];
    for m in members {
        if !users.iter().any(|(u, _)| u == m) {
            users.push((m.clone(), Role::Member));
        }
    }
    users
}

/// The new row of a direct channel of the actor and a peer.
fn direct_channel_row(tenant: &str, key: String) -> ChannelRow {
    let now = now_micros();
    ChannelRow {
        id: Uuid::now_v7().to_string(),
        tenant_id: tenant.to_owned(),
        kind: KIND_DIRECT.to_owned(),
        name: String::new(),
        description: String::new(),
        channel_type: String::new(),
        direct_key: Some(key),
        last_sequence: 0,
        create_time: now,
        update_time: now,
    }
}

/// The new row of a single send, as the channel's `sequence`.
fn new_message_row(actor: Actor<'_>, msg: NewMessage, sequence: i64) -> MessageRow {
    MessageRow {
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
    }
}

/// The entity id of a member in the audit log.
fn member_entity(channel_id: &str, user: &str) -> String {
    format!("{channel_id}/{user}")
}

/// Inserts members with consecutive sequences ending at `last`, one event and audit row each.
async fn insert_members<B: Backend>(
    b: &B,
    tx: &mut B::Tx,
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
        b.insert_member(tx, actor.tenant_id, &row).await?;
        let payload = enc(&row, sequence);
        b.insert_event(tx, channel_id, sequence, &payload).await?;
        let entity = member_entity(channel_id, user);
        let audit = audit_row(actor, "create", "members", &entity, None, to_json(&row));
        b.insert_audit(tx, &audit).await?;
        out.push(Changed {
            row,
            sequence,
            payload,
        });
    }
    Ok(out)
}

/// Deletes members with consecutive sequences ending at `last`, one event and audit row each.
async fn delete_members<B: Backend>(
    b: &B,
    tx: &mut B::Tx,
    actor: Actor<'_>,
    rows: Vec<MemberRow>,
    last: i64,
    enc: Encoder<'_, MemberRow>,
) -> StoreResult<Vec<Changed<MemberRow>>> {
    let first = last - rows.len() as i64 + 1;
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        let sequence = first + i as i64;
        b.delete_member(tx, &row.channel_id, &row.user_id).await?;
        let payload = enc(&row, sequence);
        b.insert_event(tx, &row.channel_id, sequence, &payload)
            .await?;
        let entity = member_entity(&row.channel_id, &row.user_id);
        let audit = audit_row(actor, "delete", "members", &entity, to_json(&row), None);
        b.insert_audit(tx, &audit).await?;
        out.push(Changed {
            row,
            sequence,
            payload,
        });
    }
    Ok(out)
}

/// A new channel's audit row (with its members' last sequence), then the commit.
async fn commit_new_channel<B: Backend>(
    b: &B,
    mut tx: B::Tx,
    actor: Actor<'_>,
    mut channel: ChannelRow,
    last: i64,
    added: Vec<Changed<MemberRow>>,
) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)> {
    channel.last_sequence = last;
    let audit = audit_row(
        actor,
        "create",
        "channels",
        &channel.id,
        None,
        to_json(&channel),
    );
    b.insert_audit(&mut tx, &audit).await?;
    b.commit(tx).await?;
    Ok((channel, added))
}

/// Inserts a visible attachment, if the uploader still belongs to the live channel (checked
/// after the channel's lock).
async fn insert_attachment_in<B: Backend>(
    b: &B,
    tx: &mut B::Tx,
    actor: Actor<'_>,
    row: &AttachmentRow,
) -> StoreResult<()> {
    b.lock_channel(tx, &row.tenant_id, &row.channel_id).await?;
    if b.member_in(tx, &row.channel_id, &row.uploader_id)
        .await?
        .is_none()
    {
        return Err(StoreError::NotFound);
    }
    b.insert_attachment_row(tx, row).await?;
    let audit = audit_row(actor, "create", "attachments", &row.id, None, to_json(row));
    b.insert_audit(tx, &audit).await
}

/// Takes the next sequence of the message's channel (locking it) and reads the message after
/// the lock, so checks on it see every earlier change. `NotFound` for a deleted message.
async fn lock_message<B: Backend>(
    b: &B,
    tx: &mut B::Tx,
    tenant: &str,
    message_id: &str,
) -> StoreResult<(MessageRow, i64)> {
    let channel_id = b
        .message_channel(tx, tenant, message_id)
        .await?
        .ok_or(StoreError::NotFound)?;
    let sequence = b.bump(tx, tenant, &channel_id, 1).await?;
    let before = b.message_in(tx, message_id).await?;
    if before.delete_time.is_some() {
        return Err(StoreError::NotFound);
    }
    Ok((before, sequence))
}

/// A changed message's event and audit row, then the commit: `locked` is what
/// [`lock_message`] returned (the row before and the change's sequence), `row` the row after.
async fn commit_message_change<B: Backend>(
    b: &B,
    mut tx: B::Tx,
    actor: Actor<'_>,
    operation: &'static str,
    (before, sequence): (MessageRow, i64),
    row: MessageRow,
    enc: Encoder<'_, MessageRow>,
) -> StoreResult<Changed<MessageRow>> {
    let payload = enc(&row, sequence);
    b.insert_event(&mut tx, &row.channel_id, sequence, &payload)
        .await?;
    let audit = audit_row(
        actor,
        operation,
        "messages",
        &row.id,
        to_json(&before),
        to_json(&row),
    );
    b.insert_audit(&mut tx, &audit).await?;
    b.commit(tx).await?;
    Ok(Changed {
        row,
        sequence,
        payload,
    })
}

#[async_trait]
impl<B: Backend> ChannelStore for B {
    async fn create_group(
        &self,
        actor: Actor<'_>,
        channel: ChannelRow,
        members: &[String],
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)> {
        let users = group_members(actor.user_id, members);
        let mut tx = self.begin().await?;
        self.insert_channel(&mut tx, &channel).await?;
        let last = self
            .bump(&mut tx, actor.tenant_id, &channel.id, users.len() as i64)
            .await?;
        let added = insert_members(self, &mut tx, actor, &channel.id, &users, last, enc).await?;
        commit_new_channel(self, tx, actor, channel, last, added).await
    }

    async fn direct_channel(
        &self,
        actor: Actor<'_>,
        peer: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<(ChannelRow, Vec<Changed<MemberRow>>)> {
        let (a, b) = if actor.user_id <= peer {
            (actor.user_id, peer)
        } else {
            (peer, actor.user_id)
        };
        let key = direct_key(actor.tenant_id, a, b);
        if let Some(found) = self.find_direct(actor.tenant_id, &key).await? {
            return Ok((found, Vec::new()));
        }
        let channel = direct_channel_row(actor.tenant_id, key);
        let mut tx = self.begin().await?;
        if !self.insert_direct_channel(&mut tx, &channel).await? {
            // Another call made it first: theirs is the one.
            self.rollback(tx).await?;
            let key = channel.direct_key.as_deref().unwrap_or_default();
            let found = self.find_direct(actor.tenant_id, key).await?;
            return Ok((found.ok_or(StoreError::NotFound)?, Vec::new()));
        }
        let users = [(a.to_owned(), Role::Member), (b.to_owned(), Role::Member)];
        let last = self.bump(&mut tx, actor.tenant_id, &channel.id, 2).await?;
        let added = insert_members(self, &mut tx, actor, &channel.id, &users, last, enc).await?;
        commit_new_channel(self, tx, actor, channel, last, added).await
    }

    async fn find_direct_channel(
        &self,
        actor: Actor<'_>,
        peer: &str,
    ) -> StoreResult<Option<ChannelRow>> {
        let key = direct_key(actor.tenant_id, actor.user_id, peer);
        self.find_direct(actor.tenant_id, &key).await
    }

    async fn channel(&self, tenant: &str, channel_id: &str) -> StoreResult<ChannelRow> {
        Backend::channel(self, tenant, channel_id).await
    }

    async fn update_group(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        patch: GroupPatch,
    ) -> StoreResult<ChannelRow> {
        let mut tx = self.begin().await?;
        let before = self
            .channel_in(&mut tx, actor.tenant_id, channel_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let after = self
            .update_channel(&mut tx, channel_id, &patch, now_micros())
            .await?;
        let audit = audit_row(
            actor,
            "update",
            "channels",
            channel_id,
            to_json(&before),
            to_json(&after),
        );
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(after)
    }

    async fn delete_group(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Vec<Changed<MemberRow>>> {
        let mut tx = self.begin().await?;
        let before = self
            .channel_in(&mut tx, actor.tenant_id, channel_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        // Lock first: a member added concurrently must be seen (and removed) here.
        self.lock_channel(&mut tx, actor.tenant_id, channel_id)
            .await?;
        let rows = self.members_in(&mut tx, channel_id).await?;
        let last = self
            .bump(&mut tx, actor.tenant_id, channel_id, rows.len() as i64)
            .await?;
        let removed = delete_members(self, &mut tx, actor, rows, last, enc).await?;
        self.mark_channel_deleted(&mut tx, channel_id, now_micros())
            .await?;
        let audit = audit_row(
            actor,
            "delete",
            "channels",
            channel_id,
            to_json(&before),
            None,
        );
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(removed)
    }

    async fn list_channels(
        &self,
        tenant: &str,
        user: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<ChannelRow>> {
        Backend::list_channels(self, tenant, user, before, limit).await
    }

    async fn member(
        &self,
        tenant: &str,
        channel_id: &str,
        user: &str,
    ) -> StoreResult<Option<MemberRow>> {
        Backend::member(self, tenant, channel_id, user).await
    }

    async fn last_sequences(
        &self,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        if channel_ids.len() > super::MAX_HEADS_PER_READ {
            return Err(StoreError::Internal(format!(
                "last_sequences: {} ids, at most {} per call",
                channel_ids.len(),
                super::MAX_HEADS_PER_READ
            )));
        }
        Backend::last_sequences(self, channel_ids).await
    }

    async fn channel_heads(
        &self,
        tenant: &str,
        user: &str,
        channel_ids: &[String],
    ) -> StoreResult<Vec<(String, i64)>> {
        Backend::channel_heads(self, tenant, user, channel_ids).await
    }

    async fn memberships(
        &self,
        tenant: &str,
        user: &str,
    ) -> StoreResult<Vec<(ChannelRow, MemberRow)>> {
        let members = self.member_rows_of(tenant, user).await?;
        let channels = self.channels_of(tenant, user).await?;
        let mut by_id: std::collections::HashMap<String, MemberRow> = members
            .into_iter()
            .map(|m| (m.channel_id.clone(), m))
            .collect();
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
        Backend::list_members(self, channel_id, after, limit).await
    }

    async fn add_members(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        users: &[String],
        role: Role,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Vec<Changed<MemberRow>>> {
        let mut tx = self.begin().await?;
        // Lock first, so concurrent calls see each other's members and skip them.
        self.lock_channel(&mut tx, actor.tenant_id, channel_id)
            .await?;
        let existing = self.members_in(&mut tx, channel_id).await?;
        let mut new: Vec<(String, Role)> = Vec::new();
        for u in users {
            if !existing.iter().any(|m| &m.user_id == u) && !new.iter().any(|(n, _)| n == u) {
                new.push((u.clone(), role));
            }
        }
        if new.is_empty() {
            self.rollback(tx).await?;
            return Ok(Vec::new());
        }
        let last = self
            .bump(&mut tx, actor.tenant_id, channel_id, new.len() as i64)
            .await?;
        let added = insert_members(self, &mut tx, actor, channel_id, &new, last, enc).await?;
        self.commit(tx).await?;
        Ok(added)
    }

    async fn remove_member(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        user: &str,
        enc: Encoder<'_, MemberRow>,
    ) -> StoreResult<Changed<MemberRow>> {
        let mut tx = self.begin().await?;
        let last = self.bump(&mut tx, actor.tenant_id, channel_id, 1).await?;
        let row = self
            .member_in(&mut tx, channel_id, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        if row.role() == Role::Owner && self.owners_in(&mut tx, channel_id).await? <= 1 {
            return Err(StoreError::LastOwner);
        }
        let mut removed = delete_members(self, &mut tx, actor, vec![row], last, enc).await?;
        self.commit(tx).await?;
        removed.pop().ok_or(StoreError::NotFound)
    }

    async fn set_role(
        &self,
        actor: Actor<'_>,
        channel_id: &str,
        user: &str,
        role: Role,
    ) -> StoreResult<MemberRow> {
        let mut tx = self.begin().await?;
        self.lock_channel(&mut tx, actor.tenant_id, channel_id)
            .await?;
        let before = self
            .member_in(&mut tx, channel_id, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        if before.role() == Role::Owner
            && role != Role::Owner
            && self.owners_in(&mut tx, channel_id).await? <= 1
        {
            return Err(StoreError::LastOwner);
        }
        let after = self.update_role(&mut tx, channel_id, user, role).await?;
        let entity = member_entity(channel_id, user);
        let audit = audit_row(
            actor,
            "update",
            "members",
            &entity,
            to_json(&before),
            to_json(&after),
        );
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(after)
    }

    async fn owner_count(&self, channel_id: &str) -> StoreResult<i64> {
        Backend::owner_count(self, channel_id).await
    }
}

#[async_trait]
impl<B: Backend> MessageStore for B {
    async fn insert_message(
        &self,
        actor: Actor<'_>,
        msg: NewMessage,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Inserted> {
        if let Some(key) = &msg.client_message_id {
            if let Some(first) = self
                .find_idempotent(&msg.channel_id, actor.user_id, key)
                .await?
            {
                return Ok(Inserted::Existing(first));
            }
        }
        let mut tx = self.begin().await?;
        let sequence = self
            .bump(&mut tx, actor.tenant_id, &msg.channel_id, 1)
            .await?;
        // Checked after the lock, in a statement of its own: on READ COMMITTED it then sees a
        // removal that committed while this send waited for the lock.
        if self
            .member_in(&mut tx, &msg.channel_id, actor.user_id)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound);
        }
        let attachment_ids = msg.attachment_ids.clone();
        let row = new_message_row(actor, msg, sequence);
        match self.insert_message_row(&mut tx, &row).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                // A concurrent send with the same client_message_id won the race.
                self.rollback(tx).await?;
                let key = row.client_message_id.as_deref().unwrap_or_default();
                let first = self
                    .find_idempotent(&row.channel_id, &row.sender_id, key)
                    .await?
                    .ok_or(StoreError::Conflict)?;
                return Ok(Inserted::Existing(first));
            }
            Err(e) => return Err(e),
        }
        for (i, attachment_id) in attachment_ids.iter().enumerate() {
            if !self.link_attachment(&mut tx, &row, attachment_id).await? {
                return Err(StoreError::Unlinkable(i));
            }
            let after = serde_json::json!({ "message_id": row.id }).to_string();
            let audit = audit_row(
                actor,
                "update",
                "attachments",
                attachment_id,
                None,
                Some(after),
            );
            self.insert_audit(&mut tx, &audit).await?;
        }
        let payload = enc(&row, sequence);
        self.insert_event(&mut tx, &row.channel_id, sequence, &payload)
            .await?;
        let audit = audit_row(actor, "create", "messages", &row.id, None, to_json(&row));
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(Inserted::New(row, payload))
    }

    async fn insert_messages(
        &self,
        batch: Vec<BatchMessage>,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Vec<StoreResult<Inserted>>> {
        with_retries(|| self.insert_batch(&batch, enc)).await
    }

    fn write_concurrency(&self) -> usize {
        Backend::write_concurrency(self)
    }

    fn commit_paths(&self) -> CommitPaths {
        Backend::commit_paths(self)
    }

    async fn message(&self, tenant: &str, message_id: &str) -> StoreResult<MessageRow> {
        Backend::message(self, tenant, message_id).await
    }

    async fn list_messages(
        &self,
        viewer: (&str, &str),
        channel_id: &str,
        parent: Option<&str>,
        before_sequence: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<MessageRow>> {
        Backend::list_messages(self, viewer, channel_id, parent, before_sequence, limit).await
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
        Backend::list_messages_encoded(
            self,
            viewer,
            channel_id,
            parent,
            before_sequence,
            limit,
            write_row,
        )
        .await
    }

    async fn update_message(
        &self,
        actor: Actor<'_>,
        message_id: &str,
        patch: MessagePatch,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Changed<MessageRow>> {
        let mut tx = self.begin().await?;
        let (before, sequence) = lock_message(self, &mut tx, actor.tenant_id, message_id).await?;
        if patch.expected_version.is_some_and(|v| v != before.version) {
            return Err(StoreError::Stale);
        }
        let row = self
            .update_message_row(
                &mut tx,
                message_id,
                patch.body.as_deref(),
                patch.subject.as_deref(),
                now_micros(),
            )
            .await?;
        commit_message_change(self, tx, actor, "update", (before, sequence), row, enc).await
    }

    async fn delete_message(
        &self,
        actor: Actor<'_>,
        message_id: &str,
        enc: Encoder<'_, MessageRow>,
    ) -> StoreResult<Changed<MessageRow>> {
        let mut tx = self.begin().await?;
        let (before, sequence) = lock_message(self, &mut tx, actor.tenant_id, message_id).await?;
        let row = self
            .delete_message_row(&mut tx, message_id, now_micros(), actor.user_id)
            .await?;
        commit_message_change(self, tx, actor, "delete", (before, sequence), row, enc).await
    }

    async fn count_messages(&self, channel_id: &str) -> StoreResult<i64> {
        Backend::count_messages(self, channel_id).await
    }
}

#[async_trait]
impl<B: Backend> ReadStateStore for B {
    async fn mark_read(
        &self,
        channel_id: &str,
        user: &str,
        sequence: i64,
    ) -> StoreResult<(i64, bool)> {
        let mut tx = self.begin().await?;
        let moved = self
            .advance_read_marker(&mut tx, channel_id, user, sequence)
            .await?;
        let marker = self
            .read_marker(&mut tx, channel_id, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        self.commit(tx).await?;
        Ok((marker, moved))
    }

    async fn set_favorite(
        &self,
        tenant: &str,
        user: &str,
        message_id: &str,
        favorite: bool,
    ) -> StoreResult<()> {
        Backend::set_favorite(self, tenant, user, message_id, favorite).await
    }

    async fn recipients(&self, msg: &MessageRow) -> StoreResult<Vec<RecipientState>> {
        Ok(self
            .recipient_rows(msg)
            .await?
            .into_iter()
            .map(|(user_id, read_sequence, favorite)| RecipientState {
                read: user_id == msg.sender_id || read_sequence >= msg.sequence,
                favorite,
                user_id,
            })
            .collect())
    }

    async fn unread_counts(&self, tenant: &str, user: &str) -> StoreResult<Vec<(String, i64)>> {
        Backend::unread_counts(self, tenant, user).await
    }
}

#[async_trait]
impl<B: Backend> EventStore for B {
    async fn events(
        &self,
        channel_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> StoreResult<Vec<EventRow>> {
        Backend::events(self, channel_id, after, up_to, limit).await
    }
}

#[async_trait]
impl<B: Backend> AttachmentStore for B {
    async fn insert_attachment(
        &self,
        actor: Actor<'_>,
        row: AttachmentRow,
    ) -> StoreResult<AttachmentRow> {
        let mut tx = self.begin().await?;
        insert_attachment_in(self, &mut tx, actor, &row).await?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn attachment(&self, tenant: &str, id: &str) -> StoreResult<AttachmentRow> {
        Backend::attachment(self, tenant, id).await
    }

    async fn list_attachments(
        &self,
        channel_id: &str,
        message_id: Option<&str>,
        viewer: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AttachmentRow>> {
        Backend::list_attachments(self, channel_id, message_id, viewer, before, limit).await
    }

    async fn delete_attachment(&self, actor: Actor<'_>, id: &str) -> StoreResult<AttachmentRow> {
        let mut tx = self.begin().await?;
        let row = self
            .delete_attachment_row(&mut tx, actor.tenant_id, id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let audit = audit_row(actor, "delete", "attachments", id, to_json(&row), None);
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn unlinked_before(&self, before: i64, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
        Backend::unlinked_before(self, before, limit).await
    }

    async fn attachments_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<AttachmentRow>> {
        Backend::attachments_of_deleted_channels(self, limit).await
    }

    async fn sweep_attachment(&self, id: &str) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let Some(row) = self.delete_swept_attachment(&mut tx, id).await? else {
            return Ok(false);
        };
        let actor = Actor {
            tenant_id: &row.tenant_id,
            user_id: "system:sweep",
        };
        let audit = audit_row(actor, "delete", "attachments", id, to_json(&row), None);
        self.insert_audit(&mut tx, &audit).await?;
        self.commit(tx).await?;
        Ok(true)
    }

    async fn create_upload(
        &self,
        row: UploadRow,
        max_open: i64,
        max_open_bytes: i64,
    ) -> StoreResult<Option<(i64, i64)>> {
        with_retries(|| create_upload_once(self, &row, max_open, max_open_bytes)).await
    }

    async fn upload(&self, tenant: &str, id: &str) -> StoreResult<UploadRow> {
        Backend::upload(self, tenant, id).await
    }

    async fn commit_chunk(&self, id: &str, from: i64, to: i64, key: &str) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        if !self.advance_upload(&mut tx, id, from, to).await? {
            return Ok(false);
        }
        self.insert_chunk(&mut tx, id, from, key).await?;
        self.commit(tx).await?;
        Ok(true)
    }

    async fn chunk_keys(&self, id: &str) -> StoreResult<Vec<String>> {
        Backend::chunk_keys(self, id).await
    }

    async fn complete_upload(
        &self,
        actor: Actor<'_>,
        upload_id: &str,
        row: AttachmentRow,
    ) -> StoreResult<AttachmentRow> {
        let mut tx = self.begin().await?;
        if !self.delete_upload_row(&mut tx, upload_id).await? {
            return Err(StoreError::NotFound);
        }
        self.delete_chunks(&mut tx, upload_id).await?;
        insert_attachment_in(self, &mut tx, actor, &row).await?;
        self.commit(tx).await?;
        Ok(row)
    }

    async fn uploads_of_deleted_channels(&self, limit: i64) -> StoreResult<Vec<UploadRow>> {
        Backend::uploads_of_deleted_channels(self, limit).await
    }

    async fn uploads_before(&self, before: i64, limit: i64) -> StoreResult<Vec<UploadRow>> {
        Backend::uploads_before(self, before, limit).await
    }

    async fn delete_upload(&self, id: &str) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let deleted = self.delete_upload_row(&mut tx, id).await?;
        self.delete_chunks(&mut tx, id).await?;
        self.commit(tx).await?;
        Ok(deleted)
    }

    async fn insert_download(&self, row: DownloadRow) -> StoreResult<()> {
        Backend::insert_download(self, &row).await
    }

    async fn finish_download(&self, id: &str, bytes_sent: i64, completed: bool) -> StoreResult<()> {
        Backend::finish_download(self, id, bytes_sent, completed).await
    }

    async fn list_downloads(
        &self,
        attachment_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DownloadRow>> {
        Backend::list_downloads(self, attachment_id, before, limit).await
    }
}

impl<B: Backend> Store for B {
    fn close(&self) -> BoxFuture<'_, ()> {
        Backend::close(self)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[tokio::test]
    async fn lost_races_are_tried_again_then_reported_unavailable() {
        let calls = Cell::new(0);
        let got = with_retries(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(StoreError::Retry("deadlock".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.ok(), Some(3));

        calls.set(0);
        let got: StoreResult<()> = with_retries(|| {
            calls.set(calls.get() + 1);
            async { Err(StoreError::Retry("deadlock".into())) }
        })
        .await;
        assert!(matches!(got, Err(StoreError::Unavailable(_))), "{got:?}");
        assert_eq!(calls.get(), ATTEMPTS);

        // Any other error is the answer at once.
        calls.set(0);
        let got: StoreResult<()> = with_retries(|| {
            calls.set(calls.get() + 1);
            async { Err(StoreError::Conflict) }
        })
        .await;
        assert!(matches!(got, Err(StoreError::Conflict)));
        assert_eq!(calls.get(), 1);
    }
}
