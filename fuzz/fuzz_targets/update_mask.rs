//! `update_mask` paths of UpdateMessage (with `etag`) and UpdateGroup: arbitrary paths and
//! field values through `validate::message_patch` / `validate::group_patch`, checked against
//! the rules written out again here: the request is accepted exactly when every path is known
//! and every named field is valid, and the patch changes exactly the named fields.
#![no_main]

use chat_service::domain::validate::{self, Check};
use chat_service::proto;
use chat_service_fuzz::fields;
use libfuzzer_sys::fuzz_target;

/// The input: `paths,comma,separated` then each field, separated by the byte 0xFF
/// (see `fields`); an empty first field is no mask at all.
#[derive(Debug)]
struct Input {
    paths: Option<Vec<String>>,
    body: String,
    subject: String,
    etag: String,
    name: String,
    description: String,
    channel_type: String,
}

fn text_ok(v: &str, max: usize, required: bool) -> bool {
    !(required && v.trim().is_empty()) && v.chars().count() <= max && !v.contains('\0')
}

fuzz_target!(|data: &[u8]| {
    let [paths, body, subject, etag, name, description, channel_type] = fields(data);
    let input = Input {
        paths: (!paths.is_empty()).then(|| paths.split(',').map(str::to_owned).collect()),
        body,
        subject,
        etag,
        name,
        description,
        channel_type,
    };
    let mask = input
        .paths
        .clone()
        .map(|paths| prost_types::FieldMask { paths });
    let paths = input.paths.clone().unwrap_or_default();
    let named = |p: &str| paths.iter().any(|q| q == p);

    let req = proto::UpdateMessageRequest {
        message_id: String::new(),
        body: input.body.clone(),
        subject: input.subject.clone(),
        update_mask: mask.clone(),
        etag: input.etag.clone(),
    };
    let mut c = Check::new();
    let patch = validate::message_patch(&mut c, &req);
    let expect_ok = !paths.is_empty()
        && paths.iter().all(|p| p == "body" || p == "subject")
        && (!named("subject") || text_ok(&input.subject, validate::MAX_SUBJECT_CHARS, false))
        && (input.etag.is_empty() || input.etag.parse::<i64>().is_ok());
    assert_eq!(c.done().is_ok(), expect_ok, "UpdateMessage {input:?}");
    if expect_ok {
        assert_eq!(patch.body, named("body").then(|| input.body.clone()));
        assert_eq!(
            patch.subject,
            named("subject").then(|| input.subject.clone())
        );
        assert_eq!(patch.expected_version, input.etag.parse::<i64>().ok());
    }

    let req = proto::UpdateGroupRequest {
        channel_id: String::new(),
        name: input.name.clone(),
        description: input.description.clone(),
        channel_type: input.channel_type.clone(),
        update_mask: mask,
    };
    let mut c = Check::new();
    let patch = validate::group_patch(&mut c, &req);
    let expect_ok = !paths.is_empty()
        && paths
            .iter()
            .all(|p| matches!(p.as_str(), "name" | "description" | "channel_type"))
        && (!named("name") || text_ok(&input.name, validate::MAX_NAME_CHARS, true))
        && (!named("description")
            || text_ok(&input.description, validate::MAX_DESCRIPTION_CHARS, false))
        && (!named("channel_type")
            || text_ok(&input.channel_type, validate::MAX_CHANNEL_TYPE_CHARS, false));
    assert_eq!(c.done().is_ok(), expect_ok, "UpdateGroup {input:?}");
    if expect_ok {
        assert_eq!(patch.name, named("name").then(|| input.name.clone()));
        assert_eq!(
            patch.description,
            named("description").then(|| input.description.clone())
        );
        assert_eq!(
            patch.channel_type,
            named("channel_type").then(|| input.channel_type.clone())
        );
    }
});
