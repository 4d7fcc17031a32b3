// @chat-service/client: the generated chat.v1 code (protoc-gen-es v2) plus small helpers.
// Types are in index.d.ts.
import { create } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";
import { AttachmentMetadataSchema } from "./gen/chat/v1/attachment_service_pb.js";

export * from "./gen/chat/v1/types_pb.js";
export * from "./gen/chat/v1/chat_service_pb.js";
export * from "./gen/chat/v1/group_service_pb.js";
export * from "./gen/chat/v1/attachment_service_pb.js";

/** Largest chunk UploadChunk takes: 1 MiB. */
export const MAX_CHUNK_BYTES = 1024 * 1024;

/**
 * An interceptor that sends `authorization: Bearer <token>` on every call. `token` is a string
 * or a function returning one (or a promise of one), called per request so a refreshed token is
 * picked up without a new client.
 */
export function bearer(token) {
  return (next) => async (req) => {
    const value = typeof token === "function" ? await token() : token;
    req.header.set("authorization", `Bearer ${value}`);
    return next(req);
  };
}

/** Codes after which sending the same chunk again is safe (the server checks the offset). */
const RETRYABLE = new Set([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.Unknown,
  Code.Internal,
  Code.Aborted,
]);

/**
 * The committed size a FAILED_PRECONDITION from UploadChunk carries in its
 * `google.rpc.ErrorInfo` (`metadata.committed_bytes`), or undefined.
 */
export function committedBytes(error) {
  const err = ConnectError.from(error);
  if (err.code !== Code.FailedPrecondition) return undefined;
  for (const detail of err.details) {
    if (detail.type !== "google.rpc.ErrorInfo" || !(detail.value instanceof Uint8Array)) continue;
    const info = new BinaryReader(detail.value);
    while (info.pos < info.len) {
      const [field, wireType] = info.tag();
      if (field !== 3 || wireType !== WireType.LengthDelimited) {
        info.skip(wireType);
        continue;
      }
      // metadata: map<string, string> entry { key = 1; value = 2; }
      const entry = new BinaryReader(info.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [f, w] = entry.tag();
        if (f === 1) key = entry.string();
        else if (f === 2) value = entry.string();
        else entry.skip(w);
      }
      if (key === "committed_bytes" && /^\d+$/.test(value)) return Number(value);
    }
  }
  return undefined;
}

/**
 * Uploads `data` (a Uint8Array or a Blob/File) through the resumable unary path
 * (CreateUpload, UploadChunk per chunk, CompleteUpload): the path browsers use, since grpc-web
 * has no client streaming. A chunk that fails on the way is sent again (up to `retries` times
 * in a row); a chunk at the wrong offset continues from the size the server reports. Pass the
 * `uploadId` of an interrupted upload (reported to `onProgress`) to resume it. Resolves to
 * the Attachment, not yet linked to a message: pass its id in SendMessage's `attachmentIds`.
 */
export async function uploadResumable(client, options) {
  const { channelId, fileName, data, contentType = "", sha256 = "", signal } = options;
  const retries = options.retries ?? 3;
  const chunkBytes = options.chunkBytes ?? MAX_CHUNK_BYTES;
  if (!Number.isInteger(chunkBytes) || chunkBytes < 1 || chunkBytes > MAX_CHUNK_BYTES) {
    throw new RangeError(`chunkBytes must be 1 to ${MAX_CHUNK_BYTES}`);
  }
  const size = data instanceof Uint8Array ? data.byteLength : data.size;
  let uploadId = options.uploadId;
  if (!uploadId) {
    const metadata = create(AttachmentMetadataSchema, {
      channelId,
      fileName,
      contentType,
      sizeBytes: BigInt(size),
      sha256,
    });
    ({ uploadId } = await client.createUpload({ metadata }, { signal }));
  }
  let offset = 0;
  let failures = 0;
  while (offset < size) {
    const end = Math.min(offset + chunkBytes, size);
    const chunk =
      data instanceof Uint8Array
        ? data.subarray(offset, end)
        : new Uint8Array(await data.slice(offset, end).arrayBuffer());
    try {
      const res = await client.uploadChunk({ uploadId, offset: BigInt(offset), chunk }, { signal });
      offset = Number(res.committedBytes);
      failures = 0;
      options.onProgress?.(offset, size, uploadId);
    } catch (e) {
      const committed = committedBytes(e);
      const err = ConnectError.from(e);
      if (signal?.aborted || ++failures > retries) throw err;
      if (committed !== undefined) offset = committed;
      else if (!RETRYABLE.has(err.code)) throw err;
      else await new Promise((r) => setTimeout(r, 100 * 2 ** failures));
    }
  }
  const { attachment } = await client.completeUpload({ uploadId }, { signal });
  if (!attachment) throw new ConnectError("CompleteUpload returned no attachment", Code.Internal);
  return attachment;
}

/**
 * Downloads an attachment whole (DownloadAttachment, a server stream): the metadata frame, then
 * the bytes from `offset` (default 0) to the end, joined.
 */
export async function downloadAll(client, attachmentId, options = {}) {
  let attachment;
  const parts = [];
  let length = 0;
  for await (const frame of client.downloadAttachment(
    { attachmentId, offset: BigInt(options.offset ?? 0) },
    { signal: options.signal },
  )) {
    if (frame.data.case === "attachment") {
      attachment = frame.data.value;
    } else if (frame.data.case === "chunk") {
      parts.push(frame.data.value);
      length += frame.data.value.byteLength;
    }
  }
  const bytes = new Uint8Array(length);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.byteLength;
  }
  return { attachment, bytes };
}

