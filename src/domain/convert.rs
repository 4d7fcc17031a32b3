//! Stored rows to `chat.v1` messages.

use prost_types::Timestamp;

use crate::proto;
use crate::store::{ChannelRow, MemberRow, MessageRow, Role, KIND_DIRECT};

/// Microseconds since the epoch to a protobuf timestamp.
pub fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// The API role of a stored role.
pub fn role(r: Role) -> proto::MemberRole {
    match r {
        Role::Owner => proto::MemberRole::Owner,
        Role::Admin => proto::MemberRole::Admin,
        Role::Member => proto::MemberRole::Member,
    }
}

/// A channel row as the API shows it.
pub fn channel(c: &ChannelRow) -> proto::Channel {
    let direct_user_ids = match (&c.direct_key, c.kind == KIND_DIRECT) {
        (Some(k), true) => k.split('\n').skip(1).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    proto::Channel {
        id: c.id.clone(),
        kind: if c.kind == KIND_DIRECT {
            proto::ChannelKind::Direct
        } else {
            proto::ChannelKind::Group
        } as i32,
        name: c.name.clone(),
        description: c.description.clone(),
        channel_type: c.channel_type.clone(),
        last_sequence: c.last_sequence,
        create_time: Some(timestamp(c.create_time)),
        update_time: Some(timestamp(c.update_time)),
        direct_user_ids,
    }
}

/// A member row as the API shows it.
pub fn member(m: &MemberRow) -> proto::Member {
    proto::Member {
        user_id: m.user_id.clone(),
        role: role(m.role()) as i32,
        join_time: Some(timestamp(m.join_time)),
    }
}

/// A message row as the API shows it; a deleted message shows no body or subject.
pub fn message(m: &MessageRow) -> proto::Message {
    into_message(m.clone())
}

/// [`message`], taking the row: its strings move into the message instead of being copied.
/// History pages are written in wire form from the rows instead, as byte for byte what prost
/// makes of this function's result (see [`crate::page::EncodedMessages::push_row`]).
pub fn into_message(m: MessageRow) -> proto::Message {
    let deleted = m.delete_time.is_some();
    let attachment_ids = if m.attachment_ids == "[]" {
        Vec::new()
    } else {
        serde_json::from_str(&m.attachment_ids).unwrap_or_default()
    };
    proto::Message {
        id: m.id,
        channel_id: m.channel_id,
        sender_id: m.sender_id,
        body: if deleted { String::new() } else { m.body },
        subject: if deleted { String::new() } else { m.subject },
        parent_message_id: m.parent_message_id.unwrap_or_default(),
        attachment_ids,
        client_message_id: m.client_message_id.unwrap_or_default(),
        forwarded_from_message_id: m.forwarded_from_message_id.unwrap_or_default(),
        sequence: m.sequence,
        etag: m.version.to_string(),
        create_time: Some(timestamp(m.create_time)),
        update_time: m.update_time.map(timestamp),
        delete_time: m.delete_time.map(timestamp),
        deleted_by: m.deleted_by.unwrap_or_default(),
    }
}
