// SieveClient: one channel per client, shared by the four services' stubs and every call; close() it.
//
//   const client = new SieveClient("127.0.0.1:50051");
//   await client.createCollection("notes");
//   await client.upsertDocuments("notes", [{ id: "1", text: "The cat sat on the mat." }]);
//   const { hits } = await client.search("notes", "a cat", { lateInteraction: "best_effort" });
//   // hit.evidence: the matched parts of hit.text, as JavaScript string indices (converted from the
//   // server's Unicode code points): hit.text.slice(span.start, span.end).
//
// Every call has a deadline (Timeouts: 10 s by default, 120 s for writes, 24 h for streams; `timeoutMs`
// per call), is retried on UNAVAILABLE / RESOURCE_EXHAUSTED where that is safe (see retry.ts), and
// rejects with a SieveError subclass. Results are the generated sieve.v1 message types.
import { readFileSync, createReadStream } from "node:fs";
import {
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientUnaryCall,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
  status as Status,
} from "@grpc/grpc-js";
import { channelTarget, serviceConfig } from "./channel";
import { fromServiceError, InvalidArgumentError, SieveError } from "./errors";
import { DEFAULT_RETRY, isRetryable, nextWaitMs, type RetryPolicy } from "./retry";
import { type Collection, CollectionServiceClient, CreateCollectionRequest } from "./gen/sieve/v1/collections";
import { Filter, Fusion, Metric, Retrieval, SearchSettings, SearchTier, StageMode } from "./gen/sieve/v1/common";
import {
  type DeleteDocumentsResponse,
  Document,
  DocumentServiceClient,
  type GetDocumentsResponse,
  type UpsertDocumentsResponse,
} from "./gen/sieve/v1/documents";
import {
  GetJobRequest,
  type GetJobResponse,
  type Job,
  JobServiceClient,
  ListJobsRequest,
  SourceFormat,
  StartIndexJobRequest,
  UploadIndexJobRequest,
  type UploadIndexJobResponse,
  WatchJobRequest,
  type WatchJobResponse,
} from "./gen/sieve/v1/jobs";
import {
  SearchRequest,
  type SearchResponse,
  SearchServiceClient,
  type SearchStreamResponse,
  type Span,
} from "./gen/sieve/v1/search";

/** Sent with every call when the client has an API key: `authorization: Bearer <key>`. */
export const API_KEY_HEADER = "authorization";
export const DEFAULT_ADDRESS = "127.0.0.1:50051";
const MAX_MESSAGE_BYTES = 64 << 20;

/** Default deadlines in milliseconds; `timeoutMs` overrides them per call. A deadline covers retries. */
export interface Timeouts {
  default: number;
  /** upsertDocuments / deleteDocuments: a batch of 1000 texts is embedded before the call returns. */
  write: number;
  /** uploadIndexJob sends a whole file; watchJob follows a job until it ends. */
  stream: number;
}
export const DEFAULT_TIMEOUTS: Timeouts = { default: 10_000, write: 120_000, stream: 24 * 3600_000 };

export interface SieveClientOptions {
  /** Use TLS (implied by rootCerts or certChain); without rootCerts, the system's trust store. */
  tls?: boolean;
  /** PEM, as bytes or a file path. */
  rootCerts?: Buffer | string;
  privateKey?: Buffer | string;
  certChain?: Buffer | string;
  /** Sent as `authorization: Bearer <apiKey>` with every call. */
  apiKey?: string;
  timeouts?: Partial<Timeouts>;
  retry?: Partial<RetryPolicy>;
  /** Extra @grpc/grpc-js channel options (they win over the client's). */
  channelOptions?: ChannelOptions;
  /** Called before each retry (e.g. for logging). */
  onRetry?: (error: SieveError, waitMs: number) => void;
}

export interface CallOpts {
  /** Deadline of this call in milliseconds (retries included). */
  timeoutMs?: number;
}

