//! `chat.v1.ListMessagesResponse`, written by hand instead of generated, so that a history page
//! can be sent as messages already in wire form.
//!
//! On the wire nothing changes: the response is field 1 (`repeated Message messages`) and
//! field 2 (`string next_page_token`), as `proto/chat/v1/chat_service.proto` declares, and
//! every client decodes it as before. The difference is on the server: besides the decoded
//! `messages`, the type can carry [`EncodedMessages`], field-1 entries written straight from
//! the database rows (every history page: the store calls [`write_message`] for each row), which skips building a
//! `Message` with ten owned strings per row only to encode and drop it (chat-bench scenario 5:
//! that conversion and its allocations were a sixth of the server's CPU per page).
//!
//! `build.rs` maps the message here with `extern_path`; [`crate::proto`] re-exports it.

use bytes::{Buf, BufMut};
use prost::encoding::{self, encode_key, encode_varint, encoded_len_varint, DecodeContext};
use prost::encoding::{key_len, WireType};
use prost::DecodeError;

use crate::proto::Message;
use crate::store::{EncodedRows, MessageColumns, StoreResult};

/// Response of ListMessages (`chat.v1.ListMessagesResponse`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ListMessagesResponse {
    /// Messages, newest first. What a client decodes lands here.
    pub messages: Vec<Message>,
    /// Token for the next (older) page; empty on the last page.
    pub next_page_token: String,
    /// Messages already in wire form, sent before `messages` (server side only; a decoded
    /// response leaves it empty).
    pub encoded_messages: EncodedMessages,
}

impl prost::Message for ListMessagesResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded_messages.bytes);
        for m in &self.messages {
            encoding::message::encode(1, m, buf);
        }
        if !self.next_page_token.is_empty() {
            encoding::string::encode(2, &self.next_page_token, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const STRUCT: &str = "ListMessagesResponse";
        match tag {
            1 => encoding::message::merge_repeated(wire_type, &mut self.messages, buf, ctx)
                .map_err(in_field(STRUCT, "messages")),
            2 => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx)
                .map_err(in_field(STRUCT, "next_page_token")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.encoded_messages.bytes.len()
            + encoding::message::encoded_len_repeated(1, &self.messages)
            + if self.next_page_token.is_empty() {
                0
            } else {
                encoding::string::encoded_len(2, &self.next_page_token)
            }
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.next_page_token.clear();
        self.encoded_messages = EncodedMessages::default();
    }
}

/// Marks a decode error as found in `field` of `message`, as prost's generated code does.
pub(crate) fn in_field(
    message: &'static str,
    field: &'static str,
) -> impl FnOnce(DecodeError) -> DecodeError {
    move |mut e| {
        e.push(message, field);
        e
    }
}

/// `chat.v1.Message`s in wire form, each a complete entry of field 1 of
/// [`ListMessagesResponse`] (key, length, message), with each one's sequence so a page can
/// be cut and its next-page token made. Equal when they hold the same messages.
#[derive(Clone, Default, Debug)]
pub struct EncodedMessages {
    bytes: Vec<u8>,
    /// `(sequence, end offset in bytes)` of each message, in order.
    ends: Vec<(i64, usize)>,
    /// Scratch space for the message being written (its length prefix comes first).
    scratch: Vec<u8>,
}

impl PartialEq for EncodedMessages {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes && self.ends == other.ends
    }
}

impl EncodedMessages {
    /// Messages held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The sequence of the last message held.
    pub fn last_sequence(&self) -> Option<i64> {
        self.ends.last().map(|&(sequence, _)| sequence)
    }

    /// Keeps the first `n` messages.
    pub fn truncate(&mut self, n: usize) {
        if n < self.ends.len() {
            let end = n.checked_sub(1).map_or(0, |last| self.ends[last].1);
            self.bytes.truncate(end);
            self.ends.truncate(n);
        }
    }

    /// The entries as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends a message encoded by prost.
    pub fn push(&mut self, m: &Message) {
        encoding::message::encode(1, m, &mut self.bytes);
        self.ends.push((m.sequence, self.bytes.len()));
    }

    /// Appends the message of sequence `sequence` that `write` writes field by field; fields
    /// must be written in field-number order with [`MessageWriter`]'s methods, as prost
    /// writes them, so that the bytes equal prost's for the same message. When `write` fails,
    /// nothing is appended.
    pub fn push_with<E>(
        &mut self,
        sequence: i64,
        write: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.scratch.clear();
        write(&mut MessageWriter {
            buf: &mut self.scratch,
        })?;
        encode_key(1, WireType::LengthDelimited, &mut self.bytes);
        encode_varint(self.scratch.len() as u64, &mut self.bytes);
        self.bytes.extend_from_slice(&self.scratch);
        self.ends.push((sequence, self.bytes.len()));
        Ok(())
    }
}

