import datetime

from chat_service_client.chat.v1 import types_pb2 as _types_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SendMessageRequest(_message.Message):
    __slots__ = ("channel_id", "recipient_id", "body", "subject", "parent_message_id", "attachment_ids", "client_message_id")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PARENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    recipient_id: str
    body: str
    subject: str
    parent_message_id: str
    attachment_ids: _containers.RepeatedScalarFieldContainer[str]
    client_message_id: str
    def __init__(self, channel_id: _Optional[str] = ..., recipient_id: _Optional[str] = ..., body: _Optional[str] = ..., subject: _Optional[str] = ..., parent_message_id: _Optional[str] = ..., attachment_ids: _Optional[_Iterable[str]] = ..., client_message_id: _Optional[str] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class GetMessageRequest(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    def __init__(self, message_id: _Optional[str] = ...) -> None: ...

class GetMessageResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
    __slots__ = ("channel_id", "parent_message_id", "page_size", "page_token")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    parent_message_id: str
    page_size: int
    page_token: str
    def __init__(self, channel_id: _Optional[str] = ..., parent_message_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.Message]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_types_pb2.Message, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateMessageRequest(_message.Message):
    __slots__ = ("message_id", "body", "subject", "update_mask", "etag")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    body: str
    subject: str
    update_mask: _field_mask_pb2.FieldMask
    etag: str
    def __init__(self, message_id: _Optional[str] = ..., body: _Optional[str] = ..., subject: _Optional[str] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class UpdateMessageResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class DeleteMessageRequest(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    def __init__(self, message_id: _Optional[str] = ...) -> None: ...

class DeleteMessageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardMessageRequest(_message.Message):
    __slots__ = ("message_id", "channel_id", "recipient_id")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    channel_id: str
    recipient_id: str
    def __init__(self, message_id: _Optional[str] = ..., channel_id: _Optional[str] = ..., recipient_id: _Optional[str] = ...) -> None: ...

class ForwardMessageResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class MarkReadRequest(_message.Message):
    __slots__ = ("channel_id", "sequence")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    sequence: int
    def __init__(self, channel_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class MarkReadResponse(_message.Message):
    __slots__ = ("read_sequence",)
    READ_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    read_sequence: int
    def __init__(self, read_sequence: _Optional[int] = ...) -> None: ...

class ListMessageRecipientsRequest(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    def __init__(self, message_id: _Optional[str] = ...) -> None: ...

class MessageRecipient(_message.Message):
    __slots__ = ("user_id", "read", "favorite")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    FAVORITE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    read: bool
    favorite: bool
    def __init__(self, user_id: _Optional[str] = ..., read: _Optional[bool] = ..., favorite: _Optional[bool] = ...) -> None: ...

class ListMessageRecipientsResponse(_message.Message):
    __slots__ = ("recipients",)
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    recipients: _containers.RepeatedCompositeFieldContainer[MessageRecipient]
    def __init__(self, recipients: _Optional[_Iterable[_Union[MessageRecipient, _Mapping]]] = ...) -> None: ...

class SetFavoriteRequest(_message.Message):
    __slots__ = ("message_id", "favorite")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    FAVORITE_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    favorite: bool
    def __init__(self, message_id: _Optional[str] = ..., favorite: _Optional[bool] = ...) -> None: ...

class SetFavoriteResponse(_message.Message):
    __slots__ = ("favorite",)
    FAVORITE_FIELD_NUMBER: _ClassVar[int]
    favorite: bool
    def __init__(self, favorite: _Optional[bool] = ...) -> None: ...

class GetUnreadCountsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnreadCount(_message.Message):
    __slots__ = ("channel_id", "count")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    count: int
    def __init__(self, channel_id: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class GetUnreadCountsResponse(_message.Message):
    __slots__ = ("unread_counts",)
    UNREAD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    unread_counts: _containers.RepeatedCompositeFieldContainer[UnreadCount]
    def __init__(self, unread_counts: _Optional[_Iterable[_Union[UnreadCount, _Mapping]]] = ...) -> None: ...

class CountMessagesRequest(_message.Message):
    __slots__ = ("channel_id",)
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    def __init__(self, channel_id: _Optional[str] = ...) -> None: ...

class CountMessagesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("channel_ids", "cursors")
    class CursorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CHANNEL_IDS_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    channel_ids: _containers.RepeatedScalarFieldContainer[str]
    cursors: _containers.ScalarMap[str, int]
    def __init__(self, channel_ids: _Optional[_Iterable[str]] = ..., cursors: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("channel_id", "sequence", "message_created", "message_updated", "message_deleted", "read_marker_updated", "member_added", "member_removed", "heartbeat")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_CREATED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_UPDATED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_DELETED_FIELD_NUMBER: _ClassVar[int]
    READ_MARKER_UPDATED_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ADDED_FIELD_NUMBER: _ClassVar[int]
    MEMBER_REMOVED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    sequence: int
    message_created: MessageCreated
    message_updated: MessageUpdated
    message_deleted: MessageDeleted
    read_marker_updated: ReadMarkerUpdated
    member_added: MemberAdded
    member_removed: MemberRemoved
    heartbeat: Heartbeat
    def __init__(self, channel_id: _Optional[str] = ..., sequence: _Optional[int] = ..., message_created: _Optional[_Union[MessageCreated, _Mapping]] = ..., message_updated: _Optional[_Union[MessageUpdated, _Mapping]] = ..., message_deleted: _Optional[_Union[MessageDeleted, _Mapping]] = ..., read_marker_updated: _Optional[_Union[ReadMarkerUpdated, _Mapping]] = ..., member_added: _Optional[_Union[MemberAdded, _Mapping]] = ..., member_removed: _Optional[_Union[MemberRemoved, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class MessageCreated(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class MessageUpdated(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class MessageDeleted(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: _types_pb2.Message
    def __init__(self, message: _Optional[_Union[_types_pb2.Message, _Mapping]] = ...) -> None: ...

class ReadMarkerUpdated(_message.Message):
    __slots__ = ("user_id", "read_sequence")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    READ_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    read_sequence: int
    def __init__(self, user_id: _Optional[str] = ..., read_sequence: _Optional[int] = ...) -> None: ...

class MemberAdded(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _types_pb2.Member
    def __init__(self, member: _Optional[_Union[_types_pb2.Member, _Mapping]] = ...) -> None: ...

class MemberRemoved(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _types_pb2.Member
    def __init__(self, member: _Optional[_Union[_types_pb2.Member, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
