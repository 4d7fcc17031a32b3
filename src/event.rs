//! `chat.v1.SubscribeResponse`, written by hand instead of generated, so that a feed can send an
//! event as the bytes it was stored as.
//!
//! On the wire nothing changes: fields 1 (`channel_id`), 2 (`sequence`) and the `event` oneof
//! (3-9), as `proto/chat/v1/chat_service.proto` declares, and every client decodes it as
//! before. The difference is on the server. A committed event is encoded once, in the
//! transaction that stores it (the event log holds the encoded response), and every feed that
//! delivers it, live or on replay, sends those same bytes: [`SubscribeResponse::encoded`]. Before,
//! each of a channel's subscribers cloned the decoded response (a `Message` with about ten owned
//! strings), encoded the clone and dropped it: a tenth of the server's CPU in chat-bench scenario
//! 3 (1,000 subscribers of one channel).
//!
//! `build.rs` maps the message here with `extern_path`; [`crate::proto`] re-exports it and its
//! oneof module, so `proto::SubscribeResponse` and `proto::subscribe_response::Event` are where
//! they were.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

use crate::page::in_field;

/// Response of Subscribe (`chat.v1.SubscribeResponse`): one event of a followed channel, or a
/// heartbeat.
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct SubscribeResponse {
    /// The channel of the event; empty for heartbeats.
    pub channel_id: String,
    /// The event's channel sequence (1, 2, 3, ... with no gaps per channel); 0 for read markers
    /// and heartbeats, which are live only.
    pub sequence: i64,
    /// The event.
    pub event: Option<subscribe_response::Event>,
    /// The whole response already in wire form (server side only; a decoded response leaves it
    /// empty). When it is not empty it is what goes on the wire, and the three fields above are
    /// not sent: a response is either built from fields or made with
    /// [`SubscribeResponse::from_encoded`], never both.
    pub encoded: Bytes,
}

impl SubscribeResponse {
    /// A response built from fields: `event` of channel `channel_id` at `sequence` (an empty
    /// channel and 0 for live-only events such as heartbeats).
    pub fn new(
        channel_id: String,
        sequence: i64,
        event: subscribe_response::Event,
    ) -> SubscribeResponse {
        SubscribeResponse {
            channel_id,
            sequence,
            event: Some(event),
            encoded: Bytes::new(),
        }
    }

    /// A response that is sent as `encoded`, an encoded `chat.v1.SubscribeResponse` (a stored
    /// event's payload). The bytes are shared, not copied.
    pub fn from_encoded(encoded: Bytes) -> SubscribeResponse {
        SubscribeResponse {
            encoded,
            ..SubscribeResponse::default()
        }
    }
}

impl prost::Message for SubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.encoded.is_empty() {
            buf.put_slice(&self.encoded);
            return;
        }
        if !self.channel_id.is_empty() {
            encoding::string::encode(1, &self.channel_id, buf);
        }
        if self.sequence != 0 {
            encoding::int64::encode(2, &self.sequence, buf);
        }
        if let Some(event) = &self.event {
            event.encode(buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const STRUCT: &str = "SubscribeResponse";
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.channel_id, buf, ctx)
                .map_err(in_field(STRUCT, "channel_id")),
            2 => encoding::int64::merge(wire_type, &mut self.sequence, buf, ctx)
                .map_err(in_field(STRUCT, "sequence")),
            3..=9 => subscribe_response::Event::merge(&mut self.event, tag, wire_type, buf, ctx)
                .map_err(in_field(STRUCT, "event")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        if !self.encoded.is_empty() {
            return self.encoded.len();
        }
        (if self.channel_id.is_empty() {
            0
        } else {
            encoding::string::encoded_len(1, &self.channel_id)
        }) + (if self.sequence == 0 {
            0
        } else {
            encoding::int64::encoded_len(2, &self.sequence)
        }) + self.event.as_ref().map_or(0, |e| e.encoded_len())
    }

    fn clear(&mut self) {
        *self = SubscribeResponse::default();
    }
}

/// The `event` oneof of [`SubscribeResponse`].
pub mod subscribe_response {
    use crate::proto::{
        Heartbeat, MemberAdded, MemberRemoved, MessageCreated, MessageDeleted, MessageUpdated,
        ReadMarkerUpdated,
    };

    /// The event.
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Event {
        /// A message was sent.
        #[prost(message, tag = "3")]
        MessageCreated(MessageCreated),
        /// A message was edited.
        #[prost(message, tag = "4")]
        MessageUpdated(MessageUpdated),
        /// A message was deleted.
        #[prost(message, tag = "5")]
        MessageDeleted(MessageDeleted),
        /// A member's read marker moved (live only).
        #[prost(message, tag = "6")]
        ReadMarkerUpdated(ReadMarkerUpdated),
        /// A member joined the channel.
        #[prost(message, tag = "7")]
        MemberAdded(MemberAdded),
        /// A member left or was removed.
        #[prost(message, tag = "8")]
        MemberRemoved(MemberRemoved),
        /// Sent every HEARTBEAT_SECONDS (default 15) so clients and proxies see a live
        /// connection.
        #[prost(message, tag = "9")]
        Heartbeat(Heartbeat),
    }
}

