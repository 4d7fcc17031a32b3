"""Python client of chat-service (package ``chat.v1``).

The generated code lives in ``chat_service_client.chat.v1`` (``*_pb2`` messages with ``.pyi``
stubs, ``*_pb2_grpc`` stubs). This module adds what every caller needs:

- :func:`connect` — a channel that sends ``authorization: Bearer <token>`` on every call, and
  the three service stubs;
- :func:`bearer_metadata` — the same header as call metadata, for a channel of your own;
- :func:`upload_file` / :func:`download_file` — chunked upload from a file (1 MiB frames,
  SHA-256 sent for the server to check) and download to a file.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple, Union

import grpc

from chat_service_client.chat.v1 import (
    attachment_service_pb2,
    attachment_service_pb2_grpc,
    chat_service_pb2_grpc,
    group_service_pb2_grpc,
    types_pb2,
)

__all__ = [
    "Clients",
    "MAX_CHUNK_BYTES",
    "bearer_metadata",
    "connect",
    "download_file",
    "upload_file",
]

#: Largest data frame (and UploadChunk) the server takes: 1 MiB.
MAX_CHUNK_BYTES = 1024 * 1024

Token = Union[str, Callable[[], str]]


def bearer_metadata(token: str) -> Tuple[Tuple[str, str], ...]:
    """Call metadata carrying ``token``: pass as ``metadata=`` on any stub call."""
    return (("authorization", f"Bearer {token}"),)


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer header to every call; ``token`` may be a function (asked per call)."""

    def __init__(self, token: Token) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        token = self._token() if callable(self._token) else self._token
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.extend(bearer_metadata(token))
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details with our metadata (the pattern of grpcio's interceptor examples)."""


@dataclass
class Clients:
    """The channel and one stub per service, all sending the token."""

    channel: grpc.Channel
    chat: chat_service_pb2_grpc.ChatServiceStub
    groups: group_service_pb2_grpc.GroupServiceStub
    attachments: attachment_service_pb2_grpc.AttachmentServiceStub

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Clients":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    target: str,
    token: Token,
    credentials: Optional[grpc.ChannelCredentials] = None,
) -> Clients:
    """Opens a channel to ``target`` (``host:port``) that sends ``token`` on every call.

    ``token`` is a string or a function returning one, called per call (for refreshed tokens).
    Without ``credentials`` the channel is plaintext (development, or TLS ended at a proxy).
    The largest message is raised to 2 MiB so 1 MiB attachment frames fit.
    """
    options = [
        ("grpc.max_receive_message_length", 2 * MAX_CHUNK_BYTES),
        ("grpc.max_send_message_length", 2 * MAX_CHUNK_BYTES),
    ]
    raw = (
        grpc.secure_channel(target, credentials, options)
        if credentials is not None
        else grpc.insecure_channel(target, options)
    )
    channel = grpc.intercept_channel(raw, _Bearer(token))
    return Clients(
        channel=channel,
        chat=chat_service_pb2_grpc.ChatServiceStub(channel),
        groups=group_service_pb2_grpc.GroupServiceStub(channel),
        attachments=attachment_service_pb2_grpc.AttachmentServiceStub(channel),
    )


def _file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MAX_CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def upload_file(
    attachments: attachment_service_pb2_grpc.AttachmentServiceStub,
    channel_id: str,
    path: Union[str, os.PathLike],
    content_type: str = "",
    file_name: Optional[str] = None,
    chunk_bytes: int = MAX_CHUNK_BYTES,
) -> types_pb2.Attachment:
    """Uploads the file at ``path`` over UploadAttachment (a client stream): a metadata frame
    with size and SHA-256, then the file in ``chunk_bytes`` frames (at most 1 MiB), read as it
    is sent, so memory stays flat. Returns the attachment, not yet linked to a message.

    Raises ``grpc.RpcError``: ``RESOURCE_EXHAUSTED`` over MAX_UPLOAD_BYTES, ``INVALID_ARGUMENT``
    if the file changed while being read (size or SHA-256 differ), ``NOT_FOUND`` for a channel
    the caller is not in.
    """
    chunk_bytes = max(1, min(chunk_bytes, MAX_CHUNK_BYTES))
    metadata = attachment_service_pb2.AttachmentMetadata(
        channel_id=channel_id,
        file_name=file_name or os.path.basename(os.fspath(path)),
        content_type=content_type,
        size_bytes=os.path.getsize(path),
        sha256=_file_sha256(path),
    )

    def frames() -> Iterator[attachment_service_pb2.UploadAttachmentRequest]:
        yield attachment_service_pb2.UploadAttachmentRequest(metadata=metadata)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk_bytes), b""):
                yield attachment_service_pb2.UploadAttachmentRequest(chunk=block)

    return attachments.UploadAttachment(frames()).attachment


def download_file(
    attachments: attachment_service_pb2_grpc.AttachmentServiceStub,
    attachment_id: str,
    path: Union[str, os.PathLike],
) -> Tuple[types_pb2.Attachment, str]:
    """Downloads an attachment to ``path`` over DownloadAttachment (a server stream), writing
    each frame as it arrives. Returns the attachment's metadata and the SHA-256 (hex) of the
    bytes written, to compare with ``attachment.sha256``.
    """
    h = hashlib.sha256()
    attachment = types_pb2.Attachment()
    with open(path, "wb") as f:
        for frame in attachments.DownloadAttachment(
            attachment_service_pb2.DownloadAttachmentRequest(attachment_id=attachment_id)
        ):
            if frame.HasField("attachment"):
                attachment = frame.attachment
            else:
                f.write(frame.chunk)
                h.update(frame.chunk)
    return attachment, h.hexdigest()
