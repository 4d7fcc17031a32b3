-- The whole schema for MySQL 8.0+ and MariaDB 10.6+: the tables, columns and indexes that
-- migrations/postgres/0001..0005 build up, in one step, plus `upload_locks`. PostgreSQL's
-- group-commit function (0003) has no counterpart here, and its partial indexes are full ones.
-- Times are microseconds since the Unix epoch (BIGINT); ids are UUID text (VARCHAR(36)).
--
-- Text is utf8mb4 (every Unicode scalar value, 4-byte emoji included) with the binary
-- collation utf8mb4_bin set on every table, so text comes back byte for byte and compares by
-- code point. utf8mb4_bin is a PAD SPACE collation, though: it compares 'bob' and 'bob ' as
-- equal, in WHERE clauses and in unique keys alike. Tenant ids, user ids, client_message_id
-- and direct_key are identities that SQLite and PostgreSQL compare exactly, and a user or
-- tenant may end in a space, so those columns are VARBINARY: UTF-8 bytes, compared byte for
-- byte with nothing ignored, on MySQL and MariaDB alike. Their lengths are byte limits, the
-- same as the service's (255 bytes for user and tenant ids, 100 for client_message_id).
--
-- Column sizes hold every value the service accepts (src/domain/validate.rs):
--   VARCHAR(n) counts characters (Unicode scalar values), as the service counts names (100),
--   descriptions (1000), channel types (100), subjects (200) and file names (255);
--   bodies (at most 32 KiB) are MEDIUMTEXT; audit JSON is MEDIUMTEXT, as a 32 KiB body of
--   control characters becomes about 192 KiB of JSON escapes; an event is MEDIUMBLOB (16 MiB;
--   the largest, a whole message, is about 40 KiB).
-- Row format DYNAMIC allows index keys of up to 3072 bytes.

