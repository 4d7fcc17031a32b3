// The browser test page: the generated client over grpc-web (Connect-ES), from a page whose
// origin differs from the server's. Parameters come from the query string:
//   server: the chat-service URL; alice, bob: tokens; bobId: bob's user id.
import { createClient, ConnectError, Code } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  AttachmentService,
  ChatService,
  GroupService,
  bearer,
  downloadAll,
  uploadResumable,
} from "../../src/index.js";

const params = new URLSearchParams(location.search);
const server = params.get("server") ?? "";
const $ = (id: string) => document.getElementById(id) as HTMLElement;
$("origin").textContent = location.origin;
$("server").textContent = server;

const transport = (token: string) =>
  createGrpcWebTransport({ baseUrl: server, interceptors: [bearer(token)] });
const alice = transport(params.get("alice") ?? "");
const bob = transport(params.get("bob") ?? "");
const aliceChat = createClient(ChatService, alice);
const aliceFiles = createClient(AttachmentService, alice);
const bobFiles = createClient(AttachmentService, bob);

function showError(e: unknown) {
  const err = ConnectError.from(e);
  $("error").textContent = `${Code[err.code]}: ${err.rawMessage}`;
}

async function hex(bytes: ArrayBuffer | Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as BufferSource);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function main() {
  const { channel } = await createClient(GroupService, alice).createGroup({
    name: "browser",
    memberIds: [params.get("bobId") ?? "bob"],
  });
  const channelId = channel!.id;
  $("channel").textContent = channelId;

  // Bob's live feed, from the start of the channel.
  const feed = createClient(ChatService, bob).subscribe({
    channelIds: [channelId],
    cursors: { [channelId]: 0n },
  });
  (async () => {
    for await (const ev of feed) {
      // Heartbeats come only once replay is over and the stream is live.
      if (ev.event.case === "heartbeat") $("status").textContent = "ready";
      if (ev.event.case === "messageCreated") {
        const m = ev.event.value.message!;
        const li = document.createElement("li");
        li.dataset.sequence = String(ev.sequence);
        li.textContent = `#${ev.sequence} ${m.senderId}: ${m.body}`;
        $("feed").append(li);
      }
    }
  })().catch(showError);

  $("send-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const body = ($("text") as HTMLInputElement).value;
    aliceChat.sendMessage({ channelId, body }).catch(showError);
  });

  $("upload").addEventListener("click", async () => {
    try {
      const file = ($("file") as HTMLInputElement).files![0];
      const attachment = await uploadResumable(aliceFiles, {
        channelId,
        fileName: file.name,
        contentType: file.type,
        data: file,
        onProgress: (sent, total) => ($("upload-result").textContent = `uploading ${sent}/${total}`),
      });
      await aliceChat.sendMessage({
        channelId,
        body: `file: ${file.name}`,
        attachmentIds: [attachment.id],
      });
      const { bytes } = await downloadAll(bobFiles, attachment.id);
      const result = $("upload-result");
      result.dataset.size = String(bytes.byteLength);
      result.dataset.sha256 = await hex(bytes);
      result.dataset.serverSha256 = attachment.sha256;
      result.textContent = `downloaded ${bytes.byteLength} bytes, sha256 ${result.dataset.sha256}`;
    } catch (e) {
      showError(e);
    }
  });
}

main().catch((e) => {
  $("status").textContent = "failed";
  showError(e);
});
