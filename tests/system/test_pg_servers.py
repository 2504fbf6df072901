"""Two `sieve serve` processes over one PostgreSQL database (server/core/follower.py): a write through either is
found through the other with `min_generation`, generations are never given twice, collections made or deleted
through one appear or go on the other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from tests.system.test_durability import COLLECTION, NO_AUTO_SNAPSHOT, Client, running_server

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def servers(pg_url: str, tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    env = {"SIEVE_STORE_URL": pg_url, **NO_AUTO_SNAPSHOT}
    with ExitStack() as stack:
        a = stack.enter_context(running_server(tmp_path / "a", tmp_path / "a.log", **env))
        b = stack.enter_context(running_server(tmp_path / "b", tmp_path / "b.log", **env))
        yield a, b


def upsert(client: Client, docs: dict[str, str], collection: str = COLLECTION) -> int:
    request = documents_pb2.UpsertDocumentsRequest(
        collection=collection, documents=[documents_pb2.Document(id=i, text=t) for i, t in docs.items()]
    )
    return client.documents.UpsertDocuments(request, timeout=60).generation


def search(client: Client, query: str, generation: int, lexical: bool = False) -> search_pb2.SearchResponse:
    settings = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_LEXICAL if lexical else 0)
    request = search_pb2.SearchRequest(
        collection=COLLECTION, query=query, top_k=3, min_generation=generation, settings=settings
    )
    return client.search.Search(request, timeout=30)


def names(client: Client) -> set[str]:
    listed = client.collections.ListCollections(collections_pb2.ListCollectionsRequest(), timeout=10)
    return {c.name for c in listed.collections}


def create(client: Client, others: tuple[Client, ...], name: str = COLLECTION) -> None:
    """Creates a collection through `client`; returns once the other servers have taken it in (they do on
    the database's notification, or at their next poll)."""
    client.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name)), timeout=60
    )
    deadline = time.monotonic() + 10
    while not all(name in names(other) for other in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(name in names(other) for other in others), f"{name!r} did not appear on every server"


def test_a_write_through_one_server_is_found_through_the_other(servers: tuple[Client, Client]) -> None:
    a, b = servers
    create(a, (b,))
    started = time.monotonic()
    generation = upsert(
        a, {"violin": "a violin concerto in the harbor zqviolin", "pepper": "pepper garlic soup"}
    )
    hits = search(b, "violin concerto", generation)
    lag = time.monotonic() - started
    assert hits.generation >= generation and hits.hits[0].id == "violin"
    assert hits.hits[0].text.startswith("a violin concerto")
    assert [h.id for h in search(b, "zqviolin", generation, lexical=True).hits] == ["violin"]
    assert lag < 5, f"server b took {lag:.1f} s to show a's write"

    # And the other way, with a replacement and a delete.
    generation = upsert(b, {"violin": "a copper kettle on the stove zqkettle"})
    assert [h.id for h in search(a, "zqkettle", generation, lexical=True).hits] == ["violin"]
    assert search(a, "zqviolin", generation, lexical=True).hits == []
    response = b.documents.DeleteDocuments(
        documents_pb2.DeleteDocumentsRequest(collection=COLLECTION, ids=["pepper"]), timeout=30
    )
    assert [h.id for h in search(a, "pepper garlic soup", response.generation).hits] == ["violin"]


def test_concurrent_writes_through_both_servers_get_distinct_generations_and_converge(
    servers: tuple[Client, Client],
) -> None:
    a, b = servers
    create(a, (b,))
    generations: dict[str, list[int]] = {"a": [], "b": []}

    def write(name: str, client: Client) -> None:
        for i in range(12):
            generations[name].append(upsert(client, {f"{name}-{i}": f"document {i} written through {name}"}))

    threads = [threading.Thread(target=write, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = generations["a"] + generations["b"]
    assert sorted(everything) == list(range(1, 25))  # none given twice, none skipped
    last = max(everything)
    for client in (a, b):
        response = client.search.Search(
            search_pb2.SearchRequest(
                collection=COLLECTION,
                query="document written",
                top_k=30,
                min_generation=last,
                omit_documents=True,
            ),
            timeout=30,
        )
        assert sorted(h.id for h in response.hits) == sorted(f"{n}-{i}" for n in "ab" for i in range(12))


def test_collections_made_or_deleted_through_one_server_appear_or_go_on_the_other(
    servers: tuple[Client, Client],
) -> None:
    a, b = servers
    create(a, (b,), "shared")  # asserts that b lists it
    b.collections.DeleteCollection(collections_pb2.DeleteCollectionRequest(name="shared"), timeout=60)
    deadline = time.monotonic() + 10
    while "shared" in names(a) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "shared" not in names(a)
    with pytest.raises(grpc.RpcError) as err:
        upsert(a, {"x": "y"}, collection="shared")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
