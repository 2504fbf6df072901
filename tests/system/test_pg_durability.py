"""Durability on PostgreSQL: a real `sieve serve` with SIEVE_STORE_URL on the harness's cluster, `kill -9` while
a client writes, restarted: every acknowledged write is found by vector and by lexical search; a server on a
new, empty data directory over the same database rebuilds its indexes from it and finds them too.

The helpers (server process, the model of acknowledged state, `verify`) are tests/system/test_durability.py's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from sieve.v1 import collections_pb2, common_pb2, search_pb2

from tests.system.test_durability import (
    COLLECTION,
    NO_AUTO_SNAPSHOT,
    Client,
    Model,
    Texts,
    create_collection,
    kill_9,
    replaced,
    running_server,
    verify,
)

pytestmark = pytest.mark.timeout(600)


def coded_docs(texts: Texts, ids: range, tag: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Documents whose text carries a word of their own (`zq<i>k`), so lexical search can name each one."""
    return {f"doc-{i}": (f"{texts.new()} zq{i}k", {"batch": tag}) for i in ids}


def write_until_killed(client: Client, model: Model, texts: Texts, stop: threading.Event) -> dict:
    """Writes batches until the server dies; returns the batch that was in flight then (maybe committed)."""
    batch = 0
    while not stop.is_set():
        docs = coded_docs(texts, range(batch * 10, batch * 10 + 10), f"b{batch}")
        try:
            client.upsert(model, docs)
        except grpc.RpcError:
            return docs
        batch += 1
    return {}


def lexical_hits(client: Client, query: str) -> list[str]:
    response = client.search.Search(
        search_pb2.SearchRequest(
            collection=COLLECTION,
            query=query,
            top_k=5,
            settings=common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_LEXICAL),
        ),
        timeout=30,
    )
    return [h.id for h in response.hits]


def verify_lexical(client: Client, model: Model) -> None:
    for doc_id, (text, _) in model.docs.items():
        code = text.rsplit(" ", 1)[1]
        if code.startswith("zq"):
            assert lexical_hits(client, code) == [doc_id], f"lexical search for {code} did not find {doc_id}"


def test_kill_9_mid_write_on_postgres_loses_no_acknowledged_write(pg_url: str, tmp_path: Path) -> None:
    env = {"SIEVE_STORE_URL": pg_url, **NO_AUTO_SNAPSHOT}
    texts, model = Texts(seed=17), Model()
    data_dir = tmp_path / "data"
    with running_server(data_dir, tmp_path / "first.log", **env) as client:
        create_collection(client)
        stop = threading.Event()
        in_flight: dict = {}

        def writer() -> None:
            in_flight.update(write_until_killed(client, model, texts, stop))

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 120
        while model.generation < 8 and time.monotonic() < deadline:  # some batches acknowledged first
            time.sleep(0.05)
        kill_9(client)
        stop.set()
        thread.join(60)
        assert model.generation >= 8, "too few writes were acknowledged before the kill"

    with running_server(data_dir, tmp_path / "second.log", **env) as client:
        info = client.collections.GetCollection(
            collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=30
        ).collection
        # The batch in flight at the kill was committed whole or not at all.
        assert info.generation in (model.generation, model.generation + 1)
        if info.generation == model.generation + 1:
            model.generation += 1
            model.docs.update(in_flight)
        verify(client, model, ["doc-0", "doc-9", f"doc-{len(model.docs) - 1}"])
        verify_lexical(client, model)
        client.upsert(model, replaced(model, texts, ["doc-3"], "after-restart"))
        verify(client, model, ["doc-3"])

    # A server with an empty data directory (no snapshots) over the same database: indexes rebuilt from it.
    with running_server(tmp_path / "fresh", tmp_path / "third.log", **env) as client:
        verify(client, model, ["doc-3", "doc-5"])
        verify_lexical(client, model)
