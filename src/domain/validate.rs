//! Limits and input rules (DESIGN §3–4). Bodies count UTF-8 bytes; names and subjects count
//! Unicode scalar values. What a database cannot store (NUL) is refused here, the same on
//! every backend.

use base64::Engine;

use crate::error::{Error, FieldViolation, Result};
use crate::proto;
use crate::store::{GroupPatch, MessagePatch};

/// Largest message body, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 32 * 1024;
/// Longest subject, in Unicode scalar values.
pub const MAX_SUBJECT_CHARS: usize = 200;
/// Longest group name, in Unicode scalar values.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest group description, in Unicode scalar values.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
/// Longest channel label (`channel_type`), in Unicode scalar values.
pub const MAX_CHANNEL_TYPE_CHARS: usize = 100;
/// Longest `client_message_id`, in bytes.
pub const MAX_CLIENT_MESSAGE_ID_BYTES: usize = 100;
/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 255;
/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 32;
/// Most users in one CreateGroup / AddMembers call.
pub const MAX_MEMBERS_PER_CALL: usize = 1000;
/// Longest attachment file name, in Unicode scalar values.
pub const MAX_FILE_NAME_CHARS: usize = 255;
/// Longest attachment content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Page size when the request gives 0 (AIP-158).
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page size.
pub const MAX_PAGE_SIZE: i64 = 200;

/// Collects field violations so one response can name every bad field.
#[derive(Debug, Default)]
pub struct Check(Vec<FieldViolation>);

impl Check {
    /// An empty collector.
    pub fn new() -> Check {
        Check::default()
    }

    /// Records a violation.
    pub fn fail(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// `Err(INVALID_ARGUMENT)` with every violation, or `Ok`.
    pub fn done(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(self.0))
        }
    }

    /// A required UUID.
    pub fn id(&mut self, field: &str, v: &str) {
        if v.is_empty() {
            self.fail(field, "required");
        } else if uuid::Uuid::try_parse(v).is_err() {
            self.fail(field, "must be a UUID");
        }
    }

    /// An optional UUID (empty is fine).
    pub fn opt_id(&mut self, field: &str, v: &str) {
        if !v.is_empty() {
            self.id(field, v);
        }
    }

    /// A required user id: 1 to 255 bytes, no control characters.
    pub fn user_id(&mut self, field: &str, v: &str) {
        if v.is_empty() {
            self.fail(field, "required");
        } else if v.len() > MAX_USER_ID_BYTES {
            self.fail(field, format!("at most {MAX_USER_ID_BYTES} bytes"));
        } else if v.chars().any(char::is_control) {
            self.fail(field, "must not contain control characters");
        }
    }

    /// Text of at most `max` Unicode scalar values without NUL (which PostgreSQL cannot store);
    /// `required` also refuses the empty string.
    pub fn text(&mut self, field: &str, v: &str, max: usize, required: bool) {
        if required && v.trim().is_empty() {
            self.fail(field, "required");
        } else if v.chars().count() > max {
            self.fail(field, format!("at most {max} characters"));
        } else if v.contains('\0') {
            self.fail(field, "must not contain NUL characters");
        }
    }

    /// A message body: at most 32 KiB of UTF-8, no NUL; empty only when `may_be_empty`.
    pub fn body(&mut self, field: &str, v: &str, may_be_empty: bool) {
        if v.is_empty() && !may_be_empty {
            self.fail(field, "required unless the message has attachments");
        } else if v.len() > MAX_BODY_BYTES {
            self.fail(
                field,
                format!("at most {MAX_BODY_BYTES} bytes of UTF-8 (got {})", v.len()),
            );
        } else if v.contains('\0') {
            self.fail(field, "must not contain NUL characters");
        }
    }

    /// A page size: 0 (default) to 200. Returns the size to use.
    pub fn page_size(&mut self, field: &str, v: i32) -> i64 {
        let v = i64::from(v);
        if !(0..=MAX_PAGE_SIZE).contains(&v) {
            self.fail(field, format!("must be between 0 and {MAX_PAGE_SIZE}"));
            DEFAULT_PAGE_SIZE
        } else if v == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            v
        }
    }
}

/// Page tokens: opaque to clients (base64url), bound to the request they came from so a token
/// of one channel is refused on another.
pub fn encode_page_token(scope: &str, key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{scope}\n{key}"))
}

/// Ends a keyset page: `rows` were fetched with a limit of `size + 1`; when the extra row came,
/// it is dropped and the token names the key of the last row kept. Returns the token, empty on
/// the last page (AIP-158).
pub fn finish_page<T>(
    rows: &mut Vec<T>,
    size: i64,
    scope: &str,
    key: impl Fn(&T) -> String,
) -> String {
    if rows.len() as i64 <= size {
        return String::new();
    }
    rows.truncate(size as usize);
    rows.last()
        .map(|r| encode_page_token(scope, &key(r)))
        .unwrap_or_default()
}

/// Decodes a page token of `scope` whose key is an id (UUID); errors as [`decode_page_token`].
pub fn decode_id_page_token(token: &str, scope: &str) -> Result<Option<String>> {
    let key = decode_page_token(token, scope)?;
    if key
        .as_deref()
        .is_some_and(|k| uuid::Uuid::try_parse(k).is_err())
    {
        return Err(Error::invalid(
            "page_token",
            "not a page token of this request",
        ));
    }
    Ok(key)
}

