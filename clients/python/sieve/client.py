"""SieveClient: the blocking client. One channel per client, reused by every call; close it when done.

    from sieve import SieveClient

    with SieveClient("127.0.0.1:50051") as client:
        client.create_collection("notes")
        client.upsert_documents("notes", [{"id": "1", "text": "The cat sat on the mat."}])
        for hit in client.search("notes", "a cat", late_interaction="best_effort").hits:
            print(hit.id, hit.score)

Several servers: `SieveClient(["10.0.0.1:50051", "10.0.0.2:50051"])` (or one DNS name that resolves to
several addresses) spreads the calls over them and moves a call that meets UNAVAILABLE to another
(`sieve._channel`).

Every call has a deadline (`Timeouts`: 10 s by default, 120 s for writes, 24 h for streams; `timeout=`
per call), is retried on UNAVAILABLE / RESOURCE_EXHAUSTED where that is safe (see `sieve.retry`), and
raises a `sieve.SieveError` subclass on failure. Results are the generated sieve.v1 messages.

The calls live in sieve/_sync, one class per service on a base that holds the channel, deadlines and
retries. The asyncio twin with the same methods is `sieve.AsyncSieveClient` (sieve/aio.py, on sieve/_async),
generated from these files by scripts/gen_async_client.py, so the two cannot drift: edit the sync files,
then run that script (`--check`, run by the tests, fails when the async files are stale). Write them so the
generator's plain rules apply: bind the result of `self._unary(...)` to a name before using it (it becomes
`await self._unary`), and iterate streams with `for message in ...` (it becomes `async for`).
"""

from __future__ import annotations

from sieve._sync.collection import CollectionCalls
from sieve._sync.document import DocumentCalls
from sieve._sync.job import JobCalls
from sieve._sync.search import SearchCalls


class SieveClient(CollectionCalls, DocumentCalls, SearchCalls, JobCalls):
    """A blocking client for a Sieve server: every service's calls, on one channel (the constructor's
    arguments are `ClientBase`'s: one address or several, TLS, API key, timeouts, retry policy)."""
