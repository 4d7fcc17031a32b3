import type { Client, Interceptor } from "@connectrpc/connect";
import type { Attachment } from "./gen/chat/v1/types_pb.js";
import type { AttachmentService } from "./gen/chat/v1/attachment_service_pb.js";

export * from "./gen/chat/v1/types_pb.js";
export * from "./gen/chat/v1/chat_service_pb.js";
export * from "./gen/chat/v1/group_service_pb.js";
export * from "./gen/chat/v1/attachment_service_pb.js";

/** Largest chunk UploadChunk takes: 1 MiB (1,048,576 bytes). */
export declare const MAX_CHUNK_BYTES: number;

/**
 * An interceptor that sends `authorization: Bearer <token>` on every call. `token` is a string
 * or a function returning one (or a promise of one), called per request.
 */
export declare function bearer(
  token: string | (() => string | Promise<string>),
): Interceptor;

/** Options of {@link uploadResumable}. */
export interface UploadOptions {
  /** The channel the file is for; the caller must be a member. */
  channelId: string;
  /** The file's name (metadata only), 1 to 255 characters. */
  fileName: string;
  /** The bytes: a Uint8Array, or a Blob / File (read one chunk at a time). */
  data: Uint8Array | Blob;
  /** MIME type; empty means application/octet-stream. */
  contentType?: string;
  /** Optional SHA-256 of the content (64 hex characters), checked by the server at the end. */
  sha256?: string;
  /** Bytes per UploadChunk call, at most 1 MiB (the default). */
  chunkBytes?: number;
  /** Called after each chunk with the bytes sent so far and the total. */
  onProgress?: (sent: number, total: number) => void;
  /** Cancels the upload (it is swept after ATTACHMENT_UNLINKED_TTL). */
  signal?: AbortSignal;
}

/**
 * Uploads through CreateUpload → UploadChunk… → CompleteUpload (the browser path: grpc-web has
 * no client streaming). Resolves to the stored Attachment, not yet linked to a message.
 * Rejects with the server's ConnectError (for example `Code.ResourceExhausted` over
 * MAX_UPLOAD_BYTES, `Code.InvalidArgument` for a wrong sha256).
 */
export declare function uploadResumable(
  client: Client<typeof AttachmentService>,
  options: UploadOptions,
): Promise<Attachment | undefined>;

/**
 * Downloads an attachment over DownloadAttachment (a server stream) from `offset` (default 0)
 * to the end. Every call writes a download record on the server.
 */
export declare function downloadAll(
  client: Client<typeof AttachmentService>,
  attachmentId: string,
  options?: { offset?: number; signal?: AbortSignal },
): Promise<{ attachment: Attachment | undefined; bytes: Uint8Array }>;
