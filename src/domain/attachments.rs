//! AttachmentService use cases: streamed and resumable uploads, audited downloads, the sweep.
//!
//! Bytes go to blob storage as they arrive (memory stays at a few multipart parts whatever the
//! file size) while the server computes their SHA-256. A failed or cancelled upload aborts its
//! multipart upload, so nothing is left behind. An attachment is visible to its uploader alone
//! until a message links it, then to every member of the channel; once that message is deleted
//! it is no longer served.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::{Caller, Permission};
use crate::blob::{BlobError, BlobWriter};
use crate::error::{Error, Result};
use crate::proto::{self, download_attachment_response::Data};
use crate::store::{now_micros, AttachmentRow, DownloadRow, StoreError, UploadRow};

use super::convert::timestamp;
use super::validate::{self, Check};
use super::{policy, Chat};

/// Largest chunk in one upload frame or UploadChunk call: 1 MiB.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest chunk in a download frame.
const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;

impl From<BlobError> for Error {
    fn from(e: BlobError) -> Self {
        match e {
            // Deleted meanwhile (DeleteAttachment, the sweep, a concurrent CompleteUpload).
            BlobError::NotFound(_) => Error::not_found("the bytes are gone (deleted meanwhile)"),
            BlobError::Unavailable(m) => Error::Unavailable(m),
        }
    }
}

/// A stored attachment as the API shows it.
pub fn attachment(a: &AttachmentRow) -> proto::Attachment {
    proto::Attachment {
        id: a.id.clone(),
        channel_id: a.channel_id.clone(),
        message_id: a.message_id.clone().unwrap_or_default(),
        uploader_id: a.uploader_id.clone(),
        file_name: a.file_name.clone(),
        content_type: a.content_type.clone(),
        size_bytes: a.size_bytes,
        sha256: a.sha256.clone(),
        create_time: Some(timestamp(a.create_time)),
    }
}

fn blob_key(attachment_id: &str) -> String {
    format!("a/{attachment_id}")
}

fn chunk_prefix(upload_id: &str) -> String {
    format!("u/{upload_id}/")
}

/// Counts bytes on their way to a writer (which hashes them).
struct Sink {
    writer: BlobWriter,
    written: i64,
}

impl Sink {
    async fn write(&mut self, bytes: Bytes) -> Result<()> {
        self.written += bytes.len() as i64;
        self.writer.write(bytes).await?;
        Ok(())
    }
}