impl From<EncodedRows> for EncodedMessages {
    /// A page the store wrote with [`write_message`].
    fn from(rows: EncodedRows) -> Self {
        EncodedMessages {
            bytes: rows.bytes,
            ends: rows.ends,
            scratch: Vec::new(),
        }
    }
}

impl EncodedMessages {
    /// Appends a row of the message columns, as [`write_message`] writes it.
    ///
    /// Errors: the row's, for a column of an unexpected type; nothing is appended then.
    pub fn push_row(&mut self, r: &dyn MessageColumns) -> StoreResult<()> {
        let mut rows = EncodedRows {
            bytes: std::mem::take(&mut self.bytes),
            ends: std::mem::take(&mut self.ends),
        };
        let pushed = rows.push(write_message, r);
        (self.bytes, self.ends) = (rows.bytes, rows.ends);
        pushed
    }
}

thread_local! {
    /// The message being written by [`write_message`] (its length prefix comes first), kept
    /// per thread so a page of rows allocates it once.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The [`crate::store::RowWriter`] of ListMessages: appends a row of the message columns
/// (`store::MESSAGE_COLUMNS` order) to `out` as a field-1 entry of
/// [`ListMessagesResponse`] (key, length, `chat.v1.Message`) and returns its sequence. The
/// bytes equal prost's encoding of `domain::convert::into_message` of the same row: body and
/// subject left out of a deleted message, `attachment_ids` parsed from its JSON text
/// (unparsable text read as none), the version as the etag, microsecond times as
/// `Timestamp`s. Text is copied once, from the row into `out`.
///
/// Errors: the row's, for a column of an unexpected type or text that is not UTF-8; `out` may
/// then hold part of the entry (the store cuts it off).
pub fn write_message(out: &mut Vec<u8>, r: &dyn MessageColumns) -> StoreResult<i64> {
    let sequence = r.integer(10)?.unwrap_or_default();
    let version = r.integer(11)?.unwrap_or_default();
    let create_time = r.integer(12)?.unwrap_or_default();
    let update_time = r.integer(13)?;
    let delete_time = r.integer(14)?;
    let attachments = r.text(7)?;
    let attachment_ids: Vec<String> = if attachments == "[]" {
        Vec::new()
    } else {
        serde_json::from_str(attachments).unwrap_or_default()
    };
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        let mut w = MessageWriter { buf: scratch };
        w.string(1, r.text(0)?);
        w.string(2, r.text(2)?);
        w.string(3, r.text(3)?);
        if delete_time.is_none() {
            w.string(4, r.text(4)?);
            w.string(5, r.text(5)?);
        }
        w.string(6, r.text(6)?);
        w.repeated_string(7, &attachment_ids);
        w.string(8, r.text(8)?);
        w.string(9, r.text(9)?);
        w.int64(10, sequence);
        w.string(11, &version.to_string());
        w.timestamp(12, Some(create_time));
        w.timestamp(13, update_time);
        w.timestamp(14, delete_time);
        w.string(15, r.text(15)?);
        encode_key(1, WireType::LengthDelimited, out);
        encode_varint(scratch.len() as u64, out);
        out.extend_from_slice(scratch);
        Ok(sequence)
    })
}

/// Writes the fields of one message in proto3 form: default values (empty strings, zero
/// numbers) are left out, present sub-messages are written even when empty.
pub struct MessageWriter<'a> {
    buf: &'a mut Vec<u8>,
}

impl MessageWriter<'_> {
    /// A `string` field.
    pub fn string(&mut self, tag: u32, value: &str) {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, self.buf);
            encode_varint(value.len() as u64, self.buf);
            self.buf.extend_from_slice(value.as_bytes());
        }
    }

    /// A `repeated string` field: every element, empty ones included.
    pub fn repeated_string(&mut self, tag: u32, values: &[String]) {
        for value in values {
            encode_key(tag, WireType::LengthDelimited, self.buf);
            encode_varint(value.len() as u64, self.buf);
            self.buf.extend_from_slice(value.as_bytes());
        }
    }

    /// An `int64` field.
    pub fn int64(&mut self, tag: u32, value: i64) {
        if value != 0 {
            encode_key(tag, WireType::Varint, self.buf);
            encode_varint(value as u64, self.buf);
        }
    }

    /// A `google.protobuf.Timestamp` field from microseconds since the Unix epoch (as
    /// `domain::convert::timestamp` makes it); `None` leaves the field unset.
    pub fn timestamp(&mut self, tag: u32, micros: Option<i64>) {
        let Some(micros) = micros else { return };
        let seconds = micros.div_euclid(1_000_000);
        let nanos = micros.rem_euclid(1_000_000) * 1000;
        let len = field_len(seconds) + field_len(nanos);
        encode_key(tag, WireType::LengthDelimited, self.buf);
        encode_varint(len as u64, self.buf);
        self.int64(1, seconds);
        self.int64(2, nanos);
    }
}

