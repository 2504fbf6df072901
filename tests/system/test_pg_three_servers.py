"""Three `sieve serve` over one PostgreSQL database under concurrent writes through all of them; one is killed
with `kill -9` mid-load: no acknowledged write is lost, the other two keep serving, the restarted one catches
up, and a fourth server joining with an empty data directory serves everything after catching up."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from sieve.v1 import collections_pb2, documents_pb2, search_pb2

from tests.system.test_durability import (
    COLLECTION,
    NO_AUTO_SNAPSHOT,
    Client,
    Model,
    Texts,
    create_collection,
    kill_9,
    running_server,
    verify,
)
from tests.system.test_pg_servers import names

pytestmark = pytest.mark.timeout(900)

Docs = dict[str, tuple[str, dict[str, str]]]


class Writer(threading.Thread):
    """Upserts batches of 5 new documents through one server until told to stop or the server dies."""

    def __init__(self, name: str, client: Client, seed: int) -> None:
        super().__init__()
        self.label, self.client, self.texts = name, client, Texts(seed)
        self.acked: Docs = {}
        self.generations: list[int] = []
        self.in_flight: Docs = {}  # the batch sent when the server died (committed whole or not at all)
        self.stop = threading.Event()
        self.failed_after_kill = False

    def run(self) -> None:
        batch = 0
        while not self.stop.is_set():
            docs = {
                f"{self.label}-{batch}-{i}": (self.texts.new(), {"batch": f"{self.label}-{batch}"})
                for i in range(5)
            }
            request = documents_pb2.UpsertDocumentsRequest(
                collection=COLLECTION,
                documents=[documents_pb2.Document(id=k, text=t, metadata=m) for k, (t, m) in docs.items()],
            )
            try:
                self.generations.append(self.client.documents.UpsertDocuments(request, timeout=60).generation)
            except grpc.RpcError:
                self.in_flight = docs
                return
            self.acked.update(docs)
            batch += 1


def wait_until(condition, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def caught_up(client: Client, generation: int) -> None:
    """Returns once the server's indexes show `generation` (a Search with min_generation waits for it)."""
    request = search_pb2.SearchRequest(
        collection=COLLECTION, query="river", top_k=1, min_generation=generation
    )
    assert client.search.Search(request, timeout=30).generation >= generation


def test_kill_9_one_of_three_servers_mid_load(pg_url: str, tmp_path: Path) -> None:
    env = {"SIEVE_STORE_URL": pg_url, **NO_AUTO_SNAPSHOT}
    with ExitStack() as stack:
        a, b, c = (
            stack.enter_context(running_server(tmp_path / n, tmp_path / f"{n}.log", **env)) for n in "abc"
        )
        create_collection(a)
        wait_until(lambda: all(COLLECTION in names(s) for s in (b, c)))
        writers = [Writer(n, s, seed) for seed, (n, s) in enumerate(zip("abc", (a, b, c), strict=True))]
        for w in writers:
            w.start()
        wait_until(lambda: sum(len(w.generations) for w in writers) >= 12)
        kill_9(c)
        # The other two keep serving: each acknowledges more writes after the kill.
        after = {w.label: len(w.generations) for w in writers[:2]}
        wait_until(lambda: all(len(w.generations) >= after[w.label] + 3 for w in writers[:2]))
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(60)
        assert writers[2].in_flight, "server c's writer did not see it die"

        generations = [g for w in writers for g in w.generations]
        assert len(set(generations)) == len(generations), "a generation was given twice"
        model = Model(docs={k: v for w in writers for k, v in w.acked.items()})
        # c's batch in flight at the kill was committed whole (its generation is then the one not
        # acknowledged) or not at all.
        found = a.documents.GetDocuments(
            documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=list(writers[2].in_flight)),
            timeout=30,
        )
        committed = len(found.documents) == len(writers[2].in_flight)
        assert committed or not found.documents, "c's batch was committed in part"
        if committed:
            model.docs.update(writers[2].in_flight)
        row = a.collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=30)
        model.generation = row.collection.generation
        assert len(set(range(1, model.generation + 1)) - set(generations)) == int(committed)
        probes = [next(iter(w.acked)) for w in writers]
        for survivor in (a, b):
            caught_up(survivor, model.generation)
            verify(survivor, model, probes)

        # c restarts on its data directory and catches up with what a and b wrote meanwhile.
        restarted = stack.enter_context(running_server(tmp_path / "c", tmp_path / "c2.log", **env))
        caught_up(restarted, model.generation)
        verify(restarted, model, probes)
        # A new server on an empty data directory joins and serves everything once it has caught up.
        joined = stack.enter_context(running_server(tmp_path / "d", tmp_path / "d.log", **env))
        caught_up(joined, model.generation)
        verify(joined, model, probes)