export type StageModeArg = "off" | "best_effort" | "required" | StageMode;
export type MetricArg = "cosine" | "ip" | "l2" | Metric;
export type FormatArg = "auto" | "sieve" | "beir" | SourceFormat;
export type TierArg = "fast" | "balanced" | "best" | SearchTier;
export type RetrievalArg = "dense" | "lexical" | "hybrid" | Retrieval;
export type FusionArg = "rrf" | "weighted" | Fusion;
export interface DocumentInput {
  id: string;
  text: string;
  metadata?: Record<string, string>;
  /** The document's own vector, made by the collection's model (upsertDocuments' `embeddingModel` names
   * it): stored instead of embedding the text. */
  vector?: ArrayLike<number>;
}
export interface SettingsInput {
  retrieveCandidates?: number;
  efSearch?: number;
  lateInteraction?: StageModeArg;
  lateInteractionKeep?: number;
  crossEncoder?: StageModeArg;
  crossEncoderKeep?: number;
  /** A latency budget for the whole search (ms): the server plans its stages to fit (see StageReport.plan). */
  latencyBudgetMs?: number;
  /** A named budget with depths: "fast" (25 ms), "balanced" (60 ms), "best" (400 ms). */
  tier?: TierArg;
  /** First stage: "dense", "lexical" (BM25) or "hybrid" (both, fused). */
  retrieval?: RetrievalArg;
  /** How hybrid retrieval fuses: "rrf" (reciprocal rank fusion, with rrfK) or "weighted" (denseWeight). */
  fusion?: FusionArg;
  rrfK?: number;
  /** Weighted fusion's weight of the dense side, in [0, 1]. */
  denseWeight?: number;
}

export interface CreateCollectionOptions extends CallOpts {
  embeddingModel?: string;
  metric?: MetricArg;
  /** The collection's default search settings. */
  defaults?: SettingsInput;
  /** Store late-interaction token vectors in this format, e.g. { poolFactor: 4 } or
   * { poolFactor: 2, projectionDims: 128 } ({} for the server's default format). */
  tokenStorage?: { poolFactor?: number; projectionDims?: number };
}

export interface SearchOptions extends CallOpts, SettingsInput {
  /** Hits to return (0: the server default, 10). */
  topK?: number;
  /** {key: value, ...}: every condition must hold; or a Filter message. */
  filter?: Record<string, string> | Filter;
  /** Leave out hit texts and metadata. */
  omitDocuments?: boolean;
  /** Read your writes: search once the collection has at least this generation. */
  minGeneration?: number;
  /** Search by this vector (of the collection's model) instead of the query's embedding; the query may
   * then be "" unless lexical retrieval or a re-ranking stage needs the text. */
  queryVector?: ArrayLike<number>;
}

export interface UpsertOptions extends CallOpts {
  /** The model that made the documents' own vectors (name or name@revision): the collection's. */
  embeddingModel?: string;
}

export interface IndexJobOptions extends CallOpts {
  format?: FormatArg;
  /** Documents per embedding task (0: the server default). */
  batchSize?: number;
}

const STAGE_MODES: Record<string, StageMode> = {
  off: StageMode.STAGE_MODE_OFF,
  best_effort: StageMode.STAGE_MODE_BEST_EFFORT,
  "best-effort": StageMode.STAGE_MODE_BEST_EFFORT,
  required: StageMode.STAGE_MODE_REQUIRED,
};
const TIERS: Record<string, SearchTier> = {
  fast: SearchTier.SEARCH_TIER_FAST,
  balanced: SearchTier.SEARCH_TIER_BALANCED,
  best: SearchTier.SEARCH_TIER_BEST,
};
const METRICS: Record<string, Metric> = {
  cosine: Metric.METRIC_COSINE,
  ip: Metric.METRIC_INNER_PRODUCT,
  l2: Metric.METRIC_L2,
};
const RETRIEVALS: Record<string, Retrieval> = {
  dense: Retrieval.RETRIEVAL_DENSE,
  lexical: Retrieval.RETRIEVAL_LEXICAL,
  hybrid: Retrieval.RETRIEVAL_HYBRID,
};
const FUSIONS: Record<string, Fusion> = { rrf: Fusion.FUSION_RRF, weighted: Fusion.FUSION_WEIGHTED };
const FORMATS: Record<string, SourceFormat> = {
  auto: SourceFormat.SOURCE_FORMAT_UNSPECIFIED,
  sieve: SourceFormat.SOURCE_FORMAT_SIEVE,
  beir: SourceFormat.SOURCE_FORMAT_BEIR,
};

function lookup<T>(table: Record<string, T>, value: string | T, what: string): T {
  if (typeof value !== "string") return value;
  const found = table[value.toLowerCase()];
  if (found === undefined) throw new TypeError(`unknown ${what} ${JSON.stringify(value)}; one of ${Object.keys(table)}`);
  return found;
}

