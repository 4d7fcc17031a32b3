from chat_service_client.chat.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttachmentMetadata(_message.Message):
    __slots__ = ("channel_id", "file_name", "content_type", "size_bytes", "sha256")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    file_name: str
    content_type: str
    size_bytes: int
    sha256: str
    def __init__(self, channel_id: _Optional[str] = ..., file_name: _Optional[str] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadAttachmentRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: AttachmentMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[AttachmentMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadAttachmentResponse(_message.Message):
    __slots__ = ("attachment",)
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    attachment: _types_pb2.Attachment
    def __init__(self, attachment: _Optional[_Union[_types_pb2.Attachment, _Mapping]] = ...) -> None: ...

class CreateUploadRequest(_message.Message):
    __slots__ = ("metadata",)
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: AttachmentMetadata
    def __init__(self, metadata: _Optional[_Union[AttachmentMetadata, _Mapping]] = ...) -> None: ...

class CreateUploadResponse(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class UploadChunkRequest(_message.Message):
    __slots__ = ("upload_id", "offset", "chunk")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    chunk: bytes
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadChunkResponse(_message.Message):
    __slots__ = ("committed_bytes",)
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    committed_bytes: int
    def __init__(self, committed_bytes: _Optional[int] = ...) -> None: ...

class CompleteUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CompleteUploadResponse(_message.Message):
    __slots__ = ("attachment",)
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    attachment: _types_pb2.Attachment
    def __init__(self, attachment: _Optional[_Union[_types_pb2.Attachment, _Mapping]] = ...) -> None: ...

class CancelUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CancelUploadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadAttachmentRequest(_message.Message):
    __slots__ = ("attachment_id", "offset")
    ATTACHMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    attachment_id: str
    offset: int
    def __init__(self, attachment_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadAttachmentResponse(_message.Message):
    __slots__ = ("attachment", "chunk")
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    attachment: _types_pb2.Attachment
    chunk: bytes
    def __init__(self, attachment: _Optional[_Union[_types_pb2.Attachment, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetAttachmentRequest(_message.Message):
    __slots__ = ("attachment_id",)
    ATTACHMENT_ID_FIELD_NUMBER: _ClassVar[int]
    attachment_id: str
    def __init__(self, attachment_id: _Optional[str] = ...) -> None: ...

class GetAttachmentResponse(_message.Message):
    __slots__ = ("attachment",)
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    attachment: _types_pb2.Attachment
    def __init__(self, attachment: _Optional[_Union[_types_pb2.Attachment, _Mapping]] = ...) -> None: ...

class ListAttachmentsRequest(_message.Message):
    __slots__ = ("channel_id", "message_id", "page_size", "page_token")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    message_id: str
    page_size: int
    page_token: str
    def __init__(self, channel_id: _Optional[str] = ..., message_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAttachmentsResponse(_message.Message):
    __slots__ = ("attachments", "next_page_token")
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    attachments: _containers.RepeatedCompositeFieldContainer[_types_pb2.Attachment]
    next_page_token: str
    def __init__(self, attachments: _Optional[_Iterable[_Union[_types_pb2.Attachment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAttachmentRequest(_message.Message):
    __slots__ = ("attachment_id",)
    ATTACHMENT_ID_FIELD_NUMBER: _ClassVar[int]
    attachment_id: str
    def __init__(self, attachment_id: _Optional[str] = ...) -> None: ...

class DeleteAttachmentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAttachmentDownloadsRequest(_message.Message):
    __slots__ = ("attachment_id", "page_size", "page_token")
    ATTACHMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    attachment_id: str
    page_size: int
    page_token: str
    def __init__(self, attachment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAttachmentDownloadsResponse(_message.Message):
    __slots__ = ("downloads", "next_page_token")
    DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    downloads: _containers.RepeatedCompositeFieldContainer[_types_pb2.DownloadRecord]
    next_page_token: str
    def __init__(self, downloads: _Optional[_Iterable[_Union[_types_pb2.DownloadRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
