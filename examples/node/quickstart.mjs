// Quickstart: create a collection, add documents, search.
//   cd examples/node && npm install && node quickstart.mjs [--address 127.0.0.1:50051] [--collection quickstart]
import { parseArgs } from "node:util";
import { AlreadyExistsError, SieveClient } from "sieve-client";

const { values: args } = parseArgs({
  options: { address: { type: "string", default: "127.0.0.1:50051" }, collection: { type: "string", default: "quickstart" } },
});

const client = new SieveClient(args.address);
try {
  try {
    await client.createCollection(args.collection);
  } catch (err) {
    if (!(err instanceof AlreadyExistsError)) throw err; // a second run reuses it; upserts are idempotent by id
  }
  const written = await client.upsertDocuments(args.collection, [
    { id: "cat", text: "The cat sat on the warm mat.", metadata: { topic: "animals" } },
    { id: "quark", text: "Quarks are bound by the strong force.", metadata: { topic: "physics" } },
    { id: "bread", text: "Knead the dough, then bake the bread.", metadata: { topic: "cooking" } },
  ]);
  // minGeneration: read your own write.
  const response = await client.search(args.collection, "particle physics", { topK: 2, minGeneration: written.generation });
  for (const hit of response.hits) console.log(`${hit.id.padEnd(8)} ${hit.score.toFixed(3)}  ${hit.text}`);
} finally {
  client.close();
}