function settings(input: SettingsInput | undefined): SearchSettings {
  const s = input ?? {};
  return SearchSettings.fromPartial({
    retrieveCandidates: s.retrieveCandidates,
    efSearch: s.efSearch,
    lateInteraction: s.lateInteraction === undefined ? undefined : lookup(STAGE_MODES, s.lateInteraction, "stage mode"),
    lateInteractionKeep: s.lateInteractionKeep,
    crossEncoder: s.crossEncoder === undefined ? undefined : lookup(STAGE_MODES, s.crossEncoder, "stage mode"),
    crossEncoderKeep: s.crossEncoderKeep,
    latencyBudgetMs: s.latencyBudgetMs,
    tier: s.tier === undefined ? undefined : lookup(TIERS, s.tier, "search tier"),
    retrieval: s.retrieval === undefined ? undefined : lookup(RETRIEVALS, s.retrieval, "retrieval"),
    fusion: s.fusion === undefined ? undefined : lookup(FUSIONS, s.fusion, "fusion"),
    rrfK: s.rrfK,
    denseWeight: s.denseWeight,
  });
}

/** Evidence spans with JavaScript string indices: the server sends offsets in Unicode code points (as
 * Python indexes a str); a JavaScript string indexes UTF-16 code units, so every character outside the
 * Basic Multilingual Plane (emoji, many CJK extensions) before a span shifts it by one. The result's
 * `text.slice(span.start, span.end)` is the matched text. */
export function spansToStringIndices(text: string, spans: Span[]): Span[] {
  if (spans.length === 0) return spans;
  const wanted = new Set(spans.flatMap((s) => [s.start, s.end]));
  const at = new Map<number, number>();
  let point = 0;
  let unit = 0;
  for (const ch of text) {
    if (wanted.has(point)) at.set(point, unit);
    point += 1;
    unit += ch.length;
  }
  at.set(point, unit); // the end of the text
  return spans.map((s) => ({ ...s, start: at.get(s.start) ?? unit, end: at.get(s.end) ?? unit }));
}

/** Converts every hit's evidence to string indices, in place (hits without text keep code points). */
function withStringIndices(response: SearchResponse): SearchResponse {
  for (const hit of response.hits) {
    if (hit.text) hit.evidence = spansToStringIndices(hit.text, hit.evidence);
  }
  return response;
}

function searchRequest(collection: string, query: string, options: SearchOptions): SearchRequest {
  let filter: Filter | undefined;
  if (options.filter !== undefined) {
    filter =
      "all" in options.filter && Array.isArray(options.filter.all)
        ? (options.filter as Filter)
        : { all: Object.entries(options.filter as Record<string, string>).map(([key, equals]) => ({ key, equals })) };
  }
  return SearchRequest.fromPartial({
    collection,
    query,
    topK: options.topK ?? 0,
    filter,
    settings: settings(options),
    omitDocuments: options.omitDocuments ?? false,
    minGeneration: options.minGeneration ?? 0,
    queryVector: options.queryVector === undefined ? [] : Array.from(options.queryVector),
  });
}

/** A Document from the caller's object, checked as the server checks a JSONL line (the same reasons, in
 * the same words as the Python client's `_build.document`): bad input rejects with InvalidArgumentError
 * naming documents[index], before any call is made. */
function toDocument(d: DocumentInput | Document, index = 0): Document {
  const bad = (reason: string) =>
    new InvalidArgumentError(`documents[${index}]: ${reason}`, { code: Status.INVALID_ARGUMENT });
  if (d === null || typeof d !== "object" || Array.isArray(d)) throw bad("not a JSON object");
  const input = d as unknown as Record<string, unknown>;
  const id = input.id;
  if (id === undefined || id === null) throw bad('missing id ("id")');
  if (!(typeof id === "string" || (typeof id === "number" && Number.isInteger(id)))) {
    throw bad('id ("id") must be a string or an integer');
  }
  const text = input.text;
  if (text === undefined || text === null) throw bad('missing "text"');
  if (typeof text !== "string") throw bad('"text" must be a string');
  const metadata = input.metadata ?? {};
  if (
    typeof metadata !== "object" ||
    Array.isArray(metadata) ||
    !Object.values(metadata as object).every((v) => typeof v === "string")
  ) {
    throw bad('"metadata" must be an object with string values');
  }
  return Document.fromPartial({ id: String(id), text, metadata: metadata as Record<string, string> });
}

