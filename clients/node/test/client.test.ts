// The TypeScript client against a live Sieve server that this test starts (every RPC, errors, deadlines,
// the examples), and against fake grpc-js servers (default deadline, RetryInfo, retries and what is never
// retried, a server that starts late, TLS and the API key).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import {
  type sendUnaryData,
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  status as Status,
} from "@grpc/grpc-js";
import {
  CollectionServiceService,
  type CreateCollectionRequest,
  type CreateCollectionResponse,
} from "../src/gen/sieve/v1/collections";
import { type SearchRequest, SearchResponse, SearchServiceService } from "../src/gen/sieve/v1/search";
import {
  AlreadyExistsError,
  API_KEY_HEADER,
  DeadlineExceededError,
  type DocumentInput,
  FailedPreconditionError,
  InvalidArgumentError,
  isRetryable,
  JobState,
  NotFoundError,
  ResourceExhaustedError,
  SieveClient,
  SieveError,
  spansToStringIndices,
  Stage,
  StageStatus,
  UnavailableError,
} from "../src";
import { freePort, type LiveServer, NOTES, ROOT, retryInfoTrailer, selfSigned, startServer } from "./helpers";

const FAST_RETRY = { maxAttempts: 30, initialBackoffMs: 50, maxBackoffMs: 300 };
// For servers that start late: bounded by the call's deadline, not by attempts (a busy machine is slow).
const PATIENT = { ...FAST_RETRY, maxAttempts: 10_000 };
const QUICK_RECONNECT = { "grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 300 };
const unique = () => `node-${Math.random().toString(16).slice(2, 12)}`;

describe("against a live server", () => {
  let server: LiveServer;
  let client: SieveClient;

  before(async () => {
    server = await startServer();
    client = new SieveClient(server.address);
  });
  after(async () => {
    client?.close();
    await server?.stop();
  });

  test("searchStream and evidence as JavaScript string indices", async () => {
    const name = unique();
    await client.createCollection(name, { defaults: { lateInteraction: "best_effort" } });
    // Characters outside the BMP before the words: code points and UTF-16 indices differ by one each.
    await client.upsertDocuments(name, [
      { id: "owl", text: "🦉🌙 The owl hunts small mice at night." },
      { id: "cat", text: "The cat sat on the warm mat." },
    ]);
    const messages = [];
    for await (const m of client.searchStream(name, "owl hunting mice", { topK: 2 })) messages.push(m);
    assert.deepEqual(messages.map((m) => m.stage), [Stage.STAGE_RETRIEVE, Stage.STAGE_LATE_INTERACTION]);
    assert.deepEqual(messages.map((m) => m.final), [false, true]);
    const searched = await client.search(name, "owl hunting mice", { topK: 2 });
    const final = messages[1].result!;
    assert.deepEqual(final.hits.map((h) => [h.id, h.evidence]), searched.hits.map((h) => [h.id, h.evidence]));
    const owl = searched.hits.find((h) => h.id === "owl")!;
    const matched = owl.evidence.map((s) => owl.text.slice(s.start, s.end).toLowerCase());
    assert.ok(matched.some((t) => t.includes("owl")), JSON.stringify(matched));
    assert.ok(matched.every((t) => t.trim().length > 0 && !t.includes("\ud83e")), JSON.stringify(matched));
    await client.deleteCollection(name);
  });

  test("every RPC", async () => {
    const name = unique();
    const created = await client.createCollection(name, { metric: "cosine", defaults: { retrieveCandidates: 40 } });
    assert.equal(created.name, name);
    assert.equal(created.dimensions, 384);
    assert.equal(created.defaults?.retrieveCandidates, 40);
    assert.equal((await client.getCollection(name)).embeddingModelId, created.embeddingModelId);
    assert.ok((await client.listCollections()).some((c) => c.name === name));

    const written = await client.upsertDocuments(name, [
      { id: "cat", text: "The cat sat on the warm mat.", metadata: { topic: "animals" } },
      { id: "quark", text: "Quarks are bound by the strong force.", metadata: { topic: "physics" } },
      { id: "photon", text: "A photon is a quantum of light.", metadata: { topic: "physics" } },
    ]);
    assert.deepEqual([written.upserted, written.generation], [3, 1]);
    const got = await client.getDocuments(name, ["cat", "nope"]);
    assert.deepEqual(got.documents.map((d) => d.id), ["cat"]);
    assert.deepEqual(got.missingIds, ["nope"]);
    assert.equal(got.documents[0].metadata.topic, "animals");

    const response = await client.search(name, "subatomic particles", {
      topK: 2,
      filter: { topic: "physics" },
      minGeneration: written.generation,
    });
    assert.equal(response.hits[0].id, "quark");
    assert.equal(response.stages[0].stage, Stage.STAGE_RETRIEVE);
    assert.ok(Math.abs(response.hits[0].stageScores[0].score - response.hits[0].score) < 1e-9);

    const cascade = await client.search(name, "light", { lateInteraction: "best_effort", crossEncoder: "best_effort" });
    const late = cascade.stages.find((s) => s.stage === Stage.STAGE_LATE_INTERACTION);
    assert.equal(late?.status, StageStatus.STAGE_STATUS_DEGRADED); // no Redis or worker behind this server
    assert.ok(late?.reason);

    const deleted = await client.deleteDocuments(name, ["cat", "nope"]);
    assert.deepEqual([deleted.deleted, deleted.notFound], [1, 1]);

    // Jobs: a file the server reads, and an upload; each followed to the end.
    const dir = mkdtempSync(join(tmpdir(), "sieve-node-job-"));
    copyFileSync(NOTES, join(dir, "notes.jsonl"));
    const job = await client.startIndexJob(name, join(dir, "notes.jsonl"), { format: "sieve", batchSize: 8 });
    assert.equal(job.collection, name);
    const seen = [];
    for await (const j of client.watchJob(job.id, { minIntervalMs: 50 })) seen.push(j);
    assert.equal(seen.at(-1)?.state, JobState.JOB_STATE_SUCCEEDED);
    assert.equal(seen.at(-1)?.done, 20);
    const bytes = readFileSync(NOTES);
    const chunks = Array.from({ length: Math.ceil(bytes.length / 100) }, (_, i) => bytes.subarray(i * 100, i * 100 + 100));
    const uploaded = await client.uploadIndexJob(name, chunks);
    await assert.rejects(client.uploadIndexJob("no-such-collection", NOTES), NotFoundError);
    let last;
    for await (const j of client.watchJob(uploaded.id)) last = j;
    assert.equal(last?.state, JobState.JOB_STATE_SUCCEEDED);
    const docsJob = await client.uploadIndexJob(name, [{ id: "extra", text: "An extra note about owls." }]);
    for await (const j of client.watchJob(docsJob.id)) last = j;
    assert.equal(last?.done, 1);
    assert.equal((await client.getJob(job.id, { maxErrors: 5 })).job?.id, job.id);
    const listed = (await client.listJobs({ collection: name })).map((j) => j.id);
    assert.ok(listed.includes(job.id) && listed.includes(uploaded.id));
    await assert.rejects(client.cancelJob(job.id), FailedPreconditionError); // it succeeded long ago
    assert.equal((await client.getCollection(name)).documentCount, 21); // the 20 notes and "extra"

    await client.deleteCollection(name);
    await assert.rejects(client.getCollection(name), (err: unknown) => {
      assert.ok(err instanceof NotFoundError && err instanceof SieveError);
      assert.equal(err.code, Status.NOT_FOUND);
      assert.equal(err.codeName, "NOT_FOUND");
      assert.match(err.message, /does not exist/);
      assert.equal(err.attempts, 1);
      return true;
    });
  });

  test("vectors of one's own and hybrid settings", async () => {
    const name = unique();
    const created = await client.createCollection(name);
    const unit = (seed: number) => {
      const v = Array.from({ length: created.dimensions }, (_, i) => Math.sin(seed * 7.3 + i * 1.7));
      const norm = Math.hypot(...v);
      return v.map((x) => x / norm);
    };
    const a = unit(1);
    const b = Float32Array.from(unit(2));
    const written = await client.upsertDocuments(
      name,
      [
        { id: "a", text: "quarks and gluons", vector: a },
        { id: "b", text: "owls hunt mice", vector: b },
        { id: "c", text: "the cat sat on the mat" },
      ],
      { embeddingModel: created.embeddingModel },
    );
    assert.equal(written.upserted, 3);
    for (const [id, v] of [["a", a], ["b", b]] as const) {
      const { hits } = await client.search(name, "", { queryVector: v, topK: 1, minGeneration: written.generation });
      assert.equal(hits[0].id, id);
      assert.ok(hits[0].score > 0.999, String(hits[0].score));
    }
    const fusion = (r: SearchResponse) => r.stages.find((s) => s.stage === Stage.STAGE_FUSION)?.method;
    const rrf = await client.search(name, "owls", { retrieval: "hybrid", fusion: "rrf", rrfK: 7 });
    assert.equal(fusion(rrf), "rrf k=7");
    assert.equal(rrf.hits[0].id, "b");
    const weighted = await client.search(name, "owls", { retrieval: "hybrid", fusion: "weighted", denseWeight: 0.25 });
    assert.equal(fusion(weighted), "weighted dense=0.25");
    const lexical = await client.search(name, "cat", { retrieval: "lexical" });
    assert.equal(lexical.stages[0].stage, Stage.STAGE_LEXICAL);
    assert.equal(lexical.hits[0].id, "c");
    await assert.rejects(client.search(name, "owls", { retrieval: "sparse" as "dense" }), TypeError);
    await client.deleteCollection(name);
  });

  test("errors carry status and message", async () => {
    const name = unique();
    await client.createCollection(name);
    await assert.rejects(client.createCollection(name), AlreadyExistsError);
    await assert.rejects(client.search(name, "x", { topK: 100_000 }), (err: unknown) => {
      assert.ok(err instanceof InvalidArgumentError);
      assert.match(err.message, /top_k/);
      assert.equal(err.retryDelayMs, undefined);
      return true;
    });
    await assert.rejects(client.search(name, "x", { crossEncoder: "required" }), FailedPreconditionError);
    await assert.rejects(client.search(name, "x", { lateInteraction: "sometimes" as "off" }), TypeError);
    await assert.rejects(client.search(name, "x", { timeoutMs: 0 }), DeadlineExceededError);
    await client.deleteCollection(name);
  });

  test("the examples run as they are", async () => {
    // The examples import "sieve-client", a file: dependency that `npm install` in examples/node links to
    // this package. Make that link in a scratch folder, so this package's tests need only its own `npm ci`.
    // The scratch folder mirrors examples/ (the walkthrough reads ../data/notes.jsonl).
    const scratch = mkdtempSync(join(tmpdir(), "sieve-examples-"));
    const examples = join(scratch, "node");
    mkdirSync(join(examples, "node_modules"), { recursive: true });
    mkdirSync(join(scratch, "data"));
    copyFileSync(NOTES, join(scratch, "data", "notes.jsonl"));
    symlinkSync(resolve(__dirname, "..", ".."), join(examples, "node_modules", "sieve-client"), "dir");
    for (const script of ["quickstart.mjs", "walkthrough.mjs"]) {
      copyFileSync(join(ROOT, "examples", "node", script), join(examples, script));
    }
    for (const script of ["quickstart.mjs", "walkthrough.mjs"]) {
      const { stdout } = await promisify(execFile)(
        process.execPath,
        [script, "--address", server.address, "--collection", unique()],
        { cwd: examples, timeout: 60_000 },
      );
      if (script === "walkthrough.mjs") {
        assert.match(stdout, /SUCCEEDED/);
        assert.match(stdout, /DEGRADED/);
      } else {
        assert.match(stdout, /quark/);
      }
    }
  });
});

interface Fake {
  server: Server;
  port: number;
  address: string;
  searches: { deadline: number; metadata: Record<string, unknown> }[];
  creates: number;
  searchScript: ((callback: sendUnaryData<SearchResponse>) => boolean)[];
  createScript: ((callback: sendUnaryData<CreateCollectionResponse>) => boolean)[];
}

async function startFake(options: { port?: number; tls?: { key: Buffer; cert: Buffer } } = {}): Promise<Fake> {
  const server = new Server();
  const fake: Fake = { server, port: 0, address: "", searches: [], creates: 0, searchScript: [], createScript: [] };
  server.addService(SearchServiceService, {
    search(call: ServerUnaryCall<SearchRequest, SearchResponse>, callback: sendUnaryData<SearchResponse>) {
      const deadline = call.getDeadline();
      fake.searches.push({
        deadline: deadline instanceof Date ? deadline.getTime() - Date.now() : Number(deadline) - Date.now(),
        metadata: call.metadata.getMap(),
      });
      const step = fake.searchScript.shift();
      if (step && step(callback)) return;
      callback(null, SearchResponse.fromPartial({ generation: 7 }));
    },
  });
  server.addService(CollectionServiceService, {
    createCollection(
      call: ServerUnaryCall<CreateCollectionRequest, CreateCollectionResponse>,
      callback: sendUnaryData<CreateCollectionResponse>,
    ) {
      fake.creates += 1;
      const step = fake.createScript.shift();
      if (step && step(callback)) return;
      callback(null, { collection: call.request.collection });
    },
    getCollection: () => undefined,
    listCollections: () => undefined,
    deleteCollection: () => undefined,
  });
  const creds = options.tls
    ? ServerCredentials.createSsl(null, [{ private_key: options.tls.key, cert_chain: options.tls.cert }])
    : ServerCredentials.createInsecure();
  fake.port = await new Promise<number>((done, fail) =>
    server.bindAsync(`127.0.0.1:${options.port ?? 0}`, creds, (err, port) => (err ? fail(err) : done(port))),
  );
  fake.address = `127.0.0.1:${fake.port}`;
  return fake;
}

const refuse =
  (code: Status, details: string, retryDelayMs?: number) =>
  (callback: sendUnaryData<never>): boolean => {
    callback({
      code,
      details,
      metadata: retryDelayMs === undefined ? undefined : retryInfoTrailer(code, details, retryDelayMs),
    });
    return true;
  };

test("spansToStringIndices converts code points to UTF-16 indices", () => {
  const text = "😀 café 𝔘nicode and ascii";
  // Code points: "café" is [2, 6), "𝔘nicode" [7, 14), "ascii" [19, 24).
  const spans = [
    { start: 2, end: 6, score: 1 },
    { start: 7, end: 14, score: 0.5 },
    { start: 19, end: 24, score: 0.1 },
  ];
  const converted = spansToStringIndices(text, spans);
  assert.deepEqual(converted.map((s) => text.slice(s.start, s.end)), ["café", "𝔘nicode", "ascii"]);
  assert.deepEqual(converted.map((s) => s.score), [1, 0.5, 0.1]);
  assert.deepEqual(spansToStringIndices("plain", []), []);
});

describe("against fake servers", () => {
  let fake: Fake;
  before(async () => {
    fake = await startFake();
  });
  after(() => fake.server.forceShutdown());

  test("bad documents are refused before any call, as the Python client refuses them", async () => {
    const client = new SieveClient(fake.address);
    const bad: [unknown, string][] = [
      [{ text: "no id" }, 'missing id ("id")'],
      [{ id: "d", text: "x", metadata: { year: 2020 } }, '"metadata" must be an object with string values'],
      [{ id: true, text: "x" }, 'id ("id") must be a string or an integer'],
      [{ id: "t", text: 3 }, '"text" must be a string'],
      [{ id: "m" }, 'missing "text"'],
    ];
    for (const [doc, reason] of bad) {
      await assert.rejects(
        client.upsertDocuments("c", [{ id: "ok", text: "fine" }, doc as DocumentInput]),
        (err: unknown) => {
          assert.ok(err instanceof InvalidArgumentError);
          assert.equal(err.message, `documents[1]: ${reason}`);
          return true;
        },
      );
    }
    client.close();
  });

  test("every call has a deadline", async () => {
    const client = new SieveClient(fake.address);
    await client.search("c", "q");
    await client.search("c", "q", { timeoutMs: 2500 });
    fake.searchScript.push((callback) => {
      setTimeout(() => callback(null, SearchResponse.fromPartial({})), 1000);
      return true;
    });
    const started = Date.now();
    await assert.rejects(client.search("c", "q", { timeoutMs: 300 }), DeadlineExceededError);
    assert.ok(Date.now() - started < 900);
    client.close();
    const [first, second] = fake.searches;
    assert.ok(first.deadline > 9000 && first.deadline <= 10_100, `default deadline: ${first.deadline}`);
    assert.ok(second.deadline > 2000 && second.deadline <= 2600, `per-call deadline: ${second.deadline}`);
  });

  test("RetryInfo is honoured", async () => {
    const client = new SieveClient(fake.address);
    fake.searches.length = 0;
    fake.searchScript.push(refuse(Status.RESOURCE_EXHAUSTED, "too many concurrent searches", 400));
    const started = Date.now();
    assert.equal((await client.search("c", "q")).generation, 7);
    const waited = Date.now() - started;
    assert.ok(waited >= 390 && waited < 1500, `waited ${waited} ms`);
    assert.equal(fake.searches.length, 2);
    // A delay longer than the time left ends the call at once with the server's error.
    fake.searchScript.push(refuse(Status.RESOURCE_EXHAUSTED, "full", 5000));
    await assert.rejects(client.search("c", "q", { timeoutMs: 2000 }), (err: unknown) => {
      assert.ok(err instanceof ResourceExhaustedError);
      assert.equal(err.retryDelayMs, 5000);
      assert.equal(err.details[0].typeUrl, "type.googleapis.com/google.rpc.RetryInfo");
      return true;
    });
    client.close();
  });

  test("UNAVAILABLE is retried with backoff for idempotent calls, up to maxAttempts", async () => {
    const retries: number[] = [];
    const client = new SieveClient(fake.address, { retry: FAST_RETRY, onRetry: (_e, ms) => retries.push(ms) });
    fake.searches.length = 0;
    fake.searchScript.push(...[1, 2, 3].map(() => refuse(Status.UNAVAILABLE, "busy")));
    assert.equal((await client.search("c", "q")).generation, 7);
    assert.equal(fake.searches.length, 4);
    assert.equal(retries.length, 3);
    client.close();
    const once = new SieveClient(fake.address, { retry: { maxAttempts: 2, initialBackoffMs: 10 } });
    fake.searchScript.push(...[1, 2, 3].map(() => refuse(Status.UNAVAILABLE, "busy")));
    await assert.rejects(once.search("c", "q"), (err: unknown) => {
      assert.ok(err instanceof UnavailableError);
      assert.equal(err.attempts, 2);
      assert.match(String(err), /after 2 attempts/);
      return true;
    });
    fake.searchScript.length = 0;
    once.close();
  });

  test("non-idempotent calls are retried only when refused before any work", async () => {
    const client = new SieveClient(fake.address, { retry: FAST_RETRY });
    fake.creates = 0;
    fake.createScript.push(refuse(Status.UNAVAILABLE, "connection reset"));
    await assert.rejects(client.createCollection("x"), UnavailableError);
    assert.equal(fake.creates, 1);
    fake.createScript.push(refuse(Status.UNAVAILABLE, "starting", 50), refuse(Status.RESOURCE_EXHAUSTED, "full", 50));
    fake.createScript.push(refuse(Status.UNAVAILABLE, "server is starting; retry shortly"));
    assert.equal((await client.createCollection("x")).name, "x");
    assert.equal(fake.creates, 5);
    client.close();
    assert.ok(!isRetryable("JobService/UploadIndexJob", Status.UNAVAILABLE, "server is starting", 100));
    assert.ok(!isRetryable("SearchService/Search", Status.RESOURCE_EXHAUSTED, "Received message larger than max", undefined));
  });

  test("a server that starts late", async () => {
    const port = await freePort();
    const client = new SieveClient(`127.0.0.1:${port}`, { retry: PATIENT, channelOptions: QUICK_RECONNECT });
    const retried: string[] = [];
    const watching = new SieveClient(`127.0.0.1:${port}`, {
      retry: PATIENT,
      channelOptions: QUICK_RECONNECT,
      onRetry: (err) => retried.push(err.message),
    });
    const creating = watching.createCollection("late", { timeoutMs: 30_000 });
    const searching = client.search("c", "q", { timeoutMs: 30_000 });
    await new Promise((done) => setTimeout(done, 1000));
    const late = await startFake({ port });
    try {
      assert.equal((await creating).name, "late");
      assert.equal((await searching).generation, 7);
      assert.equal(late.creates, 1); // the create was never sent while nothing listened
      assert.ok(retried.length > 0 && retried.every((m) => /no connection established/i.test(m)), String(retried));
    } finally {
      client.close();
      watching.close();
      late.server.forceShutdown();
    }
  });

  test("TLS and the API key", async () => {
    const tls = selfSigned();
    const secure = await startFake({ tls });
    try {
      const client = new SieveClient(secure.address, { rootCerts: tls.certPath, apiKey: "s3cret" });
      assert.equal(client.tls, true);
      assert.equal((await client.search("c", "q")).generation, 7);
      client.close();
      const bytes = new SieveClient(secure.address, { tls: true, rootCerts: tls.cert });
      assert.equal((await bytes.search("c", "q")).generation, 7);
      bytes.close();
      assert.deepEqual(secure.searches[0].metadata[API_KEY_HEADER], "Bearer s3cret");
      assert.equal(secure.searches[1].metadata[API_KEY_HEADER], undefined);
      const plain = new SieveClient(secure.address, { retry: { maxAttempts: 1 } });
      assert.equal(plain.tls, false);
      await assert.rejects(plain.search("c", "q", { timeoutMs: 2000 }), SieveError);
      plain.close();
    } finally {
      secure.server.forceShutdown();
    }
  });
});
