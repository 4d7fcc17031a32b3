//! GroupService use cases.

use uuid::Uuid;

use crate::auth::{Caller, Permission};
use crate::error::{Error, Result};
use crate::proto;
use crate::store::{now_micros, ChannelRow, Role, KIND_GROUP};

use super::validate::{self, Check};
use super::{convert, encode_member_added, encode_member_removed, policy, Chat};

fn role_from(field: &str, r: i32, default_member: bool, c: &mut Check) -> Role {
    match proto::MemberRole::try_from(r) {
        Ok(proto::MemberRole::Owner) => Role::Owner,
        Ok(proto::MemberRole::Admin) => Role::Admin,
        Ok(proto::MemberRole::Member) => Role::Member,
        Ok(proto::MemberRole::Unspecified) if default_member => Role::Member,
        _ => {
            c.fail(
                field,
                "must be MEMBER_ROLE_OWNER, MEMBER_ROLE_ADMIN or MEMBER_ROLE_MEMBER",
            );
            Role::Member
        }
    }
}

impl Chat {
    /// CreateGroup: the caller becomes OWNER. Key: CreateGroup.
    pub async fn create_group(
        &self,
        caller: &Caller,
        req: proto::CreateGroupRequest,
    ) -> Result<proto::CreateGroupResponse> {
        caller.require(Permission::CreateGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.text("name", &req.name, validate::MAX_NAME_CHARS, true);
        c.text(
            "description",
            &req.description,
            validate::MAX_DESCRIPTION_CHARS,
            false,
        );
        c.text(
            "channel_type",
            &req.channel_type,
            validate::MAX_CHANNEL_TYPE_CHARS,
            false,
        );
        if req.member_ids.len() > validate::MAX_MEMBERS_PER_CALL {
            c.fail(
                "member_ids",
                format!("at most {} users", validate::MAX_MEMBERS_PER_CALL),
            );
        }
        for (i, m) in req.member_ids.iter().enumerate() {
            c.user_id(&format!("member_ids[{i}]"), m);
        }
        c.done()?;
        let now = now_micros();
        let row = ChannelRow {
            id: Uuid::now_v7().to_string(),
            tenant_id: caller.tenant_id.clone(),
            kind: KIND_GROUP.to_owned(),
            name: req.name,
            description: req.description,
            channel_type: req.channel_type,
            direct_key: None,
            last_sequence: 0,
            create_time: now,
            update_time: now,
        };
        let (channel, added) = self
            .store
            .create_group(
                Self::actor(caller),
                row,
                &req.member_ids,
                &encode_member_added,
            )
            .await?;
        self.publish_members(&caller.tenant_id, &added, true);
        Ok(proto::CreateGroupResponse {
            channel: Some(convert::channel(&channel)),
        })
    }

    /// GetGroup: members only. Key: ViewGroup.
    pub async fn get_group(
        &self,
        caller: &Caller,
        req: proto::GetGroupRequest,
    ) -> Result<proto::GetGroupResponse> {
        caller.require(Permission::ViewGroup)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.done()?;
        let (channel, _) = self.channel_as_member(caller, &req.channel_id).await?;
        Ok(proto::GetGroupResponse {
            channel: Some(convert::channel(&channel)),
        })
    }

    /// ListGroups: the caller's channels, newest first. Key: ViewGroup.
    pub async fn list_groups(
        &self,
        caller: &Caller,
        req: proto::ListGroupsRequest,
    ) -> Result<proto::ListGroupsResponse> {
        caller.require(Permission::ViewGroup)?;
        let mut c = Check::new();
        let size = c.page_size("page_size", req.page_size);
        c.done()?;
        let before = validate::decode_id_page_token(&req.page_token, "groups")?;
        let mut rows = self
            .store
            .list_channels(
                &caller.tenant_id,
                &caller.user_id,
                before.as_deref(),
                size + 1,
            )
            .await?;
        let next_page_token = validate::finish_page(&mut rows, size, "groups", |r| r.id.clone());
        Ok(proto::ListGroupsResponse {
            channels: rows.iter().map(convert::channel).collect(),
            next_page_token,
        })
    }

    /// UpdateGroup: OWNER / ADMIN, by `update_mask`. Key: UpdateGroup.
    pub async fn update_group(
        &self,
        caller: &Caller,
        req: proto::UpdateGroupRequest,
    ) -> Result<proto::UpdateGroupResponse> {
        caller.require(Permission::UpdateGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        let patch = validate::group_patch(&mut c, &req);
        c.done()?;
        let (channel, member) = self.channel_as_member(caller, &req.channel_id).await?;
        policy::require_group(&channel)?;
        policy::require_manager(&member)?;
        let row = self
            .store
            .update_group(Self::actor(caller), &req.channel_id, patch)
            .await?;
        Ok(proto::UpdateGroupResponse {
            channel: Some(convert::channel(&row)),
        })
    }

    /// DeleteGroup: OWNER; every member is removed, so feeds of it end. Key: DeleteGroup.
    pub async fn delete_group(
        &self,
        caller: &Caller,
        req: proto::DeleteGroupRequest,
    ) -> Result<proto::DeleteGroupResponse> {
        caller.require(Permission::DeleteGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.done()?;
        let (channel, member) = self.channel_as_member(caller, &req.channel_id).await?;
        policy::require_group(&channel)?;
        policy::require_owner(&member)?;
        let removed = self
            .store
            .delete_group(Self::actor(caller), &req.channel_id, &encode_member_removed)
            .await?;
        self.publish_members(&caller.tenant_id, &removed, false);
        Ok(proto::DeleteGroupResponse {})
    }

    /// AddMembers: OWNER / ADMIN; owners only by an OWNER. Key: UpdateGroup.
    pub async fn add_members(
        &self,
        caller: &Caller,
        req: proto::AddMembersRequest,
    ) -> Result<proto::AddMembersResponse> {
        caller.require(Permission::UpdateGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        if req.user_ids.is_empty() {
            c.fail("user_ids", "required: at least one user");
        } else if req.user_ids.len() > validate::MAX_MEMBERS_PER_CALL {
            c.fail(
                "user_ids",
                format!("at most {} users", validate::MAX_MEMBERS_PER_CALL),
            );
        }
        for (i, u) in req.user_ids.iter().enumerate() {
            c.user_id(&format!("user_ids[{i}]"), u);
        }
        let role = role_from("role", req.role, true, &mut c);
        c.done()?;
        let (channel, member) = self.channel_as_member(caller, &req.channel_id).await?;
        policy::require_group(&channel)?;
        policy::require_manager(&member)?;
        if role == Role::Owner {
            policy::require_owner(&member)?;
        }
        let added = self
            .store
            .add_members(
                Self::actor(caller),
                &req.channel_id,
                &req.user_ids,
                role,
                &encode_member_added,
            )
            .await?;
        self.publish_members(&caller.tenant_id, &added, true);
        Ok(proto::AddMembersResponse {
            members: added.iter().map(|a| convert::member(&a.row)).collect(),
        })
    }

    /// RemoveMember: OWNER / ADMIN, or the member leaving; the last OWNER cannot leave.
    /// Key: UpdateGroup.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        req: proto::RemoveMemberRequest,
    ) -> Result<proto::RemoveMemberResponse> {
        caller.require(Permission::UpdateGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.user_id("user_id", &req.user_id);
        c.done()?;
        let (channel, member) = self.channel_as_member(caller, &req.channel_id).await?;
        policy::require_group(&channel)?;
        let target = if req.user_id == caller.user_id {
            member.clone()
        } else {
            policy::require_manager(&member)?;
            self.store
                .member(&caller.tenant_id, &req.channel_id, &req.user_id)
                .await?
                .ok_or_else(|| Error::not_found(format!("member {}", req.user_id)))?
        };
        // Only an owner removes another owner; the last-owner rule is checked by the store,
        // inside the transaction that removes.
        if target.role() == Role::Owner && req.user_id != caller.user_id {
            policy::require_owner(&member)?;
        }
        let removed = self
            .store
            .remove_member(
                Self::actor(caller),
                &req.channel_id,
                &req.user_id,
                &encode_member_removed,
            )
            .await?;
        self.publish_members(&caller.tenant_id, std::slice::from_ref(&removed), false);
        Ok(proto::RemoveMemberResponse {})
    }

    /// ListMembers: members only, join order. Key: ViewGroup.
    pub async fn list_members(
        &self,
        caller: &Caller,
        req: proto::ListMembersRequest,
    ) -> Result<proto::ListMembersResponse> {
        caller.require(Permission::ViewGroup)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        let size = c.page_size("page_size", req.page_size);
        c.done()?;
        let scope = format!("members/{}", req.channel_id);
        let after = validate::decode_member_page_token(&req.page_token, &scope)?;
        let after = after.as_ref().map(|(t, u)| (*t, u.as_str()));
        self.membership(caller, &req.channel_id).await?;
        let mut rows = self
            .store
            .list_members(&req.channel_id, after, size + 1)
            .await?;
        let next_page_token = validate::finish_page(&mut rows, size, &scope, |m| {
            format!("{}/{}", m.join_time, m.user_id)
        });
        Ok(proto::ListMembersResponse {
            members: rows.iter().map(convert::member).collect(),
            next_page_token,
        })
    }

    /// UpdateMemberRole: OWNER only; the last OWNER cannot step down. Key: UpdateGroup.
    pub async fn update_member_role(
        &self,
        caller: &Caller,
        req: proto::UpdateMemberRoleRequest,
    ) -> Result<proto::UpdateMemberRoleResponse> {
        caller.require(Permission::UpdateGroup)?;
        self.limits.write(caller)?;
        let mut c = Check::new();
        c.id("channel_id", &req.channel_id);
        c.user_id("user_id", &req.user_id);
        let role = role_from("role", req.role, false, &mut c);
        c.done()?;
        let (channel, member) = self.channel_as_member(caller, &req.channel_id).await?;
        policy::require_group(&channel)?;
        policy::require_owner(&member)?;
        // The last-owner rule is checked by the store, inside the transaction.
        let row = self
            .store
            .set_role(Self::actor(caller), &req.channel_id, &req.user_id, role)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => {
                    Error::not_found(format!("member {}", req.user_id))
                }
                e => e.into(),
            })?;
        Ok(proto::UpdateMemberRoleResponse {
            member: Some(convert::member(&row)),
        })
    }
}
