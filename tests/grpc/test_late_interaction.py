"""Late interaction from stored token vectors, through the gRPC API of an in-process server (no Redis).

Zero-shot (MaxSim over all-MiniLM-L6-v2's own token vectors): UpsertDocuments runs ONE encoder pass for a
document's vector and token vectors, stores the compressed token vectors in the same transaction, and a
search takes the query's token vectors from the retrieval's own pass and scores MaxSim from the store.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.late_interaction import maxsim_blobs
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_codec import read_header
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, TokenFormat, compress_many, prepare_query
from tests.conftest import MODEL
from tests.corpus import DOCS, QUERY

pytestmark = pytest.mark.asyncio(loop_scope="session")

LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=6, late_interaction_keep=3
)
REQUIRED = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_REQUIRED)


async def _create(api, token_storage=None, defaults=None) -> str:  # type: ignore[no-untyped-def]
    name = f"li-{uuid.uuid4().hex[:8]}"
    collection = collections_pb2.Collection(name=name, defaults=defaults, token_storage=token_storage)
    await api.collections.CreateCollection(collections_pb2.CreateCollectionRequest(collection=collection))
    return name


async def _upsert(api, name: str, docs: dict[str, str]) -> int:  # type: ignore[no-untyped-def]
    request = documents_pb2.UpsertDocumentsRequest(
        collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in docs.items()]
    )
    return (await api.documents.UpsertDocuments(request)).generation  # type: ignore[no-any-return]


def _stored(api, name: str) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """id -> stored token blob, straight from the server's store."""
    store = api.server.engine.store
    cid = store.get_collection(name).id
    docs = store.documents_by_keys(cid, range(1, 10_000), with_text=False)
    blobs = store.token_blobs(cid, list(docs))
    return {d.doc_id: blobs[k] for k, d in docs.items() if k in blobs}


class EncoderPasses:
    """Counts the real runner's encoder runs (each `encode` call is one pass), and what they were for."""

    def __init__(self, runner: BiEncoderRunner) -> None:
        self.runner = runner
        self.calls: list[tuple[int, bool]] = []  # (texts, with token vectors)
        self._encode = runner.encode

    def __call__(self, texts, batch_size=32, *, tokens=False):  # type: ignore[no-untyped-def]
        self.calls.append((len(texts), tokens))
        return self._encode(texts, batch_size, tokens=tokens)


@contextmanager
def counting(api) -> Iterator[EncoderPasses]:  # type: ignore[no-untyped-def]
    runner = api.server.engine.models.get(MODEL)
    passes = EncoderPasses(runner)
    runner.encode = passes  # type: ignore[method-assign]
    try:
        yield passes
    finally:
        del runner.encode  # the instance attribute goes; the class's method shows again


async def test_collection_with_late_interaction_defaults_stores_the_default_format(api) -> None:  # type: ignore[no-untyped-def]
    name = await _create(
        api, defaults=common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
    )
    info = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection
    assert info.HasField("token_storage")
    storage = info.token_storage
    assert (storage.pool_factor, storage.projection_dims, storage.pending) == (2, 0, 0)
    assert storage.codec == "int4"
    assert storage.description == DEFAULT_TOKEN_FORMAT.describe() == "int4, pool 2"
    assert storage.model_id == info.embedding_model_id
    plain = await _create(api)
    info = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=plain))).collection
    assert not info.HasField("token_storage")


async def test_upsert_stores_token_vectors_from_the_same_encoder_pass(api) -> None:  # type: ignore[no-untyped-def]
    name = await _create(api, token_storage=collections_pb2.TokenStorage())
    runner = api.server.engine.models.get(MODEL)
    with counting(api) as passes:
        await _upsert(api, name, DOCS)
    # One encoder pass over the six texts, with token vectors: none before, none after (no worker task).
    assert passes.calls == [(len(DOCS), True)]
    stored = _stored(api, name)
    assert sorted(stored) == sorted(DOCS)
    _, rows = runner.encode(list(DOCS.values()), api.server.settings.embed_batch_size, tokens=True)
    offsets = runner.token_offsets(list(DOCS.values()))  # stored with the rows (evidence spans)
    expected = dict(zip(DOCS, compress_many(rows, DEFAULT_TOKEN_FORMAT, offsets), strict=True))  # type: ignore[arg-type]
    assert stored == expected
    for blob in stored.values():
        info = read_header(blob)
        assert (info.fmt, info.pool_factor, info.dims) == ("int4", 2, runner.dims)
    # An unchanged text is not encoded again; a changed one gets new token vectors, the old row goes.
    with counting(api) as passes:
        await _upsert(api, name, {"aspirin": DOCS["aspirin"], "mito": DOCS["mito"] + " Revised."})
    assert passes.calls == [(1, True)]
    after = _stored(api, name)
    assert after["aspirin"] == stored["aspirin"] and after["mito"] != stored["mito"]
    store = api.server.engine.store
    row = store.get_collection(name)
    assert (row.doc_count, row.token_count) == (6, 6)
    await api.documents.DeleteDocuments(documents_pb2.DeleteDocumentsRequest(collection=name, ids=["vitd"]))
    assert "vitd" not in _stored(api, name) and store.get_collection(name).token_count == 5


