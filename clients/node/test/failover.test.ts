// Several server addresses: calls spread over three live Sieve servers (each its own data directory) and keep
// succeeding when one is killed (SIGKILL) while they run. The twin of tests/integration/test_client_failover.py.
// Each server holds the same collection plus one marker document of its own, so a hit list says which server
// answered.
import assert from "node:assert/strict";
import { test } from "node:test";
import { channelTarget, type SearchResponse, SieveClient } from "../src";
import { type LiveServer, startServer } from "./helpers";

const COLLECTION = "failover";
const QUERY = "which server answers this query";
// The client's own retries off: what keeps the calls succeeding is grpc-js's, from the service config the
// client sets for several addresses (round_robin, and retryPolicy on UNAVAILABLE for idempotent methods).
const NO_CLIENT_RETRY = { maxAttempts: 1 };

const answeredBy = (response: SearchResponse): string => {
  const marker = response.hits.find((hit) => hit.id.startsWith("server"));
  assert.ok(marker, "no marker document in the hits");
  return marker.id;
};

test("channelTarget: one address as given, several as one ipv4/ipv6 list, names in a list refused", () => {
  assert.deepEqual(channelTarget("sieve.internal:50051"), { target: "sieve.internal:50051", count: 1 });
  assert.deepEqual(channelTarget(["127.0.0.1:1", "10.0.0.2:2"]), { target: "ipv4:127.0.0.1:1,10.0.0.2:2", count: 2 });
  assert.deepEqual(channelTarget("127.0.0.1:1, 127.0.0.1:2"), { target: "ipv4:127.0.0.1:1,127.0.0.1:2", count: 2 });
  assert.deepEqual(channelTarget(["[::1]:1", "[::1]:2"]), { target: "ipv6:[::1]:1,[::1]:2", count: 2 });
  assert.throws(() => channelTarget(["a.example:1", "b.example:2"]), /must be IP:port/);
  assert.throws(() => channelTarget(["127.0.0.1:1", "[::1]:2"]), /IPv4 addresses only or IPv6 only/);
  assert.throws(() => new SieveClient([]), /no server address/);
});

test("several addresses: calls spread over three servers and survive one killed mid-load", async () => {
  const servers: LiveServer[] = await Promise.all([startServer(), startServer(), startServer()]);
  try {
    for (const [i, server] of servers.entries()) {
      const one = new SieveClient(server.address);
      await one.createCollection(COLLECTION);
      await one.upsertDocuments(COLLECTION, [
        { id: "aspirin", text: "Aspirin reduces the risk of heart attack in patients with cardiovascular disease." },
        { id: `server${i}`, text: `${QUERY}: server number ${i}` },
      ]);
      one.close();
    }
    const client = new SieveClient(
      servers.map((s) => s.address),
      { retry: NO_CLIENT_RETRY },
    );
    const ask = async () => answeredBy(await client.search(COLLECTION, QUERY, { topK: 3 }));
    const first = new Set<string>();
    for (let i = 0; i < 30; i++) first.add(await ask());
    assert.deepEqual([...first].sort(), ["server0", "server1", "server2"]); // round_robin: every server answers

    // Calls on their way while server0 dies, then more: none may fail.
    const during = Array.from({ length: 40 }, () => ask());
    await servers[0].kill();
    const answered = await Promise.all(during);
    assert.equal(answered.length, 40);
    const after = await Promise.all(Array.from({ length: 40 }, () => ask()));
    assert.deepEqual([...new Set(after)].sort(), ["server1", "server2"]);
    // An idempotent write is moved to a live server too.
    await client.upsertDocuments(COLLECTION, [{ id: "aspirin", text: "Aspirin again." }]);
    client.close();
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
  }
});