/// Decodes a page token of `scope`; an empty token is the first page (`None`).
///
/// Errors: `INVALID_ARGUMENT` on `page_token` for a token that is not ours or is of another
/// request.
pub fn decode_page_token(token: &str, scope: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "not a page token of this request");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (s, key) = text.split_once('\n').ok_or_else(bad)?;
    if s != scope {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// Decodes a page token of `scope` whose key is a channel sequence (ListMessages); errors as
/// [`decode_page_token`].
pub fn decode_sequence_page_token(token: &str, scope: &str) -> Result<Option<i64>> {
    match decode_page_token(token, scope)? {
        Some(k) => Some(
            k.parse::<i64>()
                .map_err(|_| Error::invalid("page_token", "not a page token of this request")),
        )
        .transpose(),
        None => Ok(None),
    }
}

/// Decodes a page token of `scope` whose key is `<join time>/<user id>` (ListMembers): the join
/// time in microseconds and a user id as [`Check::user_id`] accepts it. Errors as
/// [`decode_page_token`].
pub fn decode_member_page_token(token: &str, scope: &str) -> Result<Option<(i64, String)>> {
    let Some(k) = decode_page_token(token, scope)? else {
        return Ok(None);
    };
    let (t, u) = k
        .split_once('/')
        .and_then(|(t, u)| t.parse::<i64>().ok().map(|t| (t, u)))
        .filter(|(_, u)| {
            let mut c = Check::new();
            c.user_id("page_token", u);
            c.done().is_ok()
        })
        .ok_or_else(|| Error::invalid("page_token", "not a page token of this request"))?;
    Ok(Some((t, u.to_owned())))
}

/// Checks the metadata of an upload (UploadAttachment's first frame, CreateUpload) into `c`,
/// naming fields under `field`: `channel_id` a UUID; `file_name` 1 to
/// [`MAX_FILE_NAME_CHARS`] Unicode scalar values without control characters; `content_type`
/// at most [`MAX_CONTENT_TYPE_BYTES`] bytes without control characters; `size_bytes` not
/// negative; `sha256` empty or 64 hex digits. Returns the content type to store
/// (`application/octet-stream` when none is given).
pub fn attachment_metadata(c: &mut Check, field: &str, m: &proto::AttachmentMetadata) -> String {
    c.id(&format!("{field}.channel_id"), &m.channel_id);
    let name_field = format!("{field}.file_name");
    if m.file_name.is_empty() {
        c.fail(&name_field, "required");
    } else if m.file_name.chars().count() > MAX_FILE_NAME_CHARS {
        c.fail(
            &name_field,
            format!("at most {MAX_FILE_NAME_CHARS} characters"),
        );
    } else if m.file_name.chars().any(char::is_control) {
        c.fail(
            &name_field,
            "must not contain control characters (NUL included)",
        );
    }
    if m.content_type.len() > MAX_CONTENT_TYPE_BYTES || m.content_type.chars().any(char::is_control)
    {
        c.fail(
            format!("{field}.content_type"),
            "at most 255 bytes, no control characters",
        );
    }
    if m.size_bytes < 0 {
        c.fail(format!("{field}.size_bytes"), "must not be negative");
    }
    if !m.sha256.is_empty()
        && (m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_hexdigit()))
    {
        c.fail(format!("{field}.sha256"), "64 hex characters, or empty");
    }
    if m.content_type.is_empty() {
        "application/octet-stream".to_owned()
    } else {
        m.content_type.clone()
    }
}

/// The paths of an `update_mask`; none at all is a violation that lists `fields`, the fields
/// that can change.
fn mask_paths(c: &mut Check, mask: Option<&prost_types::FieldMask>, fields: &str) -> Vec<String> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        c.fail(
            "update_mask",
            format!("required: list the fields to change ({fields})"),
        );
    }
    paths
}

/// Reads UpdateMessage's `update_mask` (paths `body`, `subject`; at least one) and `etag` (a
/// message version, decimal) into `c`: the patch they ask for. The subject is checked here;
/// the body is checked later, against the message (it may be empty only with attachments).
pub fn message_patch(c: &mut Check, req: &proto::UpdateMessageRequest) -> MessagePatch {
    let paths = mask_paths(c, req.update_mask.as_ref(), "body, subject");
    let mut patch = MessagePatch::default();
    for p in &paths {
        match p.as_str() {
            "body" => patch.body = Some(req.body.clone()),
            "subject" => {
                c.text("subject", &req.subject, MAX_SUBJECT_CHARS, false);
                patch.subject = Some(req.subject.clone());
            }
            other => c.fail(
                "update_mask",
                format!("unknown or immutable field {other:?}"),
            ),
        }
    }
    if !req.etag.is_empty() {
        match req.etag.parse::<i64>() {
            Ok(v) => patch.expected_version = Some(v),
            Err(_) => c.fail("etag", "not an etag of this service"),
        }
    }
    patch
}

/// Reads UpdateGroup's `update_mask` (paths `name`, `description`, `channel_type`; at least
/// one) into `c`, checking each named field: the patch it asks for.
pub fn group_patch(c: &mut Check, req: &proto::UpdateGroupRequest) -> GroupPatch {
    let paths = mask_paths(
        c,
        req.update_mask.as_ref(),
        "name, description, channel_type",
    );
    let mut patch = GroupPatch::default();
    for p in &paths {
        match p.as_str() {
            "name" => {
                c.text("name", &req.name, MAX_NAME_CHARS, true);
                patch.name = Some(req.name.clone());
            }
            "description" => {
                c.text(
                    "description",
                    &req.description,
                    MAX_DESCRIPTION_CHARS,
                    false,
                );
                patch.description = Some(req.description.clone());
            }
            "channel_type" => {
                c.text(
                    "channel_type",
                    &req.channel_type,
                    MAX_CHANNEL_TYPE_CHARS,
                    false,
                );
                patch.channel_type = Some(req.channel_type.clone());
            }
            other => c.fail(
                "update_mask",
                format!("unknown or immutable field {other:?}"),
            ),
        }
    }
    patch
}
