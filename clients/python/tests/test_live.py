"""The Python client against a live server: a conversation, a live feed that drops and resumes
from its cursors, a chunked upload of a real file with its download, and the error codes."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

import grpc
import pytest

from chat_service_client import bearer_metadata, connect, download_file, upload_file
from chat_service_client.chat.v1 import (
    chat_service_pb2 as chat,
    chat_service_pb2_grpc,
    group_service_pb2 as groups,
)
from conftest import CORPUS


def follow(stream, out: "queue.Queue") -> threading.Thread:
    """Pumps a Subscribe stream into a queue from a thread; ends when the call is cancelled."""

    def run() -> None:
        try:
            for ev in stream:
                out.put(ev)
        except grpc.RpcError as e:
            out.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def take(out: "queue.Queue", n: int, pred=lambda ev: True, timeout: float = 10.0) -> list:
    got = []
    while len(got) < n:
        ev = out.get(timeout=timeout)
        if isinstance(ev, grpc.RpcError):
            raise ev
        if pred(ev):
            got.append(ev)
    return got


def created(ev) -> bool:
    return ev.WhichOneof("event") == "message_created"


def test_conversation_subscribe_drop_resume(server):
    with connect(server.target, server.token("alice")) as alice, connect(
        server.target, server.token("bob")
    ) as bob:
        channel = alice.groups.CreateGroup(
            groups.CreateGroupRequest(name="py", member_ids=["bob"])
        ).channel

        # Bob follows from the start of the channel (cursor 0), so nothing depends on timing.
        live: queue.Queue = queue.Queue()
        call = bob.chat.Subscribe(
            chat.SubscribeRequest(channel_ids=[channel.id], cursors={channel.id: 0})
        )
        pump = follow(call, live)
        texts = ["Hello Bob 👋", "שלום", "مرحبا", "你好"]
        for text in texts:
            alice.chat.SendMessage(chat.SendMessageRequest(channel_id=channel.id, body=text))
        events = take(live, len(texts), created)
        assert [e.message_created.message.body for e in events] == texts
        cursor = events[-1].sequence
        call.cancel()
        pump.join(5)
        assert not pump.is_alive()

        # While Bob is away: two messages and a delete.
        gone = alice.chat.SendMessage(
            chat.SendMessageRequest(channel_id=channel.id, body="missed 1")
        ).message
        alice.chat.SendMessage(chat.SendMessageRequest(channel_id=channel.id, body="missed 2"))
        alice.chat.DeleteMessage(chat.DeleteMessageRequest(message_id=gone.id))

        resumed: queue.Queue = queue.Queue()
        call = bob.chat.Subscribe(
            chat.SubscribeRequest(channel_ids=[channel.id], cursors={channel.id: cursor})
        )
        follow(call, resumed)
        missed = take(resumed, 3, lambda ev: ev.sequence > 0)
        assert [e.sequence for e in missed] == [cursor + 1, cursor + 2, cursor + 3]
        assert [e.WhichOneof("event") for e in missed] == [
            "message_created",
            "message_created",
            "message_deleted",
        ]
        assert missed[1].message_created.message.body == "missed 2"
        assert missed[2].message_deleted.message.id == gone.id
        # A heartbeat comes only once the replay is over: from then on the stream is live, and
        # a message sent now can only arrive live.
        take(resumed, 1, lambda ev: ev.WhichOneof("event") == "heartbeat")
        alice.chat.SendMessage(chat.SendMessageRequest(channel_id=channel.id, body="back live"))
        [again] = take(resumed, 1, created)
        assert again.sequence == cursor + 4
        assert again.message_created.message.body == "back live"
        call.cancel()

        # History, newest first, page by page; the deleted message is left out.
        bodies, token = [], ""
        while True:
            page = bob.chat.ListMessages(
                chat.ListMessagesRequest(channel_id=channel.id, page_size=2, page_token=token)
            )
            bodies += [m.body for m in page.messages]
            token = page.next_page_token
            if not token:
                break
        assert bodies == ["back live", "missed 2", *reversed(texts)]


def test_chunked_upload_of_a_real_file_and_download(server, tmp_path):
    # Real multilingual text from the shared corpus (1.4 MB: two 1 MiB frames).
    path = CORPUS
    assert path.exists(), f"{path} is missing"
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    with connect(server.target, server.token("alice")) as alice, connect(
        server.target, server.token("bob")
    ) as bob:
        channel = alice.groups.CreateGroup(
            groups.CreateGroupRequest(name="files", member_ids=["bob"])
        ).channel
        attachment = upload_file(
            alice.attachments, channel.id, path, content_type="application/jsonl"
        )
        assert attachment.sha256 == sha256
        assert attachment.size_bytes == path.stat().st_size
        assert attachment.file_name == "dialogs.jsonl"
        alice.chat.SendMessage(
            chat.SendMessageRequest(
                channel_id=channel.id, body="the corpus", attachment_ids=[attachment.id]
            )
        )
        meta, got = download_file(bob.attachments, attachment.id, tmp_path / "copy.jsonl")
        assert got == sha256 == meta.sha256
        assert (tmp_path / "copy.jsonl").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "token",
    ["expired", "wrong signature", "garbage"],
)
def test_bad_tokens_are_unauthenticated(server, token):
    value = {
        "expired": server.token("alice", ttl=-120),
        "wrong signature": server.token("alice")[:-4] + "AAAA",
        "garbage": "not-a-jwt",
    }[token]
    with connect(server.target, value) as c:
        with pytest.raises(grpc.RpcError) as unary:
            c.groups.ListGroups(groups.ListGroupsRequest())
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as stream:
            next(iter(c.chat.Subscribe(chat.SubscribeRequest())))
        assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_other_codes_and_plain_metadata(server):
    with connect(server.target, server.token("alice")) as alice:
        channel = alice.groups.CreateGroup(groups.CreateGroupRequest(name="private")).channel
        with pytest.raises(grpc.RpcError) as big:
            alice.chat.SendMessage(
                chat.SendMessageRequest(channel_id=channel.id, body="x" * 40_000)
            )
        assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A channel of your own plus bearer_metadata() per call works as well as connect().
    with grpc.insecure_channel(server.target) as ch:
        stub = chat_service_pb2_grpc.ChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as none:
            stub.ListMessages(chat.ListMessagesRequest(channel_id=channel.id))
        assert none.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Carol is not a member: NOT_FOUND, so channel ids do not leak.
        with pytest.raises(grpc.RpcError) as outsider:
            stub.ListMessages(
                chat.ListMessagesRequest(channel_id=channel.id),
                metadata=bearer_metadata(server.token("carol")),
            )
        assert outsider.value.code() == grpc.StatusCode.NOT_FOUND
        page = stub.ListMessages(
            chat.ListMessagesRequest(channel_id=channel.id),
            metadata=bearer_metadata(server.token("alice")),
        )
        assert list(page.messages) == []
