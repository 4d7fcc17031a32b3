-- Attachments: resumable uploads in progress, and the download audit.

-- A resumable upload (CreateUpload / UploadChunk / CompleteUpload). Its bytes are stored as one
-- object per chunk under u/<id>/ (see upload_chunks); committed_bytes says how many count.
CREATE TABLE uploads (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    channel_id      TEXT NOT NULL REFERENCES channels (id),
    uploader_id     TEXT NOT NULL,
    file_name       TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    sha256          TEXT NOT NULL DEFAULT '',
    committed_bytes BIGINT NOT NULL DEFAULT 0,
    create_time     BIGINT NOT NULL
);
CREATE INDEX uploads_by_time ON uploads (create_time);

-- The committed chunk of each offset. Every attempt writes its own object, and the one whose
-- compare-and-set on committed_bytes wins is recorded here, so a slow retry can never replace
-- a committed chunk.
CREATE TABLE upload_chunks (
    upload_id   TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,
    storage_key TEXT NOT NULL,
    PRIMARY KEY (upload_id, byte_offset)
);

-- One row per DownloadAttachment call: who, when, how much, whether it reached the end.
CREATE TABLE attachment_downloads (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    attachment_id TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    download_time BIGINT NOT NULL,
    bytes_sent    BIGINT NOT NULL DEFAULT 0,
    completed     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX attachment_downloads_by_attachment ON attachment_downloads (attachment_id, id);

CREATE INDEX attachments_unlinked ON attachments (create_time) WHERE message_id IS NULL;
