//! `chat.v1.ChatService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::domain::Chat;
use crate::proto::chat_service_server::ChatService;
use crate::proto::*;

use super::unary;

/// The ChatService implementation.
#[derive(Debug, Clone)]
pub struct ChatApi {
    chat: Arc<Chat>,
    /// How long a unary call may run (`UNARY_TIMEOUT_SECONDS`).
    unary_timeout: std::time::Duration,
}

impl ChatApi {
    /// Serves the given use cases; unary calls answer `DEADLINE_EXCEEDED` after
    /// `unary_timeout`.
    pub fn new(chat: Arc<Chat>, unary_timeout: std::time::Duration) -> ChatApi {
        ChatApi {
            chat,
            unary_timeout,
        }
    }
}

type Feed = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ChatService for ChatApi {
    async fn send_message(
        &self,
        req: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        unary!(self, req, send_message)
    }
    async fn get_message(
        &self,
        req: Request<GetMessageRequest>,
    ) -> Result<Response<GetMessageResponse>, Status> {
        unary!(self, req, get_message)
    }
    async fn list_messages(
        &self,
        req: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        unary!(self, req, list_messages)
    }
    async fn update_message(
        &self,
        req: Request<UpdateMessageRequest>,
    ) -> Result<Response<UpdateMessageResponse>, Status> {
        unary!(self, req, update_message)
    }
    async fn delete_message(
        &self,
        req: Request<DeleteMessageRequest>,
    ) -> Result<Response<DeleteMessageResponse>, Status> {
        unary!(self, req, delete_message)
    }
    async fn forward_message(
        &self,
        req: Request<ForwardMessageRequest>,
    ) -> Result<Response<ForwardMessageResponse>, Status> {
        unary!(self, req, forward_message)
    }
    async fn mark_read(
        &self,
        req: Request<MarkReadRequest>,
    ) -> Result<Response<MarkReadResponse>, Status> {
        unary!(self, req, mark_read)
    }
    async fn list_message_recipients(
        &self,
        req: Request<ListMessageRecipientsRequest>,
    ) -> Result<Response<ListMessageRecipientsResponse>, Status> {
        unary!(self, req, list_message_recipients)
    }
    async fn set_favorite(
        &self,
        req: Request<SetFavoriteRequest>,
    ) -> Result<Response<SetFavoriteResponse>, Status> {
        unary!(self, req, set_favorite)
    }
    async fn get_unread_counts(
        &self,
        req: Request<GetUnreadCountsRequest>,
    ) -> Result<Response<GetUnreadCountsResponse>, Status> {
        unary!(self, req, get_unread_counts)
    }
    async fn count_messages(
        &self,
        req: Request<CountMessagesRequest>,
    ) -> Result<Response<CountMessagesResponse>, Status> {
        unary!(self, req, count_messages)
    }

    type SubscribeStream = Feed;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = super::caller(&req)?;
        let feed = self.chat.subscribe(caller, req.into_inner()).await?;
        // What is ready is encoded back to back into one DATA frame (tonic gathers items until
        // the stream is pending or its yield threshold is reached).
        Ok(Response::new(Box::pin(
            feed.map(|item| item.map_err(Status::from)),
        )))
    }
}
