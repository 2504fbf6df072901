"""The vector index's format across restarts: a collection whose snapshot is in another layout than the server's
SIEVE_INDEX_STORAGE (e.g. f16 from before i8 became the default) is rebuilt from the store on start, says so in
the log, searches as before, and is snapshotted in the new layout."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2
from usearch.index import Index

from tests.conftest import make_settings, start_api, stop_api

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = {
    "kinase": "Protein kinase C phosphorylates the receptor in hepatocytes",
    "liver": "The liver cells respond to insulin signalling",
    "ocean": "Ocean currents carry heat toward the poles",
    "forest": "Tropical forests store large amounts of carbon",
    "bakery": "A bakery sells bread and pastries every morning",
}
QUERIES = {"kinase": "which enzyme phosphorylates receptors", "ocean": "how does the sea move heat"}
# full_scan_max=0: every search walks the HNSW graph, so the index (not a full scan) answers.
DENSE = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_DENSE)


async def _top(api, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    out = {}
    for expected, query in QUERIES.items():
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=query, top_k=3, settings=DENSE)
        )
        out[expected] = resp.hits[0].id
    return out


def _snapshot_format(data: Path) -> str:
    (directory,) = (data / "collections").iterdir()
    (snapshot,) = directory.glob("index-*.usearch")
    index = Index.restore(str(snapshot))
    assert index is not None
    return f"{index.metric.name} {index.dtype.name}".lower()


async def test_a_snapshot_in_another_layout_is_rebuilt_in_the_servers_on_start(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    name = f"format-{uuid.uuid4().hex[:8]}"
    first = await start_api(make_settings(data, index_storage="f16", full_scan_max=0))
    try:
        await first.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
        )
        await first.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
            )
        )
        before = await _top(first, name)
    finally:
        await stop_api(first)  # snapshots every index
    assert before == {k: k for k in QUERIES}
    assert _snapshot_format(data) == "ip f16"

    caplog.clear()
    second = await start_api(make_settings(data, index_storage="i8", full_scan_max=0))
    try:
        assert (
            "is in format ip f16, the collection's index is cos i8: rebuilding it from the store"
            in caplog.text
        )
        assert await _top(second, name) == before
        info = await second.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        assert info.collection.document_count == len(DOCS)
    finally:
        await stop_api(second)
    assert _snapshot_format(data) == "cos i8"

    caplog.clear()  # now in the server's layout: loaded, not rebuilt
    third = await start_api(make_settings(data, index_storage="i8", full_scan_max=0))
    try:
        assert "rebuilding it from the store" not in caplog.text
        assert await _top(third, name) == before
    finally:
        await stop_api(third)
