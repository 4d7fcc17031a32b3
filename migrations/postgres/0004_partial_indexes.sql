-- Fewer index entries written per sent message: only replies are listed by thread, and only
-- keyed sends are looked up by key. A query's `parent_message_id = $n` or
-- `client_message_id = $n` implies IS NOT NULL (the operator is strict), so PostgreSQL still
-- uses these indexes for it, generic plans included. Key uniqueness is unchanged (NULLs never
-- collided).
--
-- Upgrading: this rebuilds both indexes inside the migration's transaction, and DROP INDEX
-- holds an exclusive lock on `messages` until it commits, so sends and reads of messages wait
-- meanwhile. On a large database run `chat-service migrate` in a quiet moment, before the new
-- servers start (`serve --no-migrate`).
DROP INDEX messages_by_thread;
CREATE INDEX messages_by_thread ON messages (channel_id, parent_message_id, sequence)
    WHERE parent_message_id IS NOT NULL;
DROP INDEX messages_idempotency;
CREATE UNIQUE INDEX messages_idempotency ON messages (channel_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
