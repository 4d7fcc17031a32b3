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
  /** Called after each chunk with the bytes committed so far, the total, and the upload id. */
  onProgress?: (committed: number, total: number, uploadId: string) => void;
  /** Cancels the upload; resume it later with its `uploadId` (unfinished uploads are swept after ATTACHMENT_UNLINKED_TTL). */
  signal?: AbortSignal;
  /** Resume this upload instead of creating one; it continues from the server's committed size. */
  uploadId?: string;
  /** How many times in a row a failed chunk is sent again (default 3). */
  retries?: number;
}

/**
 * The committed size in bytes that a FAILED_PRECONDITION from UploadChunk carries
 * (`google.rpc.ErrorInfo`, reason OFFSET_MISMATCH, `metadata.committed_bytes`); undefined for
 * any other error.
 */
export declare function committedBytes(error: unknown): number | undefined;

/**
 * Uploads through CreateUpload → UploadChunk… → CompleteUpload (the browser path: grpc-web has
 * no client streaming). A failed chunk is sent again (`retries` in a row, with back-off); a
 * chunk at the wrong offset continues from the server's committed size; `uploadId` resumes an
 * interrupted upload. Resolves to the stored Attachment, not yet linked to a message.
 * Rejects with the server's ConnectError (for example `Code.ResourceExhausted` over
 * MAX_UPLOAD_BYTES, `Code.InvalidArgument` for a wrong sha256, `Code.Canceled` when `signal`
 * aborts) or a RangeError for a `chunkBytes` outside 1 to 1 MiB.
 */
export declare function uploadResumable(
  client: Client<typeof AttachmentService>,
  options: UploadOptions,
): Promise<Attachment>;

/**
 * Downloads an attachment over DownloadAttachment (a server stream) from `offset` (default 0)
 * to the end. Every call writes a download record on the server.
 */
export declare function downloadAll(
  client: Client<typeof AttachmentService>,
  attachmentId: string,
  options?: { offset?: number; signal?: AbortSignal },
): Promise<{ attachment: Attachment | undefined; bytes: Uint8Array }>;
