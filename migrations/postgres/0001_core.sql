-- Core schema: channels, members, messages, the per-channel event log, favourites,
-- attachments (declared now, served from the attachments issue on), and the audit log.
-- Times are microseconds since the Unix epoch; ids are UUID text.

CREATE TABLE channels (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('group', 'direct')),
    name          TEXT NOT NULL DEFAULT '',
    description   TEXT NOT NULL DEFAULT '',
    channel_type  TEXT NOT NULL DEFAULT '',
    -- "tenant\nlow-user\nhigh-user" for direct channels: one per pair per tenant.
    direct_key    TEXT UNIQUE,
    last_sequence BIGINT NOT NULL DEFAULT 0,
    create_time   BIGINT NOT NULL,
    update_time   BIGINT NOT NULL,
    delete_time   BIGINT
);

CREATE TABLE members (
    channel_id    TEXT NOT NULL REFERENCES channels (id),
    tenant_id     TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    join_time     BIGINT NOT NULL,
    -- Sequence of the MemberAdded event: a feed that discovers the channel starts there.
    join_sequence BIGINT NOT NULL,
    -- The read marker: highest sequence this member has read.
    read_sequence BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX members_by_user ON members (tenant_id, user_id, channel_id);

CREATE TABLE messages (
    id                        TEXT PRIMARY KEY,
    tenant_id                 TEXT NOT NULL,
    channel_id                TEXT NOT NULL REFERENCES channels (id),
    sender_id                 TEXT NOT NULL,
    body                      TEXT NOT NULL,
    subject                   TEXT NOT NULL DEFAULT '',
    parent_message_id         TEXT,
    attachment_ids            TEXT NOT NULL DEFAULT '[]',
    client_message_id         TEXT,
    forwarded_from_message_id TEXT,
    sequence                  BIGINT NOT NULL,
    version                   BIGINT NOT NULL DEFAULT 1,
    create_time               BIGINT NOT NULL,
    update_time               BIGINT,
    delete_time               BIGINT,
    deleted_by                TEXT
);
CREATE UNIQUE INDEX messages_by_sequence ON messages (channel_id, sequence);
CREATE INDEX messages_by_thread ON messages (channel_id, parent_message_id, sequence);
CREATE UNIQUE INDEX messages_idempotency ON messages (channel_id, sender_id, client_message_id);

-- Every sequenced event of a channel, as the encoded chat.v1.SubscribeResponse: feeds resume
-- from here byte for byte.
CREATE TABLE events (
    channel_id TEXT NOT NULL,
    sequence   BIGINT NOT NULL,
    payload    BYTEA NOT NULL,
    PRIMARY KEY (channel_id, sequence)
);

CREATE TABLE favorites (
    tenant_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    message_id  TEXT NOT NULL REFERENCES messages (id),
    create_time BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id)
);

CREATE TABLE attachments (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL,
    channel_id   TEXT NOT NULL REFERENCES channels (id),
    message_id   TEXT,
    uploader_id  TEXT NOT NULL,
    file_name    TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes   BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    storage_key  TEXT NOT NULL,
    create_time  BIGINT NOT NULL
);
CREATE INDEX attachments_by_channel ON attachments (channel_id, id);
CREATE INDEX attachments_by_message ON attachments (message_id);

CREATE TABLE audit_logs (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    operation   TEXT NOT NULL,
    table_name  TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    actor_id    TEXT NOT NULL,
    before_json TEXT,
    after_json  TEXT,
    create_time BIGINT NOT NULL
);
CREATE INDEX audit_logs_by_entity ON audit_logs (tenant_id, table_name, entity_id);