async def test_search_scores_maxsim_from_the_store_with_the_query_tokens_of_one_pass(api) -> None:  # type: ignore[no-untyped-def]
    name = await _create(api, token_storage=collections_pb2.TokenStorage())
    await _upsert(api, name, DOCS)
    stored = _stored(api, name)
    with counting(api) as passes:
        response = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=QUERY, top_k=3, settings=LATE, omit_documents=True
            )
        )
    # The query was encoded once (vector and token vectors together); no document was encoded.
    assert passes.calls == [(1, True)]
    retrieve, late, _ = response.stages
    assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
    assert (retrieve.candidates_out, late.candidates_in, late.candidates_out) == (6, 6, 3)
    assert (late.token_source, late.tokens_pending, late.query_token_source) == ("store", 0, "encoder pass")
    assert late.token_bytes == sum(len(b) for b in stored.values())
    assert late.method.startswith("store: 6 docs, ") and "int4, pool 2" in late.method, late.method
    assert "query tokens: encoder pass" in late.method and "zero-shot" in late.model_id

    runner = api.server.engine.models.get(MODEL)
    query_rows = runner.encode([QUERY], tokens=True)[1][0]  # type: ignore[index]
    ids = sorted(stored)
    scores = maxsim_blobs(prepare_query(query_rows, DEFAULT_TOKEN_FORMAT), [stored[i] for i in ids])
    expected = sorted(zip(ids, scores.tolist(), strict=True), key=lambda p: -p[1])[:3]
    assert [h.id for h in response.hits] == [i for i, _ in expected]
    assert [h.score for h in response.hits] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert response.hits[0].id == "aspirin"
    for rank, hit in enumerate(response.hits):
        assert [s.stage for s in hit.stage_scores] == [
            common_pb2.STAGE_RETRIEVE,
            common_pb2.STAGE_LATE_INTERACTION,
        ]
        assert hit.stage_scores[1].rank == rank and hit.text == ""


async def test_token_storage_options_are_chosen_at_creation(api) -> None:  # type: ignore[no-untyped-def]
    options = collections_pb2.TokenStorage(pool_factor=1, projection_dims=128, codec="int8")
    name = await _create(api, token_storage=options)
    info = (await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))).collection
    assert info.token_storage.description == "int8, projection 128"
    await _upsert(api, name, DOCS)
    runner = api.server.engine.models.get(MODEL)
    fmt = TokenFormat(pool_factor=1, projection_dims=128, codec="int8")
    stored = _stored(api, name)
    for doc_id, blob in stored.items():
        header = read_header(blob)
        assert header.dims == 128 and header.pool_factor == 1 and header.fmt == "int8"
        assert header.n_tokens == len(runner.token_vectors([DOCS[doc_id]])[0])  # not pooled
    response = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE)
    )
    assert response.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
    assert "int8, projection 128" in response.stages[1].method and response.hits[0].id == "aspirin"
    query = prepare_query(runner.token_vectors([QUERY])[0], fmt)
    assert query.shape[1] == 128
    for bad, field in (
        (collections_pb2.TokenStorage(pool_factor=99), "pool_factor"),
        (collections_pb2.TokenStorage(projection_dims=500), "projection_dims"),
        (collections_pb2.TokenStorage(codec="int3"), "codec"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _create(api, token_storage=bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_late_interaction_on_a_collection_without_token_vectors_says_how_to_enable_it(api) -> None:  # type: ignore[no-untyped-def]
    name = await _create(api)
    await _upsert(api, name, DOCS)
    response = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE)
    )
    late = response.stages[1]
    assert late.status == search_pb2.STAGE_STATUS_DEGRADED
    assert "stores no token vectors" in late.reason and "token_storage" in late.reason, late.reason
    assert [h.id for h in response.hits][0] == "aspirin" and [len(h.stage_scores) for h in response.hits] == [
        1,
        1,
        1,
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.search.Search(search_pb2.SearchRequest(collection=name, query=QUERY, settings=REQUIRED))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stores no token vectors" in err.value.details() and "token_storage" in err.value.details()


async def test_late_interaction_on_an_empty_result(api) -> None:  # type: ignore[no-untyped-def]
    name = await _create(api, token_storage=collections_pb2.TokenStorage())
    response = await api.search.Search(search_pb2.SearchRequest(collection=name, query=QUERY, settings=LATE))
    assert list(response.hits) == []
    assert response.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
    assert response.stages[1].candidates_in == 0


async def test_stage_reports_feed_the_metrics(api) -> None:  # type: ignore[no-untyped-def]
    metrics = api.server.metrics
    name = await _create(api, token_storage=collections_pb2.TokenStorage())
    await _upsert(api, name, DOCS)

    def value(metric: str, source: str) -> float:
        return metrics.registry.get_sample_value(f"{metric}_total", {"source": source}) or 0.0

    before = (
        value("sieve_late_interaction_token_vectors", "store"),
        value("sieve_late_interaction_token_bytes", "store"),
    )
    response = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE)
    )
    late = response.stages[1]
    assert value("sieve_late_interaction_token_vectors", "store") - before[0] == 6
    assert value("sieve_late_interaction_token_bytes", "store") - before[1] == late.token_bytes > 0
    assert np.isfinite(late.took_ms)


