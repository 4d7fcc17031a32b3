//! ChatService use cases (everything but the live feed).

use prost::Message as _;

use crate::auth::{Caller, Permission};
use crate::error::{Error, Result};
use crate::fanout::LiveEvent;
use crate::page::EncodedMessages;
use crate::proto::{self, subscribe_response::Event};
use crate::store::{BatchMessage, Inserted, MessageRow, NewMessage};

use super::validate::{self, Check};
use super::{convert, encode_member_added, encode_message_event, policy, Chat, MessageEvent};

impl Chat {
    /// Resolves the target of a send or forward: a channel the caller belongs to, or the direct
    /// channel with `recipient_id`. A direct channel that does not exist yet is made (and
    /// announced) only after `before_create` accepts the request, so a refused request makes
    /// nothing.
    async fn target_channel(
        &self,
        caller: &Caller,
        channel_id: &str,
        recipient_id: &str,
        before_create: impl FnOnce() -> Result<()>,
    ) -> Result<String> {
        if recipient_id.is_empty() {
            self.membership(caller, channel_id).await?;
            return Ok(channel_id.to_owned());
        }
        if let Some(ch) = self
            .store
            .find_direct_channel(Self::actor(caller), recipient_id)
            .await?
        {
            return Ok(ch.id);
        }
        before_create()?;
        let (channel, added) = self
            .store
            .direct_channel(Self::actor(caller), recipient_id, &encode_member_added)
            .await?;
        self.publish_members(&caller.tenant_id, &added, true);
        Ok(channel.id)
    }

    fn check_target(c: &mut Check, caller: &Caller, channel_id: &str, recipient_id: &str) {
        match (channel_id.is_empty(), recipient_id.is_empty()) {
            (true, true) => c.fail("channel_id", "set channel_id or recipient_id"),
            (false, false) => c.fail("recipient_id", "set channel_id or recipient_id, not both"),
            (false, true) => c.id("channel_id", channel_id),
            (true, false) => {
                c.user_id("recipient_id", recipient_id);
                if recipient_id == caller.user_id {
                    c.fail("recipient_id", "must not be the caller");
                }
            }
        }
    }

    async fn insert(&self, caller: &Caller, msg: NewMessage) -> Result<MessageRow> {
        if msg.attachment_ids.is_empty() {
            // The common case goes through group commit, which also publishes. NOT_FOUND
            // (no such channel, or not a member) names the channel, as the membership read does.
            let channel = msg.channel_id.clone();
            let inserted = self
                .sends()
                .send(BatchMessage {
                    tenant_id: caller.tenant_id.clone(),
                    user_id: caller.user_id.clone(),
                    msg,
                })
                .await
                .map_err(|e| {
                    Error::or_not_found(e, || Error::not_found(format!("channel {channel}")))
                })?;
            return Ok(match inserted {
                Inserted::New(row, _) | Inserted::Existing(row) => row,
            });
        }
        // Messages that link attachments take the single-message path (it locks them too).
        let inserted = self
            .store
            .insert_message(Self::actor(caller), msg, &|row, seq| {
                encode_message_event(MessageEvent::Created, row, seq)
            })
            .await?;
        Ok(match inserted {
            Inserted::New(row, payload) => {
                self.publish(
                    &caller.tenant_id,
                    &row.channel_id,
                    row.sequence,
                    &payload,
                    None,
                );
                row
            }
            Inserted::Existing(row) => row,
        })
    }

