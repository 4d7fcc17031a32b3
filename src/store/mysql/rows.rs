//! Rows of MySQL / MariaDB, decoded by hand.
//!
//! Every text column is `utf8mb4_bin` or `VARBINARY` (migrations/mysql), and the server flags
//! such columns `BINARY` in the result set; sqlx then refuses to decode them as `String`
//! ("mismatched types … VARBINARY"), although the bytes are the UTF-8 the service wrote. So
//! text is read with `try_get_unchecked` — sqlx's UTF-8 check still runs, only the column type
//! check is skipped — and integers as usual. Each function maps one row of `SELECT *` (or of
//! the columns it names) to the store's row type, by column name.

use sqlx::mysql::MySqlRow;
use sqlx::Row;

use crate::store::{
    AttachmentRow, ChannelRow, DownloadRow, EventRow, MemberRow, MessageColumns, MessageRow,
    StoreResult, UploadRow,
};

type Decoded<T> = Result<T, sqlx::Error>;

/// A text column (or a NULL one as `None`), by name or index.
fn text<T, I>(r: &MySqlRow, column: I) -> Decoded<T>
where
    I: sqlx::ColumnIndex<MySqlRow>,
    T: for<'a> sqlx::Decode<'a, sqlx::MySql>,
{
    r.try_get_unchecked(column)
}

/// A `channels` row.
pub fn channel(r: MySqlRow) -> Decoded<ChannelRow> {
    Ok(ChannelRow {
        id: text(&r, "id")?,
        tenant_id: text(&r, "tenant_id")?,
        kind: text(&r, "kind")?,
        name: text(&r, "name")?,
        description: text(&r, "description")?,
        channel_type: text(&r, "channel_type")?,
        direct_key: text(&r, "direct_key")?,
        last_sequence: r.try_get("last_sequence")?,
        create_time: r.try_get("create_time")?,
        update_time: r.try_get("update_time")?,
    })
}

/// A `members` row.
pub fn member(r: MySqlRow) -> Decoded<MemberRow> {
    Ok(MemberRow {
        channel_id: text(&r, "channel_id")?,
        user_id: text(&r, "user_id")?,
        role: text(&r, "role")?,
        join_time: r.try_get("join_time")?,
        join_sequence: r.try_get("join_sequence")?,
        read_sequence: r.try_get("read_sequence")?,
    })
}

/// A `messages` row.
pub fn message(r: MySqlRow) -> Decoded<MessageRow> {
    Ok(MessageRow {
        id: text(&r, "id")?,
        tenant_id: text(&r, "tenant_id")?,
        channel_id: text(&r, "channel_id")?,
        sender_id: text(&r, "sender_id")?,
        body: text(&r, "body")?,
        subject: text(&r, "subject")?,
        parent_message_id: text(&r, "parent_message_id")?,
        attachment_ids: text(&r, "attachment_ids")?,
        client_message_id: text(&r, "client_message_id")?,
        forwarded_from_message_id: text(&r, "forwarded_from_message_id")?,
        sequence: r.try_get("sequence")?,
        version: r.try_get("version")?,
        create_time: r.try_get("create_time")?,
        update_time: r.try_get("update_time")?,
        delete_time: r.try_get("delete_time")?,
        deleted_by: text(&r, "deleted_by")?,
    })
}

/// An `events` row.
pub fn event(r: MySqlRow) -> Decoded<EventRow> {
    Ok(EventRow {
        channel_id: text(&r, "channel_id")?,
        sequence: r.try_get("sequence")?,
        payload: r.try_get("payload")?,
    })
}

/// An `attachments` row.
pub fn attachment(r: MySqlRow) -> Decoded<AttachmentRow> {
    Ok(AttachmentRow {
        id: text(&r, "id")?,
        tenant_id: text(&r, "tenant_id")?,
        channel_id: text(&r, "channel_id")?,
        message_id: text(&r, "message_id")?,
        uploader_id: text(&r, "uploader_id")?,
        file_name: text(&r, "file_name")?,
        content_type: text(&r, "content_type")?,
        size_bytes: r.try_get("size_bytes")?,
        sha256: text(&r, "sha256")?,
        storage_key: text(&r, "storage_key")?,
        create_time: r.try_get("create_time")?,
    })
}

/// An `uploads` row.
pub fn upload(r: MySqlRow) -> Decoded<UploadRow> {
    Ok(UploadRow {
        id: text(&r, "id")?,
        tenant_id: text(&r, "tenant_id")?,
        channel_id: text(&r, "channel_id")?,
        uploader_id: text(&r, "uploader_id")?,
        file_name: text(&r, "file_name")?,
        content_type: text(&r, "content_type")?,
        size_bytes: r.try_get("size_bytes")?,
        sha256: text(&r, "sha256")?,
        committed_bytes: r.try_get("committed_bytes")?,
        create_time: r.try_get("create_time")?,
    })
}

/// An `attachment_downloads` row.
pub fn download(r: MySqlRow) -> Decoded<DownloadRow> {
    Ok(DownloadRow {
        id: text(&r, "id")?,
        tenant_id: text(&r, "tenant_id")?,
        attachment_id: text(&r, "attachment_id")?,
        user_id: text(&r, "user_id")?,
        download_time: r.try_get("download_time")?,
        bytes_sent: r.try_get("bytes_sent")?,
        completed: r.try_get("completed")?,
    })
}

/// The first column as text.
pub fn text0(r: MySqlRow) -> Decoded<String> {
    text(&r, 0)
}

/// `(text, text)`.
pub fn text_text(r: MySqlRow) -> Decoded<(String, String)> {
    Ok((text(&r, 0)?, text(&r, 1)?))
}

/// `(text, integer)`.
pub fn text_int(r: MySqlRow) -> Decoded<(String, i64)> {
    Ok((text(&r, 0)?, r.try_get(1)?))
}

/// `(text, text, integer)`.
pub fn text_text_int(r: MySqlRow) -> Decoded<(String, String, i64)> {
    Ok((text(&r, 0)?, text(&r, 1)?, r.try_get(2)?))
}

/// `(text, integer, integer)`.
pub fn text_int_int(r: MySqlRow) -> Decoded<(String, i64, i64)> {
    Ok((text(&r, 0)?, r.try_get(1)?, r.try_get(2)?))
}

/// A history row as [`MessageColumns`], text read as above.
pub struct HistoryRow<'r>(pub &'r MySqlRow);

impl MessageColumns for HistoryRow<'_> {
    fn text(&self, i: usize) -> StoreResult<&str> {
        Ok(self
            .0
            .try_get_unchecked::<Option<&str>, _>(i)?
            .unwrap_or_default())
    }

    fn integer(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.0.try_get(i)?)
    }
}
