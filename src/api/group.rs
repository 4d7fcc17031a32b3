//! `chat.v1.GroupService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::Chat;
use crate::proto::group_service_server::GroupService;
use crate::proto::*;

use super::unary;

/// The GroupService implementation.
#[derive(Debug, Clone)]
pub struct GroupApi {
    chat: Arc<Chat>,
    /// How long a unary call may run (`UNARY_TIMEOUT_SECONDS`).
    unary_timeout: std::time::Duration,
}

impl GroupApi {
    /// Serves the given use cases; unary calls answer `DEADLINE_EXCEEDED` after
    /// `unary_timeout`.
    pub fn new(chat: Arc<Chat>, unary_timeout: std::time::Duration) -> GroupApi {
        GroupApi {
            chat,
            unary_timeout,
        }
    }
}

#[tonic::async_trait]
impl GroupService for GroupApi {
    async fn create_group(
        &self,
        req: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupResponse>, Status> {
        unary!(self, req, create_group)
    }
    async fn get_group(
        &self,
        req: Request<GetGroupRequest>,
    ) -> Result<Response<GetGroupResponse>, Status> {
        unary!(self, req, get_group)
    }
    async fn list_groups(
        &self,
        req: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        unary!(self, req, list_groups)
    }
    async fn update_group(
        &self,
        req: Request<UpdateGroupRequest>,
    ) -> Result<Response<UpdateGroupResponse>, Status> {
        unary!(self, req, update_group)
    }
    async fn delete_group(
        &self,
        req: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        unary!(self, req, delete_group)
    }
    async fn add_members(
        &self,
        req: Request<AddMembersRequest>,
    ) -> Result<Response<AddMembersResponse>, Status> {
        unary!(self, req, add_members)
    }
    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        unary!(self, req, remove_member)
    }
    async fn list_members(
        &self,
        req: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        unary!(self, req, list_members)
    }
    async fn update_member_role(
        &self,
        req: Request<UpdateMemberRoleRequest>,
    ) -> Result<Response<UpdateMemberRoleResponse>, Status> {
        unary!(self, req, update_member_role)
    }
}