impl Chat {
    fn check_size(&self, size: i64) -> Result<()> {
        if size > self.settings.max_upload_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the file is {size} bytes; MAX_UPLOAD_BYTES is {}",
                self.settings.max_upload_bytes
            )));
        }
        Ok(())
    }
    /// Checks what the stream brought against what was declared, then completes the object.
    /// A refusal of the content is `Error::Invalid`; anything else is a storage failure.
    async fn finish_sink(sink: Sink, size: i64, sha256: &str) -> Result<String> {
        if sink.written != size {
            // Known without flushing anything.
            if let Err(abort) = sink.writer.abort().await {
                tracing::warn!(error = %abort, "aborting a refused upload failed");
            }
            return Err(Error::invalid(
                "metadata.size_bytes",
                format!("declared {size} bytes, received {}", sink.written),
            ));
        }
        let closed = sink.writer.close().await?;
        let digest = closed.sha256().to_owned();
        if !sha256.is_empty() && !sha256.eq_ignore_ascii_case(&digest) {
            if let Err(abort) = closed.abort().await {
                tracing::warn!(error = %abort, "aborting a refused upload failed");
            }
            return Err(Error::invalid(
                "metadata.sha256",
                format!("declared {sha256}, the content hashes to {digest}"),
            ));
        }
        closed.commit().await?;
        Ok(digest)
    }

    /// UploadAttachment: `chunks` are the frames after the metadata frame.
    /// Key: CreateAttachmentFile.
    pub async fn upload_attachment(
        self: &Arc<Self>,
        caller: &Caller,
        meta: proto::AttachmentMetadata,
        mut chunks: BoxStream<'static, Result<Bytes>>,
    ) -> Result<proto::UploadAttachmentResponse> {
        caller.require(Permission::CreateAttachmentFile)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        let content_type = validate::attachment_metadata(&mut c, "metadata", &meta);
        c.done()?;
        self.check_size(meta.size_bytes)?;
        self.membership(caller, &meta.channel_id).await?;
        let _in_flight = self.limits.start_streamed_upload(caller, meta.size_bytes)?;
        let id = Uuid::now_v7().to_string();
        let key = blob_key(&id);
        let mut sink = Sink {
            writer: self.blobs.writer(&key).await?,
            written: 0,
        };
        let streamed: Result<()> = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                if chunk.len() > MAX_CHUNK_BYTES {
                    return Err(Error::invalid(
                        "chunk",
                        format!("at most {MAX_CHUNK_BYTES} bytes per frame"),
                    ));
                }
                let total = sink.written + chunk.len() as i64;
                self.check_size(total)?;
                if total > meta.size_bytes {
                    return Err(Error::invalid(
                        "metadata.size_bytes",
                        format!("declared {} bytes, received more", meta.size_bytes),
                    ));
                }
                let n = chunk.len();
                sink.write(chunk).await?;
                crate::metrics::upload_bytes(n);
            }
            Ok(())
        }
        .await;
        if let Err(e) = streamed {
            if let Err(abort) = sink.writer.abort().await {
                tracing::warn!(error = %abort, key, "aborting a failed upload failed");
            }
            return Err(e);
        }
        let sha256 = match Self::finish_sink(sink, meta.size_bytes, &meta.sha256).await {
            Ok(s) => s,
            Err(e) => {
                // The key is this call's alone: whatever a failed commit left under it goes.
                if !matches!(e, Error::Invalid(_)) {
                    if let Err(d) = self.blobs.delete(&key).await {
                        tracing::warn!(error = %d, key, "could not delete the blob of a failed upload");
                    }
                }
                return Err(e);
            }
        };
        let row = AttachmentRow {
            id,
            tenant_id: caller.tenant_id.clone(),
            channel_id: meta.channel_id,
            message_id: None,
            uploader_id: caller.user_id.clone(),
            file_name: meta.file_name,
            content_type,
            size_bytes: meta.size_bytes,
            sha256,
            storage_key: key.clone(),
            create_time: now_micros(),
        };
        match self.store.insert_attachment(Self::actor(caller), row).await {
            Ok(row) => Ok(proto::UploadAttachmentResponse {
                attachment: Some(attachment(&row)),
            }),
            Err(e) => {
                if let Err(d) = self.blobs.delete(&key).await {
                    tracing::warn!(error = %d, key, "could not delete the blob of a refused upload");
                }
                Err(match e {
                    StoreError::NotFound => Error::not_found("channel (the uploader left it)"),
                    e => e.into(),
                })
            }
        }
    }

    /// CreateUpload. Key: CreateAttachmentFile.
    pub async fn create_upload(
        &self,
        caller: &Caller,
        req: proto::CreateUploadRequest,
    ) -> Result<proto::CreateUploadResponse> {
        caller.require(Permission::CreateAttachmentFile)?;
        self.limits.write(caller)?;
        let meta = req.metadata.unwrap_or_default();
        let mut c = Check::new();
        let content_type = validate::attachment_metadata(&mut c, "metadata", &meta);
        c.done()?;
        self.check_size(meta.size_bytes)?;
        self.membership(caller, &meta.channel_id).await?;
        let row = UploadRow {
            id: Uuid::now_v7().to_string(),
            tenant_id: caller.tenant_id.clone(),
            channel_id: meta.channel_id,
            uploader_id: caller.user_id.clone(),
            file_name: meta.file_name,
            content_type,
            size_bytes: meta.size_bytes,
            sha256: meta.sha256.to_ascii_lowercase(),
            committed_bytes: 0,
            create_time: now_micros(),
        };
        let limits = *self.limits.settings();
        let declared = row.size_bytes;
        if let Some((open, bytes)) = self
            .store
            .create_upload(
                row.clone(),
                i64::from(limits.unfinished_uploads),
                limits.unfinished_upload_bytes,
            )
            .await?
        {
            // The store applied the same rule; this names the limit that was reached.
            self.limits.check_uploads(open, bytes, declared)?;
            return Err(Error::Internal(format!(
                "the store refused an upload the limits admit ({open} open, {bytes} bytes)"
            )));
        }
        Ok(proto::CreateUploadResponse { upload_id: row.id })
    }

    /// The caller's own upload, or `NOT_FOUND`.
    async fn own_upload(&self, caller: &Caller, upload_id: &str) -> Result<UploadRow> {
        let nf = || Error::not_found(format!("upload {upload_id}"));
        let up = self
            .store
            .upload(&caller.tenant_id, upload_id)
            .await
            .map_err(|e| Error::or_not_found(e, nf))?;
        if up.uploader_id != caller.user_id {
            return Err(nf());
        }
        Ok(up)
    }

    /// UploadChunk. Key: CreateAttachmentFile.
    pub async fn upload_chunk(
        &self,
        caller: &Caller,
        req: proto::UploadChunkRequest,
    ) -> Result<proto::UploadChunkResponse> {
        caller.require(Permission::CreateAttachmentFile)?;
        // No write token per chunk: a 100 MiB upload is 100 chunks, and its bytes are bounded
        // by the upload quota and MAX_UPLOAD_BYTES already (CreateUpload takes the token).
        let mut c = Check::new();
        c.id("upload_id", &req.upload_id);
        if req.chunk.is_empty() {
            c.fail("chunk", "required: 1 byte to 1 MiB");
        } else if req.chunk.len() > MAX_CHUNK_BYTES {
            c.fail("chunk", format!("at most {MAX_CHUNK_BYTES} bytes"));
        }
        if req.offset < 0 {
            c.fail("offset", "must not be negative");
        }
        c.done()?;
        let up = self.own_upload(caller, &req.upload_id).await?;
        // Only members write into a channel's storage: a member removed since CreateUpload
        // stops here, not only at CompleteUpload.
        self.membership(caller, &up.channel_id).await?;
        if req.offset != up.committed_bytes {
            return Err(Error::OffsetMismatch {
                offset: req.offset,
                committed: up.committed_bytes,
            });
        }
        let end = up.committed_bytes + req.chunk.len() as i64;
        self.check_size(end)?;
        if end > up.size_bytes {
            return Err(Error::invalid(
                "chunk",
                format!(
                    "the upload declared {} bytes; this chunk ends at {end}",
                    up.size_bytes
                ),
            ));
        } // Every attempt writes an object of its own; the one that wins the compare-and-set on
          // the committed size is recorded, so a slow retry can never replace a committed chunk.
        let key = format!(
            "{}{:020}-{}",
            chunk_prefix(&up.id),
            req.offset,
            Uuid::new_v4().simple()
        );
        self.blobs.put(&key, req.chunk).await?;
        if !self
            .store
            .commit_chunk(&up.id, req.offset, end, &key)
            .await?
        {
            if let Err(e) = self.blobs.delete(&key).await {
                tracing::warn!(error = %e, key, "could not delete a losing chunk attempt");
            }
            let now = self.own_upload(caller, &req.upload_id).await?;
            return Err(Error::OffsetMismatch {
                offset: req.offset,
                committed: now.committed_bytes,
            });
        }
        crate::metrics::upload_bytes((end - req.offset) as usize);
        Ok(proto::UploadChunkResponse {
            committed_bytes: end,
        })
    }
    /// CancelUpload: the caller's own upload, row and chunks, deleted; it stops counting
    /// against the caller's unfinished uploads. Key: CreateAttachmentFile.
    ///
    /// Errors: `INVALID_ARGUMENT` (a malformed id), `NOT_FOUND` (unknown, or another user's).
    pub async fn cancel_upload(
        &self,
        caller: &Caller,
        req: proto::CancelUploadRequest,
    ) -> Result<proto::CancelUploadResponse> {
        caller.require(Permission::CreateAttachmentFile)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("upload_id", &req.upload_id);
        c.done()?;
        let up = self.own_upload(caller, &req.upload_id).await?;
        self.discard_upload(&up).await?;
        Ok(proto::CancelUploadResponse {})
    }

    /// Deletes an upload: the row first (so no chunk can commit after), then every object
    /// under its prefix (committed chunks and stray attempts alike). False when its row was
    /// gone already (another node's sweep, or a cancel, got there first); the objects are
    /// deleted all the same.
    async fn discard_upload(&self, up: &UploadRow) -> Result<bool> {
        let deleted = self.store.delete_upload(&up.id).await?;
        self.delete_chunks(&up.id).await;
        Ok(deleted)
    }

    /// Best effort: the upload's row is gone, so a leftover object is only wasted space.
    async fn delete_chunks(&self, upload_id: &str) {
        let keys = match self.blobs.list(&chunk_prefix(upload_id)).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, upload_id, "could not list upload chunks to delete");
                return;
            }
        };
        for key in keys {
            if let Err(e) = self.blobs.delete(&key).await {
                tracing::warn!(error = %e, key, "could not delete an upload chunk");
            }
        }
    }

    /// The attachment a completed upload became (its id is the upload's), for retries.
    async fn completed_upload(
        &self,
        caller: &Caller,
        upload_id: &str,
    ) -> Result<Option<proto::CompleteUploadResponse>> {
        match self.store.attachment(&caller.tenant_id, upload_id).await {
            Ok(a) if a.uploader_id == caller.user_id => Ok(Some(proto::CompleteUploadResponse {
                attachment: Some(attachment(&a)),
            })),
            Ok(_) | Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// CompleteUpload: checks size and SHA-256 and makes the attachment visible.
    /// Key: CreateAttachmentFile.
    pub async fn complete_upload(
        &self,
        caller: &Caller,
        req: proto::CompleteUploadRequest,
    ) -> Result<proto::CompleteUploadResponse> {
        caller.require(Permission::CreateAttachmentFile)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("upload_id", &req.upload_id);
        c.done()?;
        let up = match self.own_upload(caller, &req.upload_id).await {
            Ok(up) => up,
            // A retry after success: the same answer again.
            Err(Error::NotFound(m)) => {
                return self
                    .completed_upload(caller, &req.upload_id)
                    .await?
                    .ok_or(Error::NotFound(m));
            }
            Err(e) => return Err(e),
        };
        if up.committed_bytes != up.size_bytes {
            return Err(Error::FailedPrecondition(format!(
                "the upload holds {} of its {} bytes; send the rest first",
                up.committed_bytes, up.size_bytes
            )));
        } // The attachment takes the upload's id, so a retried or concurrent CompleteUpload finds
          // the attachment the first one made.
        let id = up.id.clone();
        let key = blob_key(&id);
        let mut sink = Sink {
            writer: self.blobs.writer(&key).await?,
            written: 0,
        };
        let copied: Result<()> = async {
            for chunk_key in self.store.chunk_keys(&up.id).await? {
                let mut bytes = self.blobs.read(&chunk_key, 0).await?;
                while let Some(b) = bytes.next().await {
                    sink.write(b?).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            if let Err(abort) = sink.writer.abort().await {
                tracing::warn!(error = %abort, "aborting a failed completion failed");
            }
            // A concurrent CompleteUpload may have finished it (and removed the chunks).
            return match self.completed_upload(caller, &up.id).await? {
                Some(done) => Ok(done),
                None => Err(e),
            };
        }
        let sha256 = match Self::finish_sink(sink, up.size_bytes, &up.sha256).await {
            Ok(s) => s,
            Err(e @ Error::Invalid(_)) => {
                // Wrong content: nothing is kept.
                self.discard_upload(&up).await?;
                return Err(e);
            }
            // Storage failed: keep the upload, so the client can retry CompleteUpload.
            Err(e) => return Err(e),
        };
        let row = AttachmentRow {
            id,
            tenant_id: up.tenant_id.clone(),
            channel_id: up.channel_id.clone(),
            message_id: None,
            uploader_id: up.uploader_id.clone(),
            file_name: up.file_name.clone(),
            content_type: up.content_type.clone(),
            size_bytes: up.size_bytes,
            sha256,
            storage_key: key.clone(),
            create_time: now_micros(),
        };
        let row = match self
            .store
            .complete_upload(Self::actor(caller), &up.id, row)
            .await
        {
            Ok(row) => row,
            // Completed concurrently: the same object was written, the other call recorded it.
            Err(StoreError::NotFound) => {
                return self
                    .completed_upload(caller, &up.id)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("upload {}", up.id)));
            }
            Err(e) => {
                // A concurrent CompleteUpload may have committed the same key and its row.
                if let Ok(Some(done)) = self.completed_upload(caller, &up.id).await {
                    return Ok(done);
                }
                if let Err(d) = self.blobs.delete(&key).await {
                    tracing::warn!(error = %d, key, "could not delete the blob of a failed completion");
                }
                return Err(e.into());
            }
        };
        self.delete_chunks(&up.id).await;
        Ok(proto::CompleteUploadResponse {
            attachment: Some(attachment(&row)),
        })
    }

    /// An attachment the caller may see: a member of its channel, and either its uploader or
    /// the attachment is linked to a message that is not deleted. Otherwise `NOT_FOUND`.
    async fn visible_attachment(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(AttachmentRow, crate::store::MemberRow)> {
        self.attachment_for(caller, id, false).await
    }

    /// As [`Chat::visible_attachment`]; with `managing`, attachments of deleted messages are
    /// included, so their uploader or a manager can still delete them or see their downloads.
    async fn attachment_for(
        &self,
        caller: &Caller,
        id: &str,
        managing: bool,
    ) -> Result<(AttachmentRow, crate::store::MemberRow)> {
        let nf = || Error::not_found(format!("attachment {id}"));
        let a = self
            .store
            .attachment(&caller.tenant_id, id)
            .await
            .map_err(|e| Error::or_not_found(e, nf))?;
        let member = self
            .membership(caller, &a.channel_id)
            .await
            .map_err(|e| match e {
                Error::NotFound(_) => nf(),
                e => e,
            })?;
        match &a.message_id {
            None if a.uploader_id != caller.user_id => return Err(nf()),
            None => {}
            Some(m) => {
                let msg = self.store.message(&caller.tenant_id, m).await?;
                if msg.delete_time.is_some() && !managing {
                    return Err(nf());
                }
            }
        }
        Ok((a, member))
    }

    /// GetAttachment. Key: ViewAttachmentFile.
    pub async fn get_attachment(
        &self,
        caller: &Caller,
        req: proto::GetAttachmentRequest,
    ) -> Result<proto::GetAttachmentResponse> {
        caller.require(Permission::ViewAttachmentFile)?;
        let mut c = Check::new();
        c.id("attachment_id", &req.attachment_id);
        c.done()?;
        let (a, _) = self.visible_attachment(caller, &req.attachment_id).await?;
        Ok(proto::GetAttachmentResponse {
            attachment: Some(attachment(&a)),
        })
    }

    /// ListAttachments: by channel or by message, newest first. Key: ViewAttachmentFile.
    pub async fn list_attachments(
        &self,
        caller: &Caller,
        req: proto::ListAttachmentsRequest,
    ) -> Result<proto::ListAttachmentsResponse> {
        caller.require(Permission::ViewAttachmentFile)?;
        let mut c = Check::new();
        match (req.channel_id.is_empty(), req.message_id.is_empty()) {
            (true, true) => c.fail("channel_id", "set channel_id or message_id"),
            (false, false) => c.fail("message_id", "set channel_id or message_id, not both"),
            (false, true) => c.id("channel_id", &req.channel_id),
            (true, false) => c.id("message_id", &req.message_id),
        }
        let size = c.page_size("page_size", req.page_size);
        c.done()?;
        let (channel_id, message_id) = if req.message_id.is_empty() {
            self.membership(caller, &req.channel_id).await?;
            (req.channel_id.clone(), None)
        } else {
            let msg = self.visible_message(caller, &req.message_id).await?;
            if msg.delete_time.is_some() {
                return Err(Error::not_found(format!("message {}", req.message_id)));
            }
            (msg.channel_id, Some(req.message_id.clone()))
        };
        let scope = format!("attachments/{}/{}", req.channel_id, req.message_id);
        let before = validate::decode_id_page_token(&req.page_token, &scope)?;
        let mut rows = self
            .store
            .list_attachments(
                &channel_id,
                message_id.as_deref(),
                &caller.user_id,
                before.as_deref(),
                size + 1,
            )
            .await?;
        let next_page_token = validate::finish_page(&mut rows, size, &scope, |a| a.id.clone());
        let out = rows.iter().map(attachment).collect();
        Ok(proto::ListAttachmentsResponse {
            attachments: out,
            next_page_token,
        })
    }

    /// DeleteAttachment: the uploader, or an OWNER / ADMIN; the blob is removed.
    /// Key: DeleteAttachmentFile.
    pub async fn delete_attachment(
        &self,
        caller: &Caller,
        req: proto::DeleteAttachmentRequest,
    ) -> Result<proto::DeleteAttachmentResponse> {
        caller.require(Permission::DeleteAttachmentFile)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("attachment_id", &req.attachment_id);
        c.done()?;
        let (a, member) = self
            .attachment_for(caller, &req.attachment_id, true)
            .await?;
        if a.uploader_id != caller.user_id {
            policy::require_manager(&member)?;
        }
        let row = self
            .store
            .delete_attachment(Self::actor(caller), &a.id)
            .await?;
        // The row is gone, so the blob is unreachable; a failure here only wastes space.
        if let Err(e) = self.blobs.delete(&row.storage_key).await {
            tracing::warn!(error = %e, key = row.storage_key, "could not delete an attachment's blob");
        }
        Ok(proto::DeleteAttachmentResponse {})
    }

    /// ListAttachmentDownloads: the uploader, or an OWNER / ADMIN. Key: ViewAttachmentFile.
    pub async fn list_attachment_downloads(
        &self,
        caller: &Caller,
        req: proto::ListAttachmentDownloadsRequest,
    ) -> Result<proto::ListAttachmentDownloadsResponse> {
        caller.require(Permission::ViewAttachmentFile)?;
        let mut c = Check::new();
        c.id("attachment_id", &req.attachment_id);
        let size = c.page_size("page_size", req.page_size);
        c.done()?;
        let (a, member) = self
            .attachment_for(caller, &req.attachment_id, true)
            .await?;
        if a.uploader_id != caller.user_id {
            policy::require_manager(&member)?;
        }
        let scope = format!("downloads/{}", a.id);
        let before = validate::decode_id_page_token(&req.page_token, &scope)?;
        let mut rows = self
            .store
            .list_downloads(&a.id, before.as_deref(), size + 1)
            .await?;
        let next_page_token = validate::finish_page(&mut rows, size, &scope, |r| r.id.clone());
        Ok(proto::ListAttachmentDownloadsResponse {
            downloads: rows
                .iter()
                .map(|d| proto::DownloadRecord {
                    attachment_id: d.attachment_id.clone(),
                    user_id: d.user_id.clone(),
                    download_time: Some(timestamp(d.download_time)),
                    bytes_sent: d.bytes_sent,
                    completed: d.completed != 0,
                })
                .collect(),
            next_page_token,
        })
    }

    /// DownloadAttachment: metadata frame, then data from `offset`. Every call writes a download
    /// record, updated when the download ends, also when the client stops midway.
    /// Key: ViewAttachmentFile.
    pub async fn download_attachment(
        self: &Arc<Self>,
        caller: &Caller,
        req: proto::DownloadAttachmentRequest,
    ) -> Result<mpsc::Receiver<Result<proto::DownloadAttachmentResponse>>> {
        caller.require(Permission::ViewAttachmentFile)?;
        let mut c = Check::new();
        c.id("attachment_id", &req.attachment_id);
        if req.offset < 0 {
            c.fail("offset", "must not be negative");
        }
        c.done()?;
        let (a, _) = self.visible_attachment(caller, &req.attachment_id).await?;
        if req.offset > a.size_bytes {
            return Err(Error::OutOfRange(format!(
                "offset {} is beyond the size {}",
                req.offset, a.size_bytes
            )));
        }
        let record = DownloadRow {
            id: Uuid::now_v7().to_string(),
            tenant_id: caller.tenant_id.clone(),
            attachment_id: a.id.clone(),
            user_id: caller.user_id.clone(),
            download_time: now_micros(),
            bytes_sent: 0,
            completed: 0,
        };
        self.store.insert_download(record.clone()).await?;
        let mut data = if req.offset < a.size_bytes {
            Some(self.blobs.read(&a.storage_key, req.offset as u64).await?)
        } else {
            None
        };
        // One frame of slack: "bytes sent" then lags what the client took by little.
        let (tx, rx) = mpsc::channel(1);
        let chat = self.clone();
        tokio::spawn(crate::telemetry::in_request(async move {
            let _open = crate::metrics::stream_open(crate::metrics::StreamKind::Download);
            let mut sent: i64 = 0;
            let head = proto::DownloadAttachmentResponse {
                data: Some(Data::Attachment(attachment(&a))),
            };
            let mut ok = tx.send(Ok(head)).await.is_ok();
            let mut buf = BytesMut::new();
            if let Some(stream) = data.as_mut() {
                while ok {
                    let next = stream.next().await;
                    let flush = match &next {
                        Some(Ok(b)) => {
                            buf.extend_from_slice(b);
                            buf.len() >= DOWNLOAD_CHUNK_BYTES
                        }
                        Some(Err(_)) | None => true,
                    };
                    while flush && !buf.is_empty() && ok {
                        let part = buf.split_to(buf.len().min(DOWNLOAD_CHUNK_BYTES)).freeze();
                        let n = part.len() as i64;
                        ok = tx
                            .send(Ok(proto::DownloadAttachmentResponse {
                                data: Some(Data::Chunk(part)),
                            }))
                            .await
                            .is_ok();
                        if ok {
                            sent += n;
                            crate::metrics::download_bytes(n as usize);
                        }
                    }
                    match next {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e.into())).await;
                            break;
                        }
                        None => break,
                    }
                }
            }
            let completed = ok && req.offset + sent == a.size_bytes;
            if let Err(e) = chat
                .store
                .finish_download(&record.id, sent, completed)
                .await
            {
                tracing::error!(error = %e, download = %record.id, "could not finish the download record");
            }
        }));
        Ok(rx)
    }

    /// Deletes unlinked attachments and unfinished uploads created before `before`
    /// (microseconds since the epoch), and every attachment and upload of a deleted group
    /// whatever its age,
    /// in batches until none is left, then on local disk the staging files of writes
    /// interrupted before then (a killed server's). One item that fails is logged and skipped,
    /// so it cannot stall the rest. Returns how many attachments and uploads were removed.
    pub async fn sweep(&self, before: i64) -> Result<(usize, usize)> {
        const BATCH: i64 = 500;
        let mut attachments = 0;
        for of_deleted_groups in [true, false] {
            attachments += self
                .sweep_attachments(before, of_deleted_groups, BATCH)
                .await?;
        }
        let mut uploads = 0;
        for of_deleted_groups in [true, false] {
            uploads += self.sweep_uploads(before, of_deleted_groups, BATCH).await?;
        }
        let cutoff = std::time::UNIX_EPOCH + std::time::Duration::from_micros(before.max(0) as u64);
        let staging = self.blobs.remove_stale_staging(cutoff).await;
        if staging > 0 {
            tracing::info!(
                files = staging,
                "sweep: removed staging files of interrupted writes"
            );
        }
        Ok((attachments, uploads))
    }

    /// One kind of the sweep's unfinished uploads (those created before `before`, or those of
    /// deleted groups), row then chunks, in batches. Returns how many went.
    async fn sweep_uploads(
        &self,
        before: i64,
        of_deleted_groups: bool,
        batch_size: i64,
    ) -> Result<usize> {
        let mut uploads = 0;
        loop {
            let batch = if of_deleted_groups {
                self.store.uploads_of_deleted_channels(batch_size).await?
            } else {
                self.store.uploads_before(before, batch_size).await?
            };
            let mut progressed = false;
            for up in &batch {
                match self.discard_upload(up).await {
                    Ok(true) => {
                        progressed = true;
                        uploads += 1;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, id = up.id, "sweep: could not delete an upload")
                    }
                }
            }
            if (batch.len() as i64) < batch_size || !progressed {
                return Ok(uploads);
            }
        }
    }

    /// One kind of the sweep's attachments (unlinked ones created before `before`, or those of
    /// deleted groups), rows first (audited), then bytes, in batches. Returns how many went.
    async fn sweep_attachments(
        &self,
        before: i64,
        of_deleted_groups: bool,
        batch_size: i64,
    ) -> Result<usize> {
        let mut swept = 0;
        loop {
            let batch = if of_deleted_groups {
                self.store
                    .attachments_of_deleted_channels(batch_size)
                    .await?
            } else {
                self.store.unlinked_before(before, batch_size).await?
            };
            let mut progressed = false;
            for a in &batch {
                match self.store.sweep_attachment(&a.id).await {
                    Ok(true) => {
                        progressed = true;
                        swept += 1;
                        if let Err(e) = self.blobs.delete(&a.storage_key).await {
                            tracing::warn!(error = %e, key = a.storage_key, "sweep: could not delete a blob");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, id = a.id, "sweep: could not delete an attachment")
                    }
                }
            }
            if (batch.len() as i64) < batch_size || !progressed {
                return Ok(swept);
            }
        }
    }
}
