// When the client retries a call, and how long it waits in between. The same rules as the Python client
// (clients/python/sieve/retry.py):
//
// Retried codes: UNAVAILABLE and RESOURCE_EXHAUSTED, the two ways a server says "not now".
// - Idempotent calls are retried on both, whatever the server had done: search and every get/list (they
//   change nothing), upsertDocuments (idempotent by id), deleteDocuments (by id), cancelJob (cancelling a
//   cancelled job is a no-op) and watchJob (a new stream starts with the job's current state).
// - createCollection, deleteCollection and startIndexJob are not idempotent, so they are retried only when
//   the server provably did nothing: the refusal carries google.rpc.RetryInfo, the connection was never
//   made, or the server answered with its start-up refusal ("server is starting", sent before any handler).
// - uploadIndexJob is never retried (its source is consumed as it is sent).
// RESOURCE_EXHAUSTED for a message over the size limit is never retried.
//
// The wait: the server's RetryInfo delay when it sends one, otherwise exponential backoff with full
// jitter. Retries never outlast the call's deadline: it covers all attempts.
import { status as Status } from "@grpc/grpc-js";

export interface RetryPolicy {
  /** Calls in all, the first included; 1 turns retries off. */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
  multiplier: number;
  /** The longest RetryInfo delay honoured; a server asking for more ends the call with its error. */
  maxRetryDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 5,
  initialBackoffMs: 100,
  maxBackoffMs: 5000,
  multiplier: 2,
  maxRetryDelayMs: 30000,
};

/** The calls safe to repeat whatever the server did ("Service/Method"). */
export const IDEMPOTENT: ReadonlySet<string> = new Set([
  "CollectionService/GetCollection",
  "CollectionService/ListCollections",
  "DocumentService/UpsertDocuments",
  "DocumentService/GetDocuments",
  "DocumentService/DeleteDocuments",
  "SearchService/Search",
  "SearchService/SearchStream", // a read; retried only before its first message
  "JobService/GetJob",
  "JobService/WatchJob",
  "JobService/CancelJob",
  "JobService/ListJobs",
]);
const NEVER_RETRIED = new Set(["JobService/UploadIndexJob"]);
// grpc's wording for a connection never made (grpc-js: "No connection established"; grpc-core: "failed to
// connect to all addresses", and with round_robin "connections to all backends failing") and the Sieve
// server's start-up gate.
const REFUSED_BEFORE_WORK = [
  "no connection established",
  "failed to connect to all addresses",
  "connections to all backends failing",
  "server is starting",
];
const TOO_LARGE = "message larger than max";

/** Whether a failed attempt of `method` ("Service/Method") may be sent again. */
export function isRetryable(method: string, code: Status, message: string, retryDelayMs: number | undefined): boolean {
  if ((code !== Status.UNAVAILABLE && code !== Status.RESOURCE_EXHAUSTED) || NEVER_RETRIED.has(method)) {
    return false;
  }
  const text = message.toLowerCase();
  if (code === Status.RESOURCE_EXHAUSTED && text.includes(TOO_LARGE) && retryDelayMs === undefined) return false;
  if (IDEMPOTENT.has(method)) return true;
  if (retryDelayMs !== undefined) return true;
  return code === Status.UNAVAILABLE && REFUSED_BEFORE_WORK.some((marker) => text.includes(marker));
}

/** Milliseconds to wait before attempt `attempt + 1`, or undefined to give up. */
export function nextWaitMs(
  policy: RetryPolicy,
  attempt: number,
  retryDelayMs: number | undefined,
  remainingMs: number,
): number | undefined {
  if (attempt >= policy.maxAttempts) return undefined;
  let wait: number;
  if (retryDelayMs !== undefined) {
    if (retryDelayMs > policy.maxRetryDelayMs) return undefined;
    wait = retryDelayMs;
  } else {
    const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
    wait = Math.random() * cap;
  }
  return wait >= remainingMs ? undefined : wait;
}