/// Bytes of an integer field of tag 1 or 2 holding `value` (none when zero).
fn field_len(value: i64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(value as u64)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn message(sequence: i64, body: &str) -> Message {
        Message {
            id: format!("m{sequence}"),
            body: body.into(),
            sequence,
            ..Default::default()
        }
    }

    /// A stored row read by column index, in `MESSAGE_COLUMNS` order.
    impl MessageColumns for crate::store::MessageRow {
        fn text(&self, i: usize) -> StoreResult<&str> {
            fn opt(v: &Option<String>) -> &str {
                v.as_deref().unwrap_or("")
            }
            Ok(match i {
                0 => &self.id,
                1 => &self.tenant_id,
                2 => &self.channel_id,
                3 => &self.sender_id,
                4 => &self.body,
                5 => &self.subject,
                6 => opt(&self.parent_message_id),
                7 => &self.attachment_ids,
                8 => opt(&self.client_message_id),
                9 => opt(&self.forwarded_from_message_id),
                15 => opt(&self.deleted_by),
                _ => panic!("column {i} is not text"),
            })
        }

        fn integer(&self, i: usize) -> StoreResult<Option<i64>> {
            Ok(match i {
                10 => Some(self.sequence),
                11 => Some(self.version),
                12 => Some(self.create_time),
                13 => self.update_time,
                14 => self.delete_time,
                _ => panic!("column {i} is not an integer"),
            })
        }
    }

    /// Rows history never lists (deleted ones) and times before the epoch: `push_row` writes
    /// what prost makes of `into_message`.
    #[test]
    fn rows_equal_prost_of_the_converted_row() {
        let row = crate::store::MessageRow {
            id: "m1".into(),
            tenant_id: "t".into(),
            channel_id: "c".into(),
            sender_id: "u".into(),
            body: "gone".into(),
            subject: "s".into(),
            parent_message_id: Some("p".into()),
            attachment_ids: r#"["a", ""]"#.into(),
            client_message_id: None,
            forwarded_from_message_id: Some(String::new()),
            sequence: 7,
            version: 3,
            create_time: -1,
            update_time: Some(0),
            delete_time: Some(1_500_000),
            deleted_by: Some("admin".into()),
        };
        let live = crate::store::MessageRow {
            delete_time: None,
            deleted_by: None,
            attachment_ids: "[1, 2]".into(),
            ..row.clone()
        };
        for r in [row, live] {
            let mut written = EncodedMessages::default();
            written.push_row(&r).expect("written");
            let mut encoded = EncodedMessages::default();
            encoded.push(&crate::domain::convert::into_message(r.clone()));
            assert_eq!(written, encoded, "{r:?}");
        }
    }

    #[test]
    fn truncate_keeps_whole_messages() {
        let all = [message(3, "c"), message(2, "bb"), message(1, "")];
        let mut page = EncodedMessages::default();
        for m in &all {
            page.push(m);
        }
        let mut two = EncodedMessages::default();
        for m in &all[..2] {
            two.push(m);
        }
        page.truncate(5);
        assert_eq!(page.len(), 3);
        page.truncate(2);
        assert_eq!(page, two);
        assert_eq!(page.last_sequence(), Some(2));
        page.truncate(0);
        assert!(page.is_empty() && page.as_bytes().is_empty());
        assert_eq!(page.last_sequence(), None);
    }

    #[test]
    fn written_fields_equal_prost() {
        let m = Message {
            id: "id".into(),
            attachment_ids: vec![String::new(), "a".into()],
            sequence: -5,
            create_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            update_time: Some(prost_types::Timestamp {
                seconds: -2,
                nanos: 999_999_000,
            }),
            ..Default::default()
        };
        let mut written = EncodedMessages::default();
        written
            .push_with(-5, |w| {
                w.string(1, "id");
                w.string(4, "");
                w.repeated_string(7, &m.attachment_ids);
                w.int64(10, -5);
                w.timestamp(12, Some(0));
                w.timestamp(13, Some(-1_000_001));
                w.timestamp(14, None);
                Ok::<_, ()>(())
            })
            .expect("written");
        let mut encoded = EncodedMessages::default();
        encoded.push(&m);
        assert_eq!(written, encoded);
        let response = ListMessagesResponse {
            encoded_messages: written,
            ..Default::default()
        };
        let decoded =
            ListMessagesResponse::decode(response.encode_to_vec().as_slice()).expect("decode");
        assert_eq!(decoded.messages, [m]);
    }
}