/// The one thing a feed must know of a stored event besides its channel and sequence: the user
/// a `MemberRemoved` event removes, if it is one. Decoded from the payload without building the
/// event (prost skips the other fields).
pub fn removed_user(payload: &[u8]) -> Result<Option<String>, DecodeError> {
    Ok(match member_change(payload)? {
        Some((false, user)) => Some(user),
        _ => None,
    })
}

/// The membership change a stored event carries: `(true, user)` for `MemberAdded`,
/// `(false, user)` for `MemberRemoved`, `None` for any other event. Decoded without building
/// the event, for events that reach a node from storage rather than from its own commits.
pub fn member_change(payload: &[u8]) -> Result<Option<(bool, String)>, DecodeError> {
    let head: EventHead = prost::Message::decode(payload)?;
    let user = |e: Option<MemberEventHead>| e.and_then(|e| e.member).map(|m| m.user_id);
    Ok(match (user(head.member_added), user(head.member_removed)) {
        (Some(u), _) => Some((true, u)),
        (None, Some(u)) => Some((false, u)),
        (None, None) => None,
    })
}

/// Fields 7 (`member_added`) and 8 (`member_removed`) of `chat.v1.SubscribeResponse` and
/// nothing else.
#[derive(Clone, PartialEq, prost::Message)]
struct EventHead {
    #[prost(message, optional, tag = "7")]
    member_added: Option<MemberEventHead>,
    #[prost(message, optional, tag = "8")]
    member_removed: Option<MemberEventHead>,
}

/// Field 1 (`member`) of `chat.v1.MemberAdded` and of `chat.v1.MemberRemoved`.
#[derive(Clone, PartialEq, prost::Message)]
struct MemberEventHead {
    #[prost(message, optional, tag = "1")]
    member: Option<MemberHead>,
}

/// Field 1 (`user_id`) of `chat.v1.Member`.
#[derive(Clone, PartialEq, prost::Message)]
struct MemberHead {
    #[prost(string, tag = "1")]
    user_id: String,
}

#[cfg(test)]
mod tests {
    use super::subscribe_response::Event;
    use super::*;
    use crate::proto;
    use prost::Message as _;

    fn removal(user: &str) -> SubscribeResponse {
        SubscribeResponse {
            channel_id: "c".into(),
            sequence: 7,
            event: Some(Event::MemberRemoved(proto::MemberRemoved {
                member: Some(proto::Member {
                    user_id: user.into(),
                    role: 1,
                    join_time: Some(prost_types::Timestamp {
                        seconds: 5,
                        nanos: 6,
                    }),
                }),
            })),
            encoded: Bytes::new(),
        }
    }

    #[test]
    fn pre_encoded_goes_out_as_is_and_decodes_to_the_fields() {
        let built = removal("שרה");
        let bytes = built.encode_to_vec();
        let shared = SubscribeResponse::from_encoded(Bytes::from(bytes.clone()));
        assert_eq!(shared.encoded_len(), bytes.len());
        assert_eq!(shared.encode_to_vec(), bytes);
        let decoded = SubscribeResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, built);
        assert!(decoded.encoded.is_empty());
    }

    #[test]
    fn heartbeat_and_defaults_round_trip() {
        let hb = SubscribeResponse {
            event: Some(Event::Heartbeat(proto::Heartbeat {
                server_time: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
            })),
            ..SubscribeResponse::default()
        };
        let bytes = hb.encode_to_vec();
        assert_eq!(bytes.len(), hb.encoded_len());
        assert_eq!(
            SubscribeResponse::decode(bytes.as_slice()).expect("decodes"),
            hb
        );
        assert!(SubscribeResponse::default().encode_to_vec().is_empty());
        // An unknown field is skipped, as a generated message would.
        let mut with_unknown = bytes.clone();
        prost::encoding::string::encode(15, &"x".to_owned(), &mut with_unknown);
        assert_eq!(
            SubscribeResponse::decode(with_unknown.as_slice()).expect("decodes"),
            hb
        );
    }

    #[test]
    fn removed_user_reads_only_removals() {
        let bytes = removal("u-1").encode_to_vec();
        assert_eq!(removed_user(&bytes).expect("decodes"), Some("u-1".into()));
        let created = SubscribeResponse {
            channel_id: "c".into(),
            sequence: 3,
            event: Some(Event::MessageCreated(proto::MessageCreated {
                message: Some(proto::Message {
                    body: "שלום 👋🏽".into(),
                    ..proto::Message::default()
                }),
            })),
            encoded: Bytes::new(),
        };
        assert_eq!(
            removed_user(&created.encode_to_vec()).expect("decodes"),
            None
        );
        assert!(
            removed_user(&[0x0a, 0x05, b'a']).is_err(),
            "truncated payload"
        );
        let mut added = removal("u-2");
        if let Some(Event::MemberRemoved(r)) = added.event.take() {
            added.event = Some(Event::MemberAdded(proto::MemberAdded { member: r.member }));
        }
        let bytes = added.encode_to_vec();
        assert_eq!(removed_user(&bytes).expect("decodes"), None);
        assert_eq!(
            member_change(&bytes).expect("decodes"),
            Some((true, "u-2".into()))
        );
        assert_eq!(
            member_change(&removal("u-1").encode_to_vec()).expect("decodes"),
            Some((false, "u-1".into()))
        );
    }
}
