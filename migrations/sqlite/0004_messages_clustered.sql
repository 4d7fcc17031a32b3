-- Messages clustered on (channel_id, sequence), as the event log has been since 0003.
--
-- Before, `messages` was a rowid table with two unique indexes beside it: one on `id` (the
-- primary key) and `messages_by_sequence`. A history page walked `messages_by_sequence` and
-- then descended the table's B-tree once per row, and every send wrote a page of all three
-- B-trees. Now the table is one B-tree in history order: a page is one range scan, and a send
-- writes two B-trees (the table and the index on `id`).
--
-- `favorites` refers to `messages (id)` and foreign keys are on; sqlx runs every migration in
-- a transaction, where `PRAGMA foreign_keys` cannot be changed. So `favorites` is rebuilt too,
-- first referring to the new table: dropping the old `messages` then leaves no row referring
-- to it, and the renames carry the reference over to the final names. Definitions and indexes
-- are otherwise unchanged.

CREATE TABLE messages_clustered (
    id                        TEXT NOT NULL UNIQUE,
    tenant_id                 TEXT NOT NULL,
    channel_id                TEXT NOT NULL REFERENCES channels (id),
    sender_id                 TEXT NOT NULL,
    body                      TEXT NOT NULL,
    subject                   TEXT NOT NULL DEFAULT '',
    parent_message_id         TEXT,
    attachment_ids            TEXT NOT NULL DEFAULT '[]',
    client_message_id         TEXT,
    forwarded_from_message_id TEXT,
    sequence                  INTEGER NOT NULL,
    version                   INTEGER NOT NULL DEFAULT 1,
    create_time               INTEGER NOT NULL,
    update_time               INTEGER,
    delete_time               INTEGER,
    deleted_by                TEXT,
    PRIMARY KEY (channel_id, sequence)
) WITHOUT ROWID;
INSERT INTO messages_clustered (
    id, tenant_id, channel_id, sender_id, body, subject, parent_message_id, attachment_ids,
    client_message_id, forwarded_from_message_id, sequence, version, create_time, update_time,
    delete_time, deleted_by)
SELECT
    id, tenant_id, channel_id, sender_id, body, subject, parent_message_id, attachment_ids,
    client_message_id, forwarded_from_message_id, sequence, version, create_time, update_time,
    delete_time, deleted_by
FROM messages;

CREATE TABLE favorites_rebuilt (
    tenant_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    message_id  TEXT NOT NULL REFERENCES messages_clustered (id),
    create_time INTEGER NOT NULL,
    PRIMARY KEY (message_id, user_id)
);
INSERT INTO favorites_rebuilt (tenant_id, user_id, message_id, create_time)
    SELECT tenant_id, user_id, message_id, create_time FROM favorites;

DROP TABLE favorites;
DROP TABLE messages;
ALTER TABLE messages_clustered RENAME TO messages;
ALTER TABLE favorites_rebuilt RENAME TO favorites;

CREATE INDEX messages_by_thread ON messages (channel_id, parent_message_id, sequence)
    WHERE parent_message_id IS NOT NULL;
CREATE UNIQUE INDEX messages_idempotency ON messages (channel_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
