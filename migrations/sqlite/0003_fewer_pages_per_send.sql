-- Fewer B-tree pages written per sent message. With WAL, every commit writes each page it
-- changed in full (4 KiB), and a batch of sends to different channels changes a page per
-- channel in every index keyed by channel. Before this migration that was four per channel
-- (messages_by_sequence, messages_by_thread, messages_idempotency, and the index behind
-- events' primary key, besides events' own rowid table); now it is two.

-- Only replies are listed by thread, and only keyed sends are looked up by key: a query's
-- `parent_message_id = ?` or `client_message_id = ?` implies IS NOT NULL, so SQLite still
-- uses these indexes for it. The uniqueness of a key is unchanged (NULLs never collided).
DROP INDEX messages_by_thread;
CREATE INDEX messages_by_thread ON messages (channel_id, parent_message_id, sequence)
    WHERE parent_message_id IS NOT NULL;
DROP INDEX messages_idempotency;
CREATE UNIQUE INDEX messages_idempotency ON messages (channel_id, sender_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

-- The event log clustered on its key: one B-tree instead of a rowid table plus an index.
CREATE TABLE events_clustered (
    channel_id TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    payload    BLOB NOT NULL,
    PRIMARY KEY (channel_id, sequence)
) WITHOUT ROWID;
INSERT INTO events_clustered (channel_id, sequence, payload)
    SELECT channel_id, sequence, payload FROM events;
DROP TABLE events;
ALTER TABLE events_clustered RENAME TO events;
