//! `chat.v1.AttachmentService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::domain::Chat;
use crate::error::Error;
use crate::proto::attachment_service_server::AttachmentService;
use crate::proto::upload_attachment_request::Data;
use crate::proto::*;

use super::unary;

/// The AttachmentService implementation.
#[derive(Debug, Clone)]
pub struct AttachmentApi {
    chat: Arc<Chat>,
    /// How long a unary call may run (`UNARY_TIMEOUT_SECONDS`).
    unary_timeout: std::time::Duration,
}

impl AttachmentApi {
    /// Serves the given use cases; unary calls answer `DEADLINE_EXCEEDED` after
    /// `unary_timeout`.
    pub fn new(chat: Arc<Chat>, unary_timeout: std::time::Duration) -> AttachmentApi {
        AttachmentApi {
            chat,
            unary_timeout,
        }
    }
}

type Download = Pin<Box<dyn Stream<Item = Result<DownloadAttachmentResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AttachmentService for AttachmentApi {
    async fn upload_attachment(
        &self,
        req: Request<Streaming<UploadAttachmentRequest>>,
    ) -> Result<Response<UploadAttachmentResponse>, Status> {
        let caller = super::caller(&req)?;
        let open = crate::metrics::stream_open(crate::metrics::StreamKind::Upload);
        let mut frames = req.into_inner();
        let meta = match frames
            .message()
            .await
            .map_err(|s| super::oversize(&s).unwrap_or(s))?
        {
            Some(UploadAttachmentRequest {
                data: Some(Data::Metadata(m)),
            }) => m,
            _ => {
                return Err(
                    Error::invalid("metadata", "the first frame must hold the metadata").into(),
                )
            }
        };
        let chunks = frames
            .map(|frame| match frame {
                Ok(UploadAttachmentRequest {
                    data: Some(Data::Chunk(b)),
                }) => Ok(b),
                Ok(_) => Err(Error::invalid(
                    "chunk",
                    "only the first frame holds metadata; later frames hold chunks",
                )),
                Err(s) if super::oversize(&s).is_some() => Err(Error::ResourceExhausted(format!(
                    "a frame is over the limit of {} bytes",
                    crate::server::MAX_FRAME_BYTES
                ))),
                Err(s) => Err(Error::invalid(
                    "chunk",
                    format!("the upload stream broke: {}", s.message()),
                )),
            })
            .boxed();
        // In a task of its own, so a cancelled call still aborts its multipart upload.
        let chat = self.chat.clone();
        let out = tokio::spawn(crate::telemetry::in_request(async move {
            let _open = open;
            chat.upload_attachment(&caller, meta, chunks).await
        }))
        .await
        .map_err(|e| Status::from(Error::Internal(e.to_string())))??;
        Ok(Response::new(out))
    }
    async fn create_upload(
        &self,
        req: Request<CreateUploadRequest>,
    ) -> Result<Response<CreateUploadResponse>, Status> {
        unary!(self, req, create_upload)
    }
    async fn upload_chunk(
        &self,
        req: Request<UploadChunkRequest>,
    ) -> Result<Response<UploadChunkResponse>, Status> {
        unary!(self, req, upload_chunk)
    }
    async fn complete_upload(
        &self,
        req: Request<CompleteUploadRequest>,
    ) -> Result<Response<CompleteUploadResponse>, Status> {
        unary!(self, req, complete_upload, no_deadline)
    }

    async fn cancel_upload(
        &self,
        req: Request<CancelUploadRequest>,
    ) -> Result<Response<CancelUploadResponse>, Status> {
        unary!(self, req, cancel_upload)
    }

    type DownloadAttachmentStream = Download;

    async fn download_attachment(
        &self,
        req: Request<DownloadAttachmentRequest>,
    ) -> Result<Response<Self::DownloadAttachmentStream>, Status> {
        let caller = super::caller(&req)?;
        let rx = self
            .chat
            .download_attachment(&caller, req.into_inner())
            .await?;
        let stream = ReceiverStream::new(rx).map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }
    async fn get_attachment(
        &self,
        req: Request<GetAttachmentRequest>,
    ) -> Result<Response<GetAttachmentResponse>, Status> {
        unary!(self, req, get_attachment)
    }
    async fn list_attachments(
        &self,
        req: Request<ListAttachmentsRequest>,
    ) -> Result<Response<ListAttachmentsResponse>, Status> {
        unary!(self, req, list_attachments)
    }
    async fn delete_attachment(
        &self,
        req: Request<DeleteAttachmentRequest>,
    ) -> Result<Response<DeleteAttachmentResponse>, Status> {
        unary!(self, req, delete_attachment)
    }
    async fn list_attachment_downloads(
        &self,
        req: Request<ListAttachmentDownloadsRequest>,
    ) -> Result<Response<ListAttachmentDownloadsResponse>, Status> {
        unary!(self, req, list_attachment_downloads)
    }
}
