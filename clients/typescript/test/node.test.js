// The generated client in Node against a live server, over each transport a user can pick:
// gRPC (HTTP/2), grpc-web over HTTP/1.1 and grpc-web over HTTP/2.
import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createClient, ConnectError, Code } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import {
  ChatService,
  GroupService,
  AttachmentService,
  bearer,
  uploadResumable,
  downloadAll,
} from "../src/index.js";
import { startServer, take } from "./harness.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

const transports = {
  "gRPC over HTTP/2": (baseUrl, token) =>
    createGrpcTransport({ baseUrl, interceptors: [bearer(token)] }),
  "grpc-web over HTTP/1.1": (baseUrl, token) =>
    createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors: [bearer(token)] }),
  "grpc-web over HTTP/2": (baseUrl, token) =>
    createGrpcWebTransport({ baseUrl, httpVersion: "2", interceptors: [bearer(token)] }),
};

const created = (ev) => ev.event.case === "messageCreated";

for (const [name, makeTransport] of Object.entries(transports)) {
  describe(name, () => {
    const clients = (user, ttl) => {
      const t = makeTransport(server.url, server.token(user, ttl));
      return {
        chat: createClient(ChatService, t),
        groups: createClient(GroupService, t),
        files: createClient(AttachmentService, t),
      };
    };

    test("send, list, subscribe live, drop, resume with cursors: nothing missed", async () => {
      const alice = clients("alice");
      const bob = clients("bob");
      const { channel } = await alice.groups.createGroup({ name: `ts ${name}`, memberIds: ["bob"] });
      const channelId = channel.id;

      // Bob follows from the start of the channel, so nothing depends on timing.
      const drop = new AbortController();
      const feed = bob.chat
        .subscribe({ channelIds: [channelId], cursors: { [channelId]: 0n } }, { signal: drop.signal })
        [Symbol.asyncIterator]();
      const texts = ["hello 👋", "שלום", "你好"];
      for (const body of texts) await alice.chat.sendMessage({ channelId, body });
      const live = await take(feed, 3, created);
      assert.deepEqual(live.map((e) => e.event.value.message.body), texts);
      const cursor = live[2].sequence;
      drop.abort();
      await assert.rejects(feed.next(), (e) => ConnectError.from(e).code === Code.Canceled);

      // While Bob is away: two messages and an edit.
      const m4 = (await alice.chat.sendMessage({ channelId, body: "missed 1" })).message;
      await alice.chat.sendMessage({ channelId, body: "missed 2" });
      await alice.chat.updateMessage({
        messageId: m4.id,
        body: "missed 1 (edited)",
        updateMask: { paths: ["body"] },
      });

      const resumed = bob.chat
        .subscribe({ channelIds: [channelId], cursors: { [channelId]: cursor } })
        [Symbol.asyncIterator]();
      const missed = await take(resumed, 3, (e) => e.sequence > 0n);
      assert.deepEqual(
        missed.map((e) => e.sequence),
        [cursor + 1n, cursor + 2n, cursor + 3n],
      );
      assert.deepEqual(
        missed.map((e) => [e.event.case, e.event.value.message.body]),
        [
          ["messageCreated", "missed 1"],
          ["messageCreated", "missed 2"],
          ["messageUpdated", "missed 1 (edited)"],
        ],
      );
      // And live again on the resumed stream.
      await alice.chat.sendMessage({ channelId, body: "back live" });
      const [again] = await take(resumed, 1, created);
      assert.equal(again.sequence, cursor + 4n);
      assert.equal(again.event.value.message.body, "back live");
      await resumed.return?.();

      // History, page by page.
      const seen = [];
      let pageToken = "";
      do {
        const page = await bob.chat.listMessages({ channelId, pageSize: 2, pageToken });
        seen.push(...page.messages.map((m) => m.body));
        pageToken = page.nextPageToken;
      } while (pageToken);
      assert.deepEqual(
        [...seen].sort(),
        [...texts, "missed 1 (edited)", "missed 2", "back live"].sort(),
      );
    });

    test("resumable upload and download give the same bytes", async () => {
      const alice = clients("alice");
      const bob = clients("bob");
      const { channel } = await alice.groups.createGroup({ name: "files", memberIds: ["bob"] });
      const data = randomBytes(2 * 1024 * 1024 + 12_345); // three chunks, the last one short
      const sha256 = createHash("sha256").update(data).digest("hex");
      const progress = [];
      const attachment = await uploadResumable(alice.files, {
        channelId: channel.id,
        fileName: "random.bin",
        contentType: "application/octet-stream",
        data: new Uint8Array(data),
        sha256,
        onProgress: (sent) => progress.push(sent),
      });
      assert.equal(attachment.sha256, sha256);
      assert.equal(attachment.sizeBytes, BigInt(data.length));
      assert.deepEqual(progress, [1 << 20, 2 << 20, data.length]);
      await alice.chat.sendMessage({
        channelId: channel.id,
        body: "the file",
        attachmentIds: [attachment.id],
      });
      const { attachment: meta, bytes } = await downloadAll(bob.files, attachment.id);
      assert.equal(meta.fileName, "random.bin");
      assert.equal(createHash("sha256").update(bytes).digest("hex"), sha256);
      // Resume a download from an offset.
      const tail = await downloadAll(bob.files, attachment.id, { offset: 1_000_000 });
      assert.deepEqual(Buffer.from(tail.bytes), data.subarray(1_000_000));
    });

    test("an interrupted upload resumes from the server's committed size", async () => {
      const alice = clients("alice");
      const { channel } = await alice.groups.createGroup({ name: "resume" });
      const data = new Uint8Array(randomBytes(3 * 1024 * 1024 + 5));
      const sha256 = createHash("sha256").update(data).digest("hex");
      const stop = new AbortController();
      let uploadId = "";
      await assert.rejects(
        uploadResumable(alice.files, {
          channelId: channel.id,
          fileName: "big.bin",
          data,
          sha256,
          signal: stop.signal,
          onProgress: (committed, _total, id) => {
            uploadId = id;
            if (committed >= 1 << 20) stop.abort(); // the connection "drops" after one chunk
          },
        }),
        (e) => ConnectError.from(e).code === Code.Canceled,
      );
      assert.ok(uploadId);
      // Resume: the first chunk goes at offset 0, the server answers FAILED_PRECONDITION with
      // committed_bytes = 1 MiB in an ErrorInfo, and the helper carries on from there.
      const progress = [];
      const attachment = await uploadResumable(alice.files, {
        channelId: channel.id,
        fileName: "big.bin",
        data,
        uploadId,
        onProgress: (committed) => progress.push(committed),
      });
      assert.deepEqual(progress, [2 << 20, 3 << 20, data.length]);
      assert.equal(attachment.sha256, sha256);
      await assert.rejects(
        uploadResumable(alice.files, { channelId: channel.id, fileName: "x", data, chunkBytes: 0 }),
        RangeError,
      );
    });

    test("errors keep their codes", async () => {
      const expired = clients("alice", -120);
      await assert.rejects(
        expired.groups.listGroups({}),
        (e) => ConnectError.from(e).code === Code.Unauthenticated,
      );
      // A stream refused at the start.
      const stream = expired.chat.subscribe({})[Symbol.asyncIterator]();
      await assert.rejects(stream.next(), (e) => ConnectError.from(e).code === Code.Unauthenticated);
      // Not a member: NOT_FOUND, and bad input: INVALID_ARGUMENT.
      const alice = clients("alice");
      const carol = clients("carol");
      const { channel } = await alice.groups.createGroup({ name: "private" });
      await assert.rejects(
        carol.chat.sendMessage({ channelId: channel.id, body: "hi" }),
        (e) => ConnectError.from(e).code === Code.NotFound,
      );
      await assert.rejects(
        alice.chat.sendMessage({ channelId: channel.id, body: "x".repeat(40_000) }),
        (e) => ConnectError.from(e).code === Code.InvalidArgument,
      );
    });
  });
}
