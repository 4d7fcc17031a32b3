-- Indexes for the limits and sweeps of chat-service 0.1's operating work:
-- unfinished uploads per uploader, for the per-user upload quota (CreateUpload);
CREATE INDEX uploads_by_uploader ON uploads (tenant_id, uploader_id);
-- deleted groups, whose attachments the sweep removes.
CREATE INDEX channels_deleted ON channels (id) WHERE delete_time IS NOT NULL;
