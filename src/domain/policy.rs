//! Who may do what, beyond permission keys: roles of the channel (DESIGN §4).

use crate::error::{Error, Result};
use crate::store::{ChannelRow, MemberRow, MessageRow, Role, KIND_DIRECT};

/// Group management needs OWNER or ADMIN. Errors: `PERMISSION_DENIED`.
pub fn require_manager(member: &MemberRow) -> Result<()> {
    if member.role().is_manager() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only an OWNER or ADMIN of the group may do this".into(),
        ))
    }
}

/// Deleting a group and changing roles need OWNER. Errors: `PERMISSION_DENIED`.
pub fn require_owner(member: &MemberRow) -> Result<()> {
    if member.role() == Role::Owner {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only an OWNER of the group may do this".into(),
        ))
    }
}

/// Direct channels have exactly their two users. Errors: `FAILED_PRECONDITION`.
pub fn require_group(channel: &ChannelRow) -> Result<()> {
    if channel.kind == KIND_DIRECT {
        Err(Error::FailedPrecondition(
            "direct channels have no group settings or member changes".into(),
        ))
    } else {
        Ok(())
    }
}

/// Editing is for the sender only. Errors: `PERMISSION_DENIED`.
pub fn may_edit(user: &str, msg: &MessageRow) -> Result<()> {
    if msg.sender_id == user {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only the sender may edit a message".into(),
        ))
    }
}

/// Deleting is for the sender or a manager of the channel. Errors: `PERMISSION_DENIED`.
pub fn may_delete(member: &MemberRow, msg: &MessageRow) -> Result<()> {
    if msg.sender_id == member.user_id || member.role().is_manager() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only the sender or an OWNER / ADMIN may delete a message".into(),
        ))
    }
}
