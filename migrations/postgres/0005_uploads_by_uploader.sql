-- Unfinished uploads per uploader, for the per-user upload quota (CreateUpload).
CREATE INDEX uploads_by_uploader ON uploads (tenant_id, uploader_id);