function read(value: Buffer | string | undefined): Buffer | null {
  if (value === undefined) return null;
  return typeof value === "string" ? readFileSync(value) : value;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

export class SieveClient {
  /** As given: one "host:port", or several servers (see channel.ts). */
  readonly address: string | readonly string[];
  readonly tls: boolean;
  readonly timeouts: Timeouts;
  readonly retry: RetryPolicy;
  private readonly metadata: Metadata;
  private readonly onRetry?: (error: SieveError, waitMs: number) => void;
  private readonly collections: CollectionServiceClient;
  private readonly documents: DocumentServiceClient;
  private readonly searches: SearchServiceClient;
  private readonly jobs: JobServiceClient;

  /** `address`: one "host:port" (a DNS name that resolves to several servers spreads the calls over them),
   * or several servers as a list of "IP:port" (or one comma-separated string): calls are spread over the
   * servers that are up and moved to another on UNAVAILABLE (channel.ts). */
  constructor(address: string | readonly string[] = DEFAULT_ADDRESS, options: SieveClientOptions = {}) {
    this.address = address;
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...options.timeouts };
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    this.onRetry = options.onRetry;
    this.metadata = new Metadata();
    if (options.apiKey) this.metadata.set(API_KEY_HEADER, `Bearer ${options.apiKey}`);
    this.tls = Boolean(options.tls || options.rootCerts || options.certChain);
    const creds: ChannelCredentials = this.tls
      ? grpcCredentials.createSsl(read(options.rootCerts), read(options.privateKey), read(options.certChain))
      : grpcCredentials.createInsecure();
    const { target, count } = channelTarget(address);
    const channelOptions: ChannelOptions = {
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
      "grpc.primary_user_agent": "sieve-client-node/0.2.0",
      "grpc.service_config": serviceConfig(count),
      ...options.channelOptions,
    };
    this.collections = new CollectionServiceClient(target, creds, channelOptions);
    // One channel for all four services.
    const shared = { ...channelOptions, channelOverride: this.collections.getChannel() };
    this.documents = new DocumentServiceClient(target, creds, shared);
    this.searches = new SearchServiceClient(target, creds, shared);
    this.jobs = new JobServiceClient(target, creds, shared);
  }

  close(): void {
    this.collections.close();
  }

  private deadline(timeoutMs: number | undefined, fallback: number): number {
    return Date.now() + (timeoutMs ?? fallback);
  }

  private async retryWait(error: SieveError, attempt: number, deadline: number): Promise<boolean> {
    if (!isRetryable(error.method, error.code, error.message, error.retryDelayMs)) return false;
    const wait = nextWaitMs(this.retry, attempt, error.retryDelayMs, deadline - Date.now());
    if (wait === undefined) return false;
    this.onRetry?.(error, wait);
    await sleep(wait);
    return true;
  }

  private async unary<Req, Res>(
    method: string,
    call: UnaryMethod<Req, Res>,
    request: Req,
    timeoutMs: number | undefined,
    fallback = this.timeouts.default,
  ): Promise<Res> {
    const deadline = this.deadline(timeoutMs, fallback);
    for (let attempt = 1; ; attempt++) {
      try {
        return await new Promise<Res>((resolve, reject) => {
          call(request, this.metadata, { deadline: new Date(Math.max(deadline, Date.now())) }, (err, res) =>
            err ? reject(err) : resolve(res),
          );
        });
      } catch (err) {
        const error = fromServiceError(err as ServiceError, method, attempt);
        if (!(await this.retryWait(error, attempt, deadline))) throw error;
      }
    }
  }

  // -- collections ------------------------------------------------------------------------------
  /** Creates a collection (AlreadyExistsError if the name is taken). */
  async createCollection(name: string, options: CreateCollectionOptions = {}): Promise<Collection> {
    const request = CreateCollectionRequest.fromPartial({
      collection: {
        name,
        embeddingModel: options.embeddingModel ?? "",
        metric: options.metric === undefined ? Metric.METRIC_UNSPECIFIED : lookup(METRICS, options.metric, "metric"),
        defaults: settings(options.defaults),
        tokenStorage: options.tokenStorage === undefined ? undefined : { ...options.tokenStorage },
      },
    });
    const c = this.collections;
    const response = await this.unary("CollectionService/CreateCollection", c.createCollection.bind(c), request, options.timeoutMs);
    return response.collection!;
  }

  async getCollection(name: string, options: CallOpts = {}): Promise<Collection> {
    const c = this.collections;
    const response = await this.unary("CollectionService/GetCollection", c.getCollection.bind(c), { name }, options.timeoutMs);
    return response.collection!;
  }

  async listCollections(options: CallOpts = {}): Promise<Collection[]> {
    const c = this.collections;
    const response = await this.unary("CollectionService/ListCollections", c.listCollections.bind(c), {}, options.timeoutMs);
    return response.collections;
  }

  async deleteCollection(name: string, options: CallOpts = {}): Promise<void> {
    const c = this.collections;
    await this.unary("CollectionService/DeleteCollection", c.deleteCollection.bind(c), { name }, options.timeoutMs);
  }

  // -- documents --------------------------------------------------------------------------------
  /** Inserts or replaces documents as one atomic batch; `generation` of the response can be passed as
   * `minGeneration` to a search to read this write. Documents may carry their own `vector`, stored instead
   * of embedding the text; `options.embeddingModel` must then name the collection's model. */
  async upsertDocuments(
    collection: string,
    documents: Iterable<DocumentInput | Document>,
    options: UpsertOptions = {},
  ): Promise<UpsertDocumentsResponse> {
    const d = this.documents;
    const request = {
      collection,
      documents: [...documents].map((doc, i) => {
        const message = toDocument(doc, i);
        // toDocument checks what a JSONL line may hold (no vectors); a vector is passed on as given.
        const vector = (doc as { vector?: ArrayLike<number> }).vector;
        return vector === undefined ? message : { ...message, vector: Array.from(vector) };
      }),
      embeddingModel: options.embeddingModel ?? "",
    };
    return this.unary("DocumentService/UpsertDocuments", d.upsertDocuments.bind(d), request, options.timeoutMs, this.timeouts.write);
  }

  async getDocuments(collection: string, ids: string[], options: CallOpts = {}): Promise<GetDocumentsResponse> {
    const d = this.documents;
    return this.unary("DocumentService/GetDocuments", d.getDocuments.bind(d), { collection, ids }, options.timeoutMs);
  }

  async deleteDocuments(collection: string, ids: string[], options: CallOpts = {}): Promise<DeleteDocumentsResponse> {
    const d = this.documents;
    return this.unary(
      "DocumentService/DeleteDocuments",
      d.deleteDocuments.bind(d),
      { collection, ids },
      options.timeoutMs,
      this.timeouts.write,
    );
  }

  // -- search -----------------------------------------------------------------------------------
  /** Searches a collection. Stage modes: "off", "best_effort", "required" (unset: the collection default).
   * A best-effort stage that cannot run is reported DEGRADED (with a reason) in `stages`; a required one
   * rejects with UnavailableError (no worker) or FailedPreconditionError (no model). */
  async search(collection: string, query: string, options: SearchOptions = {}): Promise<SearchResponse> {
    const request = searchRequest(collection, query, options);
    const s = this.searches;
    return withStringIndices(await this.unary("SearchService/Search", s.search.bind(s), request, options.timeoutMs));
  }

  /** The same search as it improves: the first stage's ranking as soon as it exists, then each later
   * stage's (`message.stage`, `message.result`); the last message has `final` set and its result is what
   * `search` returns (`deadlineReached`: time ran out and the last ranking stands). Evidence offsets are
   * converted to string indices as in `search`. Retried only before the first message. */
  async *searchStream(collection: string, query: string, options: SearchOptions = {}): AsyncGenerator<SearchStreamResponse> {
    const method = "SearchService/SearchStream";
    const deadline = this.deadline(options.timeoutMs, this.timeouts.default);
    const request = searchRequest(collection, query, options);
    for (let attempt = 1; ; attempt++) {
      const call = this.searches.searchStream(request, this.metadata, { deadline: new Date(Math.max(deadline, Date.now())) });
      let received = false;
      try {
        for await (const message of call as AsyncIterable<SearchStreamResponse>) {
          received = true;
          if (message.result) withStringIndices(message.result);
          yield message;
        }
        return;
      } catch (err) {
        const error = fromServiceError(err as ServiceError, method, attempt);
        if (received || !(await this.retryWait(error, attempt, deadline))) throw error;
      } finally {
        call.cancel();
      }
    }
  }

  // -- jobs -------------------------------------------------------------------------------------
  /** Indexes a JSONL file that the *server* can read (absolute path) in the background; returns the job
   * at once. For a file on this machine use uploadIndexJob. */
  async startIndexJob(collection: string, path: string, options: IndexJobOptions = {}): Promise<Job> {
    const request = StartIndexJobRequest.fromPartial({
      collection,
      path,
      format: lookup(FORMATS, options.format ?? "auto", "source format"),
      batchSize: options.batchSize ?? 0,
    });
    const j = this.jobs;
    return (await this.unary("JobService/StartIndexJob", j.startIndexJob.bind(j), request, options.timeoutMs)).job!;
  }

  /** Sends a local JSONL file (a path, or its bytes as chunks cut anywhere) or documents to the server,
   * which stores them durably and indexes them as a job; resolves once the upload is on the server's
   * disk. Not retried. */
  async uploadIndexJob(
    collection: string,
    source: string | Iterable<DocumentInput | Uint8Array> | AsyncIterable<DocumentInput | Uint8Array>,
    options: IndexJobOptions = {},
  ): Promise<Job> {
    const method = "JobService/UploadIndexJob";
    const deadline = new Date(this.deadline(options.timeoutMs, this.timeouts.stream));
    let failed: unknown;
    const response = await new Promise<UploadIndexJobResponse>((resolve, reject) => {
      const stream = this.jobs.uploadIndexJob(this.metadata, { deadline }, (err, res) =>
        err ? reject(fromServiceError(err, method)) : resolve(res),
      );
      const send = (message: UploadIndexJobRequest) =>
        new Promise<void>((done) => (stream.write(message) ? done() : stream.once("drain", () => done())));
      (async () => {
        await send(
          UploadIndexJobRequest.fromPartial({
            collection,
            batchSize: options.batchSize ?? 0,
            format: lookup(FORMATS, options.format ?? "auto", "source format"),
          }),
        );
        if (typeof source === "string") {
          for await (const chunk of createReadStream(source, { highWaterMark: 1 << 20 })) {
            await send(UploadIndexJobRequest.fromPartial({ jsonl: chunk as Buffer }));
          }
        } else {
          let group: Document[] = [];
          let index = 0;
          for await (const item of source) {
            if (item instanceof Uint8Array) {
              await send(UploadIndexJobRequest.fromPartial({ jsonl: Buffer.from(item.buffer, item.byteOffset, item.byteLength) }));
              continue;
            }
            group.push(toDocument(item, index++));
            if (group.length >= 500) {
              await send(UploadIndexJobRequest.fromPartial({ documents: group }));
              group = [];
            }
          }
          if (group.length) await send(UploadIndexJobRequest.fromPartial({ documents: group }));
        }
        stream.end();
      })().catch((err) => {
        failed = err;
        stream.cancel();
      });
    }).catch((err) => {
      throw failed ?? err;
    });
    return response.job!;
  }

  /** A job and a page of its bad lines (`errors`; `nextErrorsAfterLine` for the next page). */
  async getJob(
    id: string,
    options: CallOpts & { maxErrors?: number; errorsAfterLine?: number } = {},
  ): Promise<GetJobResponse> {
    const request = GetJobRequest.fromPartial({ id, maxErrors: options.maxErrors, errorsAfterLine: options.errorsAfterLine });
    const j = this.jobs;
    return this.unary("JobService/GetJob", j.getJob.bind(j), request, options.timeoutMs);
  }

  /** The job now and whenever it changes, until it ends (the last one has a final state). Reconnects
   * when the stream breaks with UNAVAILABLE (e.g. a server restart); attempts count again after every
   * message. Breaking out of the loop cancels the stream. */
  async *watchJob(id: string, options: CallOpts & { minIntervalMs?: number } = {}): AsyncGenerator<Job> {
    const method = "JobService/WatchJob";
    const deadline = this.deadline(options.timeoutMs, this.timeouts.stream);
    const request = WatchJobRequest.fromPartial({ id, minIntervalMs: options.minIntervalMs });
    for (let attempt = 1; ; attempt++) {
      const call = this.jobs.watchJob(request, this.metadata, { deadline: new Date(Math.max(deadline, Date.now())) });
      try {
        for await (const message of call as AsyncIterable<WatchJobResponse>) {
          attempt = 1;
          yield message.job!;
        }
        return;
      } catch (err) {
        const error = fromServiceError(err as ServiceError, method, attempt);
        if (!(await this.retryWait(error, attempt, deadline))) throw error;
      } finally {
        call.cancel();
      }
    }
  }

  async cancelJob(id: string, options: CallOpts = {}): Promise<Job> {
    const j = this.jobs;
    return (await this.unary("JobService/CancelJob", j.cancelJob.bind(j), { id }, options.timeoutMs)).job!;
  }

  async listJobs(options: CallOpts & { collection?: string; limit?: number } = {}): Promise<Job[]> {
    const request = ListJobsRequest.fromPartial({ collection: options.collection, limit: options.limit });
    const j = this.jobs;
    return (await this.unary("JobService/ListJobs", j.listJobs.bind(j), request, options.timeoutMs)).jobs;
  }
}
