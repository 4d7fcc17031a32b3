// @chat-service/client: the generated chat.v1 code (protoc-gen-es v2) plus three small helpers.
// Types are in index.d.ts.
import { create } from "@bufbuild/protobuf";
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

/**
 * Uploads `data` (a Uint8Array or a Blob/File) through the resumable unary path
 * (CreateUpload, UploadChunk per chunk, CompleteUpload): the path browsers use, since grpc-web
 * has no client streaming. Returns the Attachment (not yet linked to a message: pass its id in
 * SendMessage's `attachmentIds`).
 */
export async function uploadResumable(client, options) {
  const { channelId, fileName, data, contentType = "", sha256 = "", signal } = options;
  const chunkBytes = Math.min(options.chunkBytes ?? MAX_CHUNK_BYTES, MAX_CHUNK_BYTES);
  const size = data instanceof Uint8Array ? data.byteLength : data.size;
  const { uploadId } = await client.createUpload(
    {
      metadata: create(AttachmentMetadataSchema, {
        channelId,
        fileName,
        contentType,
        sizeBytes: BigInt(size),
        sha256,
      }),
    },
    { signal },
  );
  for (let offset = 0; offset < size; offset += chunkBytes) {
    const end = Math.min(offset + chunkBytes, size);
    const chunk =
      data instanceof Uint8Array
        ? data.subarray(offset, end)
        : new Uint8Array(await data.slice(offset, end).arrayBuffer());
    await client.uploadChunk({ uploadId, offset: BigInt(offset), chunk }, { signal });
    options.onProgress?.(end, size);
  }
  const { attachment } = await client.completeUpload({ uploadId }, { signal });
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