async def test_the_python_client_chooses_the_token_format(api) -> None:  # type: ignore[no-untyped-def]
    from sieve import AsyncSieveClient

    async with AsyncSieveClient(api.address) as client:
        name = f"li-{uuid.uuid4().hex[:8]}"
        created = await client.create_collection(
            name, token_storage={"pool_factor": 2, "projection_dims": 128}
        )
        assert created.token_storage.description == "int4, pool 2, projection 128"
        eight = await client.create_collection(f"{name}-8", token_storage={"pool_factor": 4, "codec": "int8"})
        assert (eight.token_storage.description, eight.token_storage.codec) == ("int8, pool 4", "int8")
        default = await client.create_collection(f"{name}-d", token_storage={})
        assert default.token_storage.description == "int4, pool 2"
        plain = await client.create_collection(f"{name}-p")
        assert not plain.HasField("token_storage")


async def test_a_collection_from_before_token_storage_is_backfilled_at_start(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A store written before token vectors were stored (its collection's defaults ask for late interaction):
    at start the collection gets the default format, its documents are pending, and the server's backfill
    computes them (in-process: no Redis here), never a search."""
    import asyncio
    import sqlite3

    from tests.conftest import make_settings, start_api, stop_api

    settings = make_settings(tmp_path)
    server = await start_api(settings)
    late = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
    try:
        name = await _create(server, defaults=late)
        await _upsert(server, name, DOCS)
    finally:
        await stop_api(server)
    # Back to how an older version left the store: no token columns set, no token rows.
    conn = sqlite3.connect(tmp_path / "sieve.db")
    conn.execute("UPDATE collections SET token_format = NULL, token_model_id = NULL, token_count = 0")
    conn.execute("DELETE FROM tokens")
    conn.commit()
    conn.close()

    caplog.set_level("INFO", logger="server.core.tokens")
    server = await start_api(settings)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            info = (
                await server.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
            ).collection
            assert info.token_storage.description == "int4, pool 2"
            if info.token_storage.pending == 0:
                break
            assert asyncio.get_running_loop().time() < deadline, info.token_storage
            await asyncio.sleep(0.1)
        # The backfill saw them pending, then stored them all.
        assert f"collection {name!r}: {len(DOCS)} documents pending token vectors" in caplog.text
        assert f"collection {name!r}: every document has its token vectors" in caplog.text
        stored = _stored(server, name)
        assert sorted(stored) == sorted(DOCS)
        runner = server.server.engine.models.get(MODEL)
        texts = [DOCS[i] for i in sorted(DOCS)]
        expected = compress_many(
            runner.token_vectors(texts), DEFAULT_TOKEN_FORMAT, runner.token_offsets(texts)
        )
        for doc_id, blob in zip(sorted(DOCS), expected, strict=True):
            assert read_header(stored[doc_id]) == read_header(blob)
            np.testing.assert_allclose(
                maxsim_blobs(runner.token_vectors([QUERY])[0], [stored[doc_id]]),
                maxsim_blobs(runner.token_vectors([QUERY])[0], [blob]),
                atol=1e-3,
            )
        response = await server.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE)
        )
        assert (
            response.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
            and response.stages[1].tokens_pending == 0
        )
    finally:
        await stop_api(server)