    /// SendMessage. Key: CreateMessage.
    pub async fn send_message(
        &self,
        caller: &Caller,
        req: proto::SendMessageRequest,
    ) -> Result<proto::SendMessageResponse> {
        caller.require(Permission::CreateMessage)?;
        self.limits.send(caller)?;
        let mut c = Check::new();
        Self::check_target(&mut c, caller, &req.channel_id, &req.recipient_id);
        c.body("body", &req.body, !req.attachment_ids.is_empty());
        c.text("subject", &req.subject, validate::MAX_SUBJECT_CHARS, false);
        c.opt_id("parent_message_id", &req.parent_message_id);
        if req.attachment_ids.len() > validate::MAX_ATTACHMENTS {
            c.fail(
                "attachment_ids",
                format!("at most {} attachments", validate::MAX_ATTACHMENTS),
            );
        }
        for (i, a) in req.attachment_ids.iter().enumerate() {
            c.id(&format!("attachment_ids[{i}]"), a);
        }
        if req.client_message_id.len() > validate::MAX_CLIENT_MESSAGE_ID_BYTES {
            c.fail(
                "client_message_id",
                format!("at most {} bytes", validate::MAX_CLIENT_MESSAGE_ID_BYTES),
            );
        } else if req.client_message_id.contains('\0') {
            c.fail("client_message_id", "must not contain NUL characters");
        }
        c.done()?;
        let plain = req.recipient_id.is_empty()
            && req.parent_message_id.is_empty()
            && req.attachment_ids.is_empty();
        let channel_id = if plain {
            // Group commit checks membership itself, under the channel lock (NOT_FOUND for a
            // non-member, as here): reading it first would only add a query per send.
            req.channel_id.clone()
        } else {
            self
                // A new direct channel holds no message to reply to and no attachment to link.
                .target_channel(caller, &req.channel_id, &req.recipient_id, || {
                    if !req.parent_message_id.is_empty() {
                        Err(Error::invalid(
                            "parent_message_id",
                            "no such message in this channel",
                        ))
                    } else if !req.attachment_ids.is_empty() {
                        Err(crate::store::StoreError::Unlinkable(0).into())
                    } else {
                        Ok(())
                    }
                })
                .await?
        };
        if !req.parent_message_id.is_empty() {
            let parent = match self
                .store
                .message(&caller.tenant_id, &req.parent_message_id)
                .await
            {
                Ok(p) => Some(p).filter(|p| p.channel_id == channel_id && p.delete_time.is_none()),
                Err(crate::store::StoreError::NotFound) => None,
                Err(e) => return Err(e.into()),
            };
            if parent.is_none() {
                return Err(Error::invalid(
                    "parent_message_id",
                    "no such message in this channel",
                ));
            }
        }
        let row = self
            .insert(
                caller,
                NewMessage {
                    channel_id,
                    body: req.body,
                    subject: req.subject,
                    parent_message_id: non_empty(req.parent_message_id),
                    attachment_ids: req.attachment_ids,
                    client_message_id: non_empty(req.client_message_id),
                    forwarded_from_message_id: None,
                },
            )
            .await?;
        Ok(proto::SendMessageResponse {
            message: Some(convert::message(&row)),
        })
    }

    /// GetMessage. Key: ViewMessage.
    pub async fn get_message(
        &self,
        caller: &Caller,
        req: proto::GetMessageRequest,
    ) -> Result<proto::GetMessageResponse> {
        caller.require(Permission::ViewMessage)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        c.done()?;
        let msg = self.visible_message(caller, &req.message_id).await?;
        Ok(proto::GetMessageResponse {
            message: Some(convert::message(&msg)),
        })
    }

    /// ListMessages: newest first, keyset pages on the sequence. Key: ViewMessage.
    pub async fn list_messages(
        &self,
        caller: &Caller,
        req: proto::ListMessagesRequest,
    ) -> Result<proto::ListMessagesResponse> {
        caller.require(Permission::ViewMessage)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.opt_id("parent_message_id", &req.parent_message_id);
        let size = c.page_size("page_size", req.page_size);
        c.done()?;
        let scope = format!("messages/{}/{}", req.channel_id, req.parent_message_id);
        let before = validate::decode_sequence_page_token(&req.page_token, &scope)?;
        let parent = non_empty(req.parent_message_id);
        let viewer = (caller.tenant_id.as_str(), caller.user_id.as_str());
        let mut page: EncodedMessages = self
            .store
            .list_messages_encoded(
                viewer,
                &req.channel_id,
                parent.as_deref(),
                before,
                size + 1,
                crate::page::write_message,
            )
            .await?
            .into();
        if page.is_empty() {
            // No messages, or not the caller's channel: only the latter is an error.
            self.membership(caller, &req.channel_id).await?;
        }
        let mut next_page_token = String::new();
        if page.len() as i64 > size {
            page.truncate(size as usize);
            if let Some(last) = page.last_sequence() {
                next_page_token = validate::encode_page_token(&scope, &last.to_string());
            }
        }
        Ok(proto::ListMessagesResponse {
            next_page_token,
            encoded_messages: page,
            ..Default::default()
        })
    }

