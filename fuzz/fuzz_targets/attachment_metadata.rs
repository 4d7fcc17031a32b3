//! Upload metadata (UploadAttachment's first frame, CreateUpload): arbitrary
//! `AttachmentMetadata` through `validate::attachment_metadata`, checked against the rules
//! written out again here, and the content type it returns.
#![no_main]

use chat_service::domain::validate::{self, Check};
use chat_service::proto;
use chat_service_fuzz::fields;
use libfuzzer_sys::fuzz_target;

/// The input: `channel_id`, `file_name`, `content_type`, `size_bytes` (decimal; anything else
/// is 0) and `sha256`, separated by the byte 0xFF (see `fields`).
struct Input {
    channel_id: String,
    file_name: String,
    content_type: String,
    size_bytes: i64,
    sha256: String,
}

fuzz_target!(|data: &[u8]| {
    let [channel_id, file_name, content_type, size, sha256] = fields(data);
    let input = Input {
        channel_id,
        file_name,
        content_type,
        size_bytes: size.parse().unwrap_or(0),
        sha256,
    };
    let channel_id = input.channel_id.clone();
    let m = proto::AttachmentMetadata {
        channel_id: channel_id.clone(),
        file_name: input.file_name.clone(),
        content_type: input.content_type.clone(),
        size_bytes: input.size_bytes,
        sha256: input.sha256.clone(),
    };
    let mut c = Check::new();
    let content_type = validate::attachment_metadata(&mut c, "metadata", &m);
    let name = &input.file_name;
    let expect_ok = uuid::Uuid::try_parse(&channel_id).is_ok()
        && !name.is_empty()
        && name.chars().count() <= validate::MAX_FILE_NAME_CHARS
        && !name.chars().any(char::is_control)
        && input.content_type.len() <= validate::MAX_CONTENT_TYPE_BYTES
        && !input.content_type.chars().any(char::is_control)
        && input.size_bytes >= 0
        && (input.sha256.is_empty()
            || (input.sha256.len() == 64 && input.sha256.bytes().all(|b| b.is_ascii_hexdigit())));
    match c.done() {
        Ok(()) => assert!(expect_ok, "accepted {m:?}"),
        Err(chat_service::error::Error::Invalid(v)) => {
            assert!(!expect_ok, "refused {m:?}: {v:?}");
            assert!(v.iter().all(|f| f.field.starts_with("metadata.")), "{v:?}");
        }
        Err(e) => panic!("not INVALID_ARGUMENT: {e:?}"),
    }
    if input.content_type.is_empty() {
        assert_eq!(content_type, "application/octet-stream");
    } else {
        assert_eq!(content_type, input.content_type);
    }
});