CREATE TABLE channels (
    id            VARCHAR(36) NOT NULL,
    tenant_id     VARBINARY(255) NOT NULL,
    kind          VARCHAR(6) NOT NULL,
    name          VARCHAR(100) NOT NULL DEFAULT '',
    description   VARCHAR(1000) NOT NULL DEFAULT '',
    channel_type  VARCHAR(100) NOT NULL DEFAULT '',
    -- "tenant\nlow-user\nhigh-user" for direct channels: one per pair per tenant
    -- (255 + 1 + 255 + 1 + 255 bytes).
    direct_key    VARBINARY(767) NULL,
    last_sequence BIGINT NOT NULL DEFAULT 0,
    create_time   BIGINT NOT NULL,
    update_time   BIGINT NOT NULL,
    delete_time   BIGINT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY channels_direct_key (direct_key),
    -- Deleted groups, whose attachments and uploads the sweep removes.
    KEY channels_deleted (delete_time),
    CONSTRAINT channels_kind CHECK (kind IN ('group', 'direct'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

CREATE TABLE members (
    channel_id    VARCHAR(36) NOT NULL,
    tenant_id     VARBINARY(255) NOT NULL,
    user_id       VARBINARY(255) NOT NULL,
    role          VARCHAR(6) NOT NULL,
    join_time     BIGINT NOT NULL,
    -- Sequence of the MemberAdded event: a feed that discovers the channel starts there.
    join_sequence BIGINT NOT NULL,
    -- The read marker: highest sequence this member has read.
    read_sequence BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel_id, user_id),
    KEY members_by_user (tenant_id, user_id, channel_id),
    CONSTRAINT members_channel FOREIGN KEY (channel_id) REFERENCES channels (id),
    CONSTRAINT members_role CHECK (role IN ('owner', 'admin', 'member'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

CREATE TABLE messages (
    id                        VARCHAR(36) NOT NULL,
    tenant_id                 VARBINARY(255) NOT NULL,
    channel_id                VARCHAR(36) NOT NULL,
    sender_id                 VARBINARY(255) NOT NULL,
    body                      MEDIUMTEXT NOT NULL,
    subject                   VARCHAR(200) NOT NULL DEFAULT '',
    parent_message_id         VARCHAR(36) NULL,
    -- JSON array of at most 32 attachment ids (about 1.3 KB).
    attachment_ids            VARCHAR(2048) NOT NULL DEFAULT '[]',
    client_message_id         VARBINARY(100) NULL,
    forwarded_from_message_id VARCHAR(36) NULL,
    sequence                  BIGINT NOT NULL,
    version                   BIGINT NOT NULL DEFAULT 1,
    create_time               BIGINT NOT NULL,
    update_time               BIGINT NULL,
    delete_time               BIGINT NULL,
    deleted_by                VARBINARY(255) NULL,
    PRIMARY KEY (id),
    UNIQUE KEY messages_by_sequence (channel_id, sequence),
    KEY messages_by_thread (channel_id, parent_message_id, sequence),
    -- NULL keys never collide in a unique index, as in PostgreSQL.
    UNIQUE KEY messages_idempotency (channel_id, sender_id, client_message_id),
    CONSTRAINT messages_channel FOREIGN KEY (channel_id) REFERENCES channels (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

-- Every sequenced event of a channel, as the encoded chat.v1.SubscribeResponse: feeds resume
-- from here byte for byte.
CREATE TABLE events (
    channel_id VARCHAR(36) NOT NULL,
    sequence   BIGINT NOT NULL,
    payload    MEDIUMBLOB NOT NULL,
    PRIMARY KEY (channel_id, sequence)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

CREATE TABLE favorites (
    tenant_id   VARBINARY(255) NOT NULL,
    user_id     VARBINARY(255) NOT NULL,
    message_id  VARCHAR(36) NOT NULL,
    create_time BIGINT NOT NULL,
    PRIMARY KEY (message_id, user_id),
    CONSTRAINT favorites_message FOREIGN KEY (message_id) REFERENCES messages (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

CREATE TABLE attachments (
    id           VARCHAR(36) NOT NULL,
    tenant_id    VARBINARY(255) NOT NULL,
    channel_id   VARCHAR(36) NOT NULL,
    message_id   VARCHAR(36) NULL,
    uploader_id  VARBINARY(255) NOT NULL,
    file_name    VARCHAR(255) NOT NULL,
    content_type VARCHAR(255) NOT NULL,
    size_bytes   BIGINT NOT NULL,
    sha256       VARCHAR(64) NOT NULL,
    storage_key  TEXT NOT NULL,
    create_time  BIGINT NOT NULL,
    PRIMARY KEY (id),
    KEY attachments_by_channel (channel_id, id),
    -- A message's attachments (message_id = ?), and the unlinked ones by age for the sweep
    -- (message_id IS NULL AND create_time < ?): PostgreSQL's attachments_by_message and
    -- partial attachments_unlinked in one index.
    KEY attachments_unlinked (message_id, create_time),
    CONSTRAINT attachments_channel FOREIGN KEY (channel_id) REFERENCES channels (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

CREATE TABLE audit_logs (
    id          VARCHAR(36) NOT NULL,
    tenant_id   VARBINARY(255) NOT NULL,
    operation   VARCHAR(16) NOT NULL,
    table_name  VARCHAR(64) NOT NULL,
    -- A row id, or "channel-id/user-id" for members (36 + 1 + 255 bytes).
    entity_id   VARBINARY(512) NOT NULL,
    -- A user id, or "system:sweep".
    actor_id    VARBINARY(255) NOT NULL,
    before_json MEDIUMTEXT NULL,
    after_json  MEDIUMTEXT NULL,
    create_time BIGINT NOT NULL,
    PRIMARY KEY (id),
    KEY audit_logs_by_entity (tenant_id, table_name, entity_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

-- A resumable upload (CreateUpload / UploadChunk / CompleteUpload). Its bytes are stored as one
-- object per chunk under u/<id>/ (see upload_chunks); committed_bytes says how many count.
CREATE TABLE uploads (
    id              VARCHAR(36) NOT NULL,
    tenant_id       VARBINARY(255) NOT NULL,
    channel_id      VARCHAR(36) NOT NULL,
    uploader_id     VARBINARY(255) NOT NULL,
    file_name       VARCHAR(255) NOT NULL,
    content_type    VARCHAR(255) NOT NULL,
    size_bytes      BIGINT NOT NULL,
    sha256          VARCHAR(64) NOT NULL DEFAULT '',
    committed_bytes BIGINT NOT NULL DEFAULT 0,
    create_time     BIGINT NOT NULL,
    PRIMARY KEY (id),
    KEY uploads_by_time (create_time),
    -- Unfinished uploads per uploader, for the per-user upload quota (CreateUpload).
    KEY uploads_by_uploader (tenant_id, uploader_id),
    CONSTRAINT uploads_channel FOREIGN KEY (channel_id) REFERENCES channels (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

-- The committed chunk of each offset. Every attempt writes its own object, and the one whose
-- compare-and-set on committed_bytes wins is recorded here, so a slow retry can never replace
-- a committed chunk.
CREATE TABLE upload_chunks (
    upload_id   VARCHAR(36) NOT NULL,
    byte_offset BIGINT NOT NULL,
    storage_key TEXT NOT NULL,
    PRIMARY KEY (upload_id, byte_offset)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

-- One row per uploader, locked to serialize that uploader's CreateUpload quota checks: an
-- INSERT ... ON DUPLICATE KEY UPDATE of the row holds its lock until the transaction ends, so
-- concurrent calls count the uploader's unfinished uploads one after another.
CREATE TABLE upload_locks (
    tenant_id   VARBINARY(255) NOT NULL,
    uploader_id VARBINARY(255) NOT NULL,
    PRIMARY KEY (tenant_id, uploader_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;

-- One row per DownloadAttachment call: who, when, how much, whether it reached the end.
CREATE TABLE attachment_downloads (
    id            VARCHAR(36) NOT NULL,
    tenant_id     VARBINARY(255) NOT NULL,
    attachment_id VARCHAR(36) NOT NULL,
    user_id       VARBINARY(255) NOT NULL,
    download_time BIGINT NOT NULL,
    bytes_sent    BIGINT NOT NULL DEFAULT 0,
    completed     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    KEY attachment_downloads_by_attachment (attachment_id, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin ROW_FORMAT=DYNAMIC;