    /// UpdateMessage: sender only, by `update_mask`, optional etag. Key: UpdateMessage.
    pub async fn update_message(
        &self,
        caller: &Caller,
        req: proto::UpdateMessageRequest,
    ) -> Result<proto::UpdateMessageResponse> {
        caller.require(Permission::UpdateMessage)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        let patch = validate::message_patch(&mut c, &req);
        c.done()?;
        let msg = self.visible_message(caller, &req.message_id).await?;
        if msg.delete_time.is_some() {
            return Err(Error::not_found(format!("message {}", req.message_id)));
        }
        policy::may_edit(&caller.user_id, &msg)?;
        if let Some(body) = &patch.body {
            let mut c = Check::new();
            let attachments: Vec<String> =
                serde_json::from_str(&msg.attachment_ids).unwrap_or_default();
            c.body("body", body, !attachments.is_empty());
            c.done()?;
        }
        let changed = self
            .store
            .update_message(Self::actor(caller), &req.message_id, patch, &|row, seq| {
                encode_message_event(MessageEvent::Updated, row, seq)
            })
            .await?;
        self.publish(
            &caller.tenant_id,
            &changed.row.channel_id,
            changed.sequence,
            &changed.payload,
            None,
        );
        Ok(proto::UpdateMessageResponse {
            message: Some(convert::message(&changed.row)),
        })
    }

    /// DeleteMessage: soft delete by the sender or an OWNER / ADMIN. Key: DeleteMessage.
    pub async fn delete_message(
        &self,
        caller: &Caller,
        req: proto::DeleteMessageRequest,
    ) -> Result<proto::DeleteMessageResponse> {
        caller.require(Permission::DeleteMessage)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        c.done()?;
        let msg = self.visible_message(caller, &req.message_id).await?;
        if msg.delete_time.is_some() {
            return Err(Error::not_found(format!("message {}", req.message_id)));
        }
        let member = self.membership(caller, &msg.channel_id).await?;
        policy::may_delete(&member, &msg)?;
        let changed = self
            .store
            .delete_message(Self::actor(caller), &req.message_id, &|row, seq| {
                encode_message_event(MessageEvent::Deleted, row, seq)
            })
            .await?;
        self.publish(
            &caller.tenant_id,
            &changed.row.channel_id,
            changed.sequence,
            &changed.payload,
            None,
        );
        Ok(proto::DeleteMessageResponse {})
    }

    /// ForwardMessage: copies body and subject into another channel or to a user.
    /// Key: CreateMessage.
    pub async fn forward_message(
        &self,
        caller: &Caller,
        req: proto::ForwardMessageRequest,
    ) -> Result<proto::ForwardMessageResponse> {
        caller.require(Permission::CreateMessage)?;
        self.limits.send(caller)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        Self::check_target(&mut c, caller, &req.channel_id, &req.recipient_id);
        c.done()?;
        let source = self.visible_message(caller, &req.message_id).await?;
        if source.delete_time.is_some() {
            return Err(Error::not_found(format!("message {}", req.message_id)));
        }
        if source.body.is_empty() {
            return Err(Error::FailedPrecondition(
                "the message has no text to forward".into(),
            ));
        }
        let channel_id = self
            .target_channel(caller, &req.channel_id, &req.recipient_id, || Ok(()))
            .await?;
        let row = self
            .insert(
                caller,
                NewMessage {
                    channel_id,
                    body: source.body,
                    subject: source.subject,
                    parent_message_id: None,
                    attachment_ids: Vec::new(),
                    client_message_id: None,
                    forwarded_from_message_id: Some(source.id),
                },
            )
            .await?;
        Ok(proto::ForwardMessageResponse {
            message: Some(convert::message(&row)),
        })
    }

