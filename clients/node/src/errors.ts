// Errors raised by the Sieve client: one class per gRPC status, carrying status and details.
//
//   try { await client.getCollection("notes"); }
//   catch (err) {
//     if (err instanceof NotFoundError) { ... }
//     else if (err instanceof SieveError) console.log(err.codeName, err.message, err.retryDelayMs);
//   }
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";

export const DETAILS_TRAILER = "grpc-status-details-bin";
const RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo";

/** A google.rpc detail message from the `grpc-status-details-bin` trailer, still packed. */
export interface StatusDetail {
  typeUrl: string;
  value: Uint8Array;
}

export interface SieveErrorInit {
  code: Status;
  details?: StatusDetail[];
  retryDelayMs?: number;
  method?: string;
  attempts?: number;
  metadata?: Metadata;
  cause?: unknown;
}

/** A failed call: `code` (grpc status), `codeName` ("NOT_FOUND"), `message` (the server's text),
 * `details` (google.rpc details), `retryDelayMs` (the server's RetryInfo), `method`, `attempts`. */
export class SieveError extends Error {
  readonly code: Status;
  readonly codeName: string;
  readonly details: StatusDetail[];
  readonly retryDelayMs: number | undefined;
  readonly method: string;
  readonly attempts: number;
  readonly metadata: Metadata | undefined;

  constructor(message: string, init: SieveErrorInit) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.code = init.code;
    this.codeName = Status[init.code] ?? "UNKNOWN";
    this.details = init.details ?? [];
    this.retryDelayMs = init.retryDelayMs;
    this.method = init.method ?? "";
    this.attempts = init.attempts ?? 1;
    this.metadata = init.metadata;
  }

  override toString(): string {
    const where = this.method
      ? ` (${this.method.split("/").pop()}${this.attempts > 1 ? `, after ${this.attempts} attempts` : ""})`
      : "";
    return `${this.codeName}: ${this.message}${where}`;
  }
}

export class CancelledError extends SieveError {}
export class UnknownError extends SieveError {}
/** Bad input; the message names the field and the limit. Fix the request, do not retry. */
export class InvalidArgumentError extends SieveError {}
/** The call's deadline passed (the default deadline, or `timeoutMs`). */
export class DeadlineExceededError extends SieveError {}
export class NotFoundError extends SieveError {}
export class AlreadyExistsError extends SieveError {}
export class PermissionDeniedError extends SieveError {}
/** The server is full (retried with its retry delay) or a message is too large (not retried). */
export class ResourceExhaustedError extends SieveError {}
/** E.g. a required stage with no model, or `minGeneration` not reached in time. */
export class FailedPreconditionError extends SieveError {}
export class AbortedError extends SieveError {}
export class OutOfRangeError extends SieveError {}
export class UnimplementedError extends SieveError {}
/** A server bug; the message has an incident id to find in the server log. */
export class InternalError extends SieveError {}
/** The server is starting, unreachable, or a required stage could not run. Retried where safe. */
export class UnavailableError extends SieveError {}
export class DataLossError extends SieveError {}
/** No or a wrong API key. */
export class UnauthenticatedError extends SieveError {}

const BY_CODE: Partial<Record<Status, new (message: string, init: SieveErrorInit) => SieveError>> = {
  [Status.CANCELLED]: CancelledError,
  [Status.UNKNOWN]: UnknownError,
  [Status.INVALID_ARGUMENT]: InvalidArgumentError,
  [Status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Status.NOT_FOUND]: NotFoundError,
  [Status.ALREADY_EXISTS]: AlreadyExistsError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Status.FAILED_PRECONDITION]: FailedPreconditionError,
  [Status.ABORTED]: AbortedError,
  [Status.OUT_OF_RANGE]: OutOfRangeError,
  [Status.UNIMPLEMENTED]: UnimplementedError,
  [Status.INTERNAL]: InternalError,
  [Status.UNAVAILABLE]: UnavailableError,
  [Status.DATA_LOSS]: DataLossError,
  [Status.UNAUTHENTICATED]: UnauthenticatedError,
};

// google.rpc.Status {int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3}
// with Any {string type_url = 1; bytes value = 2}: read with protobuf's own wire reader.
export function decodeStatusDetails(bytes: Uint8Array): StatusDetail[] {
  const details: StatusDetail[] = [];
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wire] = reader.tag();
    if (field !== 3) {
      reader.skip(wire);
      continue;
    }
    const any = new BinaryReader(reader.bytes());
    const detail: StatusDetail = { typeUrl: "", value: new Uint8Array() };
    while (any.pos < any.len) {
      const [f, w] = any.tag();
      if (f === 1) detail.typeUrl = any.string();
      else if (f === 2) detail.value = any.bytes();
      else any.skip(w);
    }
    details.push(detail);
  }
  return details;
}

// google.rpc.RetryInfo {google.protobuf.Duration retry_delay = 1}, Duration {int64 seconds = 1; int32 nanos = 2}.
export function retryDelayMs(details: StatusDetail[]): number | undefined {
  const info = details.find((d) => d.typeUrl === RETRY_INFO_TYPE);
  if (!info) return undefined;
  const reader = new BinaryReader(info.value);
  while (reader.pos < reader.len) {
    const [field, wire] = reader.tag();
    if (field !== 1) {
      reader.skip(wire);
      continue;
    }
    const duration = new BinaryReader(reader.bytes());
    let seconds = 0;
    let nanos = 0;
    while (duration.pos < duration.len) {
      const [f, w] = duration.tag();
      if (f === 1) seconds = Number(duration.int64());
      else if (f === 2) nanos = duration.int32();
      else duration.skip(w);
    }
    return seconds * 1000 + nanos / 1e6;
  }
  return undefined;
}

/** The SieveError subclass for a failed grpc-js call. */
export function fromServiceError(err: ServiceError, method = "", attempts = 1): SieveError {
  let details: StatusDetail[] = [];
  for (const value of err.metadata?.get(DETAILS_TRAILER) ?? []) {
    if (typeof value !== "string") {
      try {
        details = decodeStatusDetails(value);
      } catch {
        details = [];
      }
    }
  }
  const code = typeof err.code === "number" ? err.code : Status.UNKNOWN;
  const Cls = BY_CODE[code] ?? SieveError;
  return new Cls(err.details || Status[code] || "error", {
    code,
    details,
    retryDelayMs: retryDelayMs(details),
    method,
    attempts,
    metadata: err.metadata,
    cause: err,
  });
}
