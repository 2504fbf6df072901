// Walkthrough: create a collection, index a JSONL file as a job and watch it, search with a cascade, and
// handle a degraded or failed stage. Needs a running server (`make run`; late interaction runs in the server
// from the collection's stored token vectors, the cross-encoder needs a configured model and its workers).
//   cd examples/node && npm install && node walkthrough.mjs [--address 127.0.0.1:50051] [--collection notes]
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  JobState,
  SieveClient,
  StageStatus,
  UnavailableError,
  jobStateToJSON,
  stageStatusToJSON,
  stageToJSON,
} from "sieve-client";

const { values: args } = parseArgs({
  options: {
    address: { type: "string", default: "127.0.0.1:50051" },
    collection: { type: "string", default: "notes" },
    file: { type: "string", default: fileURLToPath(new URL("../data/notes.jsonl", import.meta.url)) },
  },
});
const stageName = (stage) => stageToJSON(stage).replace("STAGE_", "").toLowerCase();

const client = new SieveClient(args.address);
try {
  // 1. A collection.
  try {
    // tokenStorage: the collection stores its documents' token vectors, so late interaction can run.
    await client.createCollection(args.collection, {
      metric: "cosine",
      defaults: { retrieveCandidates: 50 },
      tokenStorage: { poolFactor: 4 },
    });
    console.log(`created collection ${args.collection}`);
  } catch (err) {
    if (!(err instanceof AlreadyExistsError)) throw err;
    console.log(`collection ${args.collection} exists; indexing into it again (idempotent by id)`);
  }

  // 2. Index a JSONL file as a background job. uploadIndexJob sends the file, so the server need not see
  //    this disk (startIndexJob(collection, "/abs/path.jsonl") has the server read it instead).
  let job = await client.uploadIndexJob(args.collection, args.file);
  console.log(`job ${job.id} started: ${jobStateToJSON(job.state)}`);
  for await (const update of client.watchJob(job.id, { minIntervalMs: 200 })) {
    job = update;
    console.log(`  job ${job.id}: ${jobStateToJSON(job.state)} ${job.done}/${job.total ?? "?"} lines, ${job.failed} bad`);
  }
  if (job.state !== JobState.JOB_STATE_SUCCEEDED) throw new Error(`job ${job.id} ended ${jobStateToJSON(job.state)}: ${job.reason}`);
  if (job.failed) {
    for (const e of (await client.getJob(job.id, { maxErrors: 10 })).errors) console.log(`  bad line ${e.line}: ${e.reason}`);
  }

  // 3. Search with a cascade: 20 candidates from the bi-encoder, re-ranked by late interaction (keep 10),
  //    then the cross-encoder, both best-effort. minGeneration: see everything the job committed.
  const response = await client.search(args.collection, "how does light carry energy?", {
    topK: 3,
    retrieveCandidates: 20,
    lateInteraction: "best_effort",
    lateInteractionKeep: 10,
    crossEncoder: "best_effort",
    minGeneration: job.generation,
  });
  for (const hit of response.hits) {
    const scores = hit.stageScores.map((s) => `${stageName(s.stage)} ${s.score.toFixed(3)}`).join(", ");
    console.log(`${hit.id.padEnd(10)} ${hit.score.toFixed(3)}  [${scores}]  ${hit.text.slice(0, 60)}`);
  }

  // 4. A best-effort stage that cannot run is DEGRADED: the hits keep the previous stage's order.
  for (const stage of response.stages) {
    console.log(`  stage ${stageName(stage.stage)}: ${stageStatusToJSON(stage.status)} in ${stage.tookMs.toFixed(1)} ms ${stage.reason}`);
    if (stage.status === StageStatus.STAGE_STATUS_DEGRADED) {
      console.log(`  -> ${stageName(stage.stage)} was skipped for this answer: ${stage.reason}`);
    }
  }
  //    A *required* stage that cannot run fails the call: FailedPreconditionError when the server has no
  //    model for it, UnavailableError when its workers are missing (retried until the deadline).
  for (const mode of ["crossEncoder", "lateInteraction"]) {
    try {
      await client.search(args.collection, "light", { topK: 3, timeoutMs: 5000, [mode]: "required" });
      console.log(`required ${mode}: completed`);
    } catch (err) {
      if (err instanceof FailedPreconditionError) console.log(`required ${mode}: failed, ${err.codeName}: ${err.message}`);
      else if (err instanceof UnavailableError) {
        console.log(`required ${mode}: failed after ${err.attempts} attempts, ${err.codeName}: ${err.message}`);
      } else throw err;
    }
  }
} finally {
  client.close();
}