    /// MarkRead: moves the read marker forward. Key: UpdateMessageRecipient.
    pub async fn mark_read(
        &self,
        caller: &Caller,
        req: proto::MarkReadRequest,
    ) -> Result<proto::MarkReadResponse> {
        caller.require(Permission::UpdateMessageRecipient)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        if req.sequence < 1 {
            c.fail("sequence", "must be at least 1");
        }
        c.done()?;
        let (channel, _) = self.channel_as_member(caller, &req.channel_id).await?;
        if req.sequence > channel.last_sequence {
            return Err(Error::invalid(
                "sequence",
                format!(
                    "beyond the channel's last sequence {}",
                    channel.last_sequence
                ),
            ));
        }
        let (marker, moved) = self
            .store
            .mark_read(&req.channel_id, &caller.user_id, req.sequence)
            .await?;
        if !moved {
            // Nothing changed: no event for every subscriber of the channel.
            return Ok(proto::MarkReadResponse {
                read_sequence: marker,
            });
        }
        self.publisher.publish(std::sync::Arc::new(LiveEvent {
            tenant_id: caller.tenant_id.clone(),
            channel_id: req.channel_id.clone(),
            sequence: 0,
            encoded: proto::SubscribeResponse::new(
                req.channel_id.clone(),
                0,
                Event::ReadMarkerUpdated(proto::ReadMarkerUpdated {
                    user_id: caller.user_id.clone(),
                    read_sequence: marker,
                }),
            )
            .encode_to_vec()
            .into(),
            membership: None,
        }));
        Ok(proto::MarkReadResponse {
            read_sequence: marker,
        })
    }

    /// ListMessageRecipients. Key: ViewMessageRecipient.
    pub async fn list_message_recipients(
        &self,
        caller: &Caller,
        req: proto::ListMessageRecipientsRequest,
    ) -> Result<proto::ListMessageRecipientsResponse> {
        caller.require(Permission::ViewMessageRecipient)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        c.done()?;
        let msg = self.visible_message(caller, &req.message_id).await?;
        let recipients = self.store.recipients(&msg).await?;
        Ok(proto::ListMessageRecipientsResponse {
            recipients: recipients
                .into_iter()
                .map(|r| proto::MessageRecipient {
                    user_id: r.user_id,
                    read: r.read,
                    favorite: r.favorite,
                })
                .collect(),
        })
    }

    /// SetFavorite. Key: UpdateMessageRecipient.
    pub async fn set_favorite(
        &self,
        caller: &Caller,
        req: proto::SetFavoriteRequest,
    ) -> Result<proto::SetFavoriteResponse> {
        caller.require(Permission::UpdateMessageRecipient)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("message_id", &req.message_id);
        c.done()?;
        let msg = self.visible_message(caller, &req.message_id).await?;
        if msg.delete_time.is_some() && req.favorite {
            return Err(Error::not_found(format!("message {}", req.message_id)));
        }
        self.store
            .set_favorite(&caller.tenant_id, &caller.user_id, &msg.id, req.favorite)
            .await?;
        Ok(proto::SetFavoriteResponse {
            favorite: req.favorite,
        })
    }

    /// GetUnreadCounts. Key: ViewMessage.
    pub async fn get_unread_counts(
        &self,
        caller: &Caller,
        _req: proto::GetUnreadCountsRequest,
    ) -> Result<proto::GetUnreadCountsResponse> {
        caller.require(Permission::ViewMessage)?;
        let counts = self
            .store
            .unread_counts(&caller.tenant_id, &caller.user_id)
            .await?;
        Ok(proto::GetUnreadCountsResponse {
            unread_counts: counts
                .into_iter()
                .map(|(channel_id, count)| proto::UnreadCount { channel_id, count })
                .collect(),
        })
    }

    /// CountMessages. Key: ViewMessage.
    pub async fn count_messages(
        &self,
        caller: &Caller,
        req: proto::CountMessagesRequest,
    ) -> Result<proto::CountMessagesResponse> {
        caller.require(Permission::ViewMessage)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.done()?;
        self.membership(caller, &req.channel_id).await?;
        let count = self.store.count_messages(&req.channel_id).await?;
        Ok(proto::CountMessagesResponse { count })
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}
