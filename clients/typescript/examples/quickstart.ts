// The README's example, run as is by the tests: alice makes a group with bob, bob follows it
// live, drops, resumes from his cursors without missing anything, reads the history, and
// downloads a file alice attached.
//
//   CHAT_SERVER=http://127.0.0.1:50051 ALICE_TOKEN=... BOB_TOKEN=... node quickstart.js
import { createClient, ConnectError, Code } from "@connectrpc/connect";
// Node: gRPC (HTTP/2) or grpc-web. In a browser use createGrpcWebTransport from
// "@connectrpc/connect-web" with the same options minus httpVersion.
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  AttachmentService,
  ChatService,
  GroupService,
  bearer,
  downloadAll,
  uploadResumable,
} from "@chat-service/client";

const baseUrl = process.env.CHAT_SERVER ?? "http://127.0.0.1:50051";
const as = (token: string) =>
  createGrpcTransport({ baseUrl, interceptors: [bearer(token)] });
const alice = as(process.env.ALICE_TOKEN!);
const bob = as(process.env.BOB_TOKEN!);

// 1. A group (its channel) with bob in it.
const { channel } = await createClient(GroupService, alice).createGroup({
  name: "lunch",
  memberIds: ["bob"],
});
const channelId = channel!.id;

// 2. Bob subscribes. Cursors map channel id -> last sequence seen; 0 replays from the start.
const cursors: { [channelId: string]: bigint } = { [channelId]: 0n };
const bobChat = createClient(ChatService, bob);
const aliceChat = createClient(ChatService, alice);

async function follow(wanted: number, signal?: AbortSignal): Promise<string[]> {
  const seen: string[] = [];
  for await (const ev of bobChat.subscribe({ channelIds: [channelId], cursors }, { signal })) {
    if (ev.sequence > 0n) cursors[ev.channelId] = ev.sequence; // heartbeats carry 0
    if (ev.event.case === "messageCreated") {
      seen.push(ev.event.value.message!.body);
      if (seen.length === wanted) break; // leaving the loop cancels the stream
    }
  }
  return seen;
}

const live = follow(2);
await aliceChat.sendMessage({ channelId, body: "Hello Bob 👋" });
await aliceChat.sendMessage({ channelId, body: "Lunch at noon?" });
console.log("live:", await live);

// 3. While bob is offline...
await aliceChat.sendMessage({ channelId, body: "sent while you were away" });
// ...and he resumes from his cursors: exactly what he missed, nothing twice.
console.log("resumed:", await follow(1), "cursor:", cursors[channelId]);

// 4. History, newest page first, 50 per page by default.
const history = await bobChat.listMessages({ channelId });
console.log("history:", history.messages.map((m) => m.body));

// 5. A file: resumable upload (the only upload path in browsers), link it, download it.
const files = createClient(AttachmentService, alice);
const attachment = await uploadResumable(files, {
  channelId,
  fileName: "notes.txt",
  contentType: "text/plain",
  data: new TextEncoder().encode("bring snacks\n"),
});
await aliceChat.sendMessage({ channelId, body: "notes", attachmentIds: [attachment!.id] });
const { bytes } = await downloadAll(createClient(AttachmentService, bob), attachment!.id);
console.log("downloaded:", new TextDecoder().decode(bytes).trim());

// 6. Errors are ConnectErrors with the gRPC code.
try {
  await createClient(ChatService, as("not-a-token")).listMessages({ channelId });
} catch (e) {
  console.log("bad token:", Code[ConnectError.from(e).code]);
}
