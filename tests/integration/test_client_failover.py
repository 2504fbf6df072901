"""The Python clients with several server addresses: calls spread over three real `sieve serve` processes and
keep succeeding when one is killed (SIGKILL) while they run.

Each server has its own data directory (no shared store here): each holds the collection with the same
documents plus one marker document of its own, so a hit list says which server answered. The TypeScript
client's twin of this test is in clients/node/test/failover.test.ts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sieve import AsyncSieveClient, RetryPolicy, SieveClient

from sieve_cli import stack
from tests.conftest import require_bundle

COLLECTION = "failover"
DOCS = {
    "aspirin": "Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "mito": "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
}
QUERY = "which server answers this query"
# Several attempts, quick: a call that meets the killed server moves on to another at once.
RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[stack.SieveProcess]]:
    require_bundle()
    with ExitStack() as running:
        started = []
        for i in range(3):
            server = running.enter_context(
                stack.sieve_process(
                    "serve", data_dir=tmp_path / f"data{i}", log=tmp_path / f"server{i}.log", stop="kill"
                )
            )
            with SieveClient(server.address) as one:
                one.create_collection(COLLECTION)
                marker = {"id": f"server{i}", "text": f"{QUERY}: server number {i}"}
                one.upsert_documents(COLLECTION, [*({"id": k, "text": t} for k, t in DOCS.items()), marker])
            started.append(server)
        yield started


def _answered_by(response) -> str:  # type: ignore[no-untyped-def]
    return next(hit.id for hit in response.hits if hit.id.startswith("server"))


def test_sync_client_spreads_calls_and_survives_a_killed_server(servers: list[stack.SieveProcess]) -> None:
    addresses = [s.address for s in servers]
    with SieveClient(addresses, retry=RETRY) as client:
        before = Counter(_answered_by(client.search(COLLECTION, QUERY, top_k=3)) for _ in range(30))
        assert set(before) == {"server0", "server1", "server2"}, before  # round_robin: every server answers

        # Searches and upserts run on while one server is killed; none of them may fail.
        errors: list[BaseException] = []
        answered: list[tuple[float, str]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    answered.append(
                        (time.monotonic(), _answered_by(client.search(COLLECTION, QUERY, top_k=3)))
                    )
                    client.upsert_documents(COLLECTION, [{"id": "aspirin", "text": DOCS["aspirin"]}])
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        servers[0].proc.kill()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors[:3]
        after = Counter(who for at, who in answered if at > killed_at + 1.0)
        assert after and set(after) == {"server1", "server2"}, after


def test_async_client_survives_a_killed_server(servers: list[stack.SieveProcess]) -> None:
    async def run() -> Counter[str]:
        async with AsyncSieveClient(",".join(s.address for s in servers), retry=RETRY) as client:
            first = [_answered_by(await client.search(COLLECTION, QUERY, top_k=3)) for _ in range(9)]
            assert set(first) == {"server0", "server1", "server2"}, first
            servers[1].proc.kill()
            # Many calls at once right after the kill: some were on their way to the dead server.
            results = await asyncio.gather(*(client.search(COLLECTION, QUERY, top_k=3) for _ in range(40)))
            return Counter(_answered_by(r) for r in results)

    answered = asyncio.run(run())
    assert sum(answered.values()) == 40 and "server1" not in answered, answered
