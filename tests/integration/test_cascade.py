"""The search cascade end to end: retrieval, then late interaction on a real Celery worker over real Redis.

Also how it degrades: no Redis configured, Redis unreachable, no worker on the queue, a required stage.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.contracts import content_hash_hex
from tests.conftest import Worker, make_settings, start_api, stop_api

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = {
    "aspirin": "Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "mito": "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "vitd": "Vitamin D deficiency is associated with an increased risk of bone fractures.",
    "exercise": "Regular exercise improves insulin sensitivity in adults with type 2 diabetes.",
    "smoking": "Smoking is a major risk factor for lung cancer and chronic obstructive pulmonary disease.",
    "coffee": "Coffee consumption has been linked to a lower risk of type 2 diabetes in cohort studies.",
}
QUERY = "does aspirin prevent heart attacks"
OTHER_QUERY = "aspirin and cardiovascular risk"
LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=6, late_interaction_keep=3
)


async def _collection(api) -> str:  # type: ignore[no-untyped-def]
    name = f"cascade-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
        )
    )
    return name


async def test_late_interaction_on_a_worker(worker: Worker, redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(make_settings(tmp_path, redis_url=redis_url))
    try:
        name = await _collection(api)
        cold = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=30
        )
        retrieve, late, _ = cold.stages
        assert late.stage == common_pb2.STAGE_LATE_INTERACTION
        assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
        assert (retrieve.candidates_out, late.candidates_in, late.candidates_out) == (6, 6, 3)
        assert "6 recomputed" in late.method and "zero-shot" in late.model_id
        assert [h.id for h in cold.hits][0] == "aspirin" and len(cold.hits) == 3
        for hit in cold.hits:
            assert [s.stage for s in hit.stage_scores] == [
                common_pb2.STAGE_RETRIEVE,
                common_pb2.STAGE_LATE_INTERACTION,
            ]
            assert hit.score == hit.stage_scores[1].score
        scores = [h.score for h in cold.hits]
        assert scores == sorted(scores, reverse=True)

        warm = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=QUERY, top_k=3, settings=LATE, omit_documents=True
            ),
            timeout=30,
        )
        # The same search again: answered from the score cache, no worker involved.
        assert warm.stages[1].method == "cache", warm.stages[1]
        assert [h.id for h in warm.hits] == [h.id for h in cold.hits]
        assert [h.score for h in warm.hits] == pytest.approx(scores, abs=1e-6)
        assert all(h.text == "" for h in warm.hits)

        # Another query over the same candidates: a worker, but every token vector comes from Redis.
        other = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=OTHER_QUERY, top_k=3, settings=LATE), timeout=30
        )
        assert "6 cached, 0 recomputed" in other.stages[1].method, other.stages[1]
    finally:
        await stop_api(api)


async def test_a_write_invalidates_cached_scores(worker: Worker, redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import redis as redis_client

    api = await start_api(make_settings(tmp_path, redis_url=redis_url))
    try:
        name = await _collection(api)
        request = search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE)
        first = await api.search.Search(request, timeout=30)
        assert first.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED, first.stages[1].reason
        assert (await api.search.Search(request, timeout=30)).stages[1].method == "cache"
        # The query vector was cached too, under the bi-encoder's revision.
        client = redis_client.Redis.from_url(redis_url)
        assert client.keys("sieve:qvec:v1:all-MiniLM-L6-v2@*")
        hits_before = api.server.engine.cache.hits

        changed = "Aspirin does not reduce the risk of a heart attack in healthy adults, a new trial finds."
        write = await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id="aspirin", text=changed)]
            )
        )
        after = await api.search.Search(request, timeout=30)
        assert after.generation == write.generation > first.generation
        late = after.stages[1]
        # A new generation: the cached scores are unreachable, a worker re-ranks; only the changed text
        # needed its token vectors computed.
        assert late.method.startswith("worker") and "1 recomputed" in late.method, late
        assert {h.id: h.score for h in after.hits}.get("aspirin") != {h.id: h.score for h in first.hits}.get(
            "aspirin"
        )
        assert api.server.engine.cache.hits > hits_before  # at least the query vector
    finally:
        await stop_api(api)


@pytest.mark.parametrize(
    "redis, reason",
    [
        (None, "no Redis is configured"),
        ("redis://127.0.0.1:1/0", "cannot reach Redis"),
    ],
)
async def test_degrades_without_redis(api, redis, reason, tmp_path, worker: Worker) -> None:  # type: ignore[no-untyped-def]
    target = api if redis is None else await start_api(make_settings(tmp_path, redis_url=redis))
    try:
        name = await _collection(target)
        started = time.monotonic()
        resp = await target.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=10
        )
        assert time.monotonic() - started < 5
        late = resp.stages[1]
        assert late.status == search_pb2.STAGE_STATUS_DEGRADED and reason in late.reason
        assert [h.id for h in resp.hits][0] == "aspirin"  # retrieval order kept
        assert [len(h.stage_scores) for h in resp.hits] == [1, 1, 1]
    finally:
        if target is not api:
            await stop_api(target)


async def test_no_worker_degrades_within_the_deadline_or_fails_when_required(
    redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Database 1 of the same Redis: a broker no worker listens on.
    api = await start_api(make_settings(tmp_path, redis_url=redis_url.rsplit("/", 1)[0] + "/1"))
    try:
        name = await _collection(api)
        started = time.monotonic()
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=2.0
        )
        assert time.monotonic() - started < 2.0
        late = resp.stages[1]
        assert late.status == search_pb2.STAGE_STATUS_DEGRADED and "no worker answered" in late.reason
        assert [h.id for h in resp.hits][0] == "aspirin"

        required = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_REQUIRED)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.search.Search(
                search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=required),
                timeout=2.0,
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "late_interaction is required" in err.value.details()
    finally:
        await stop_api(api)


async def test_token_vectors_are_cached_at_write_time(worker: Worker, redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import redis as redis_client

    api = await start_api(make_settings(tmp_path, redis_url=redis_url))
    try:
        name = f"warm-{uuid.uuid4().hex[:8]}"
        texts = {f"w{i}": f"{text} (edition {uuid.uuid4().hex[:6]})" for i, text in enumerate(DOCS.values())}
        defaults = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, defaults=defaults)
            )
        )
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in texts.items()]
            )
        )
        client = redis_client.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        present = 0
        while time.monotonic() < deadline:
            # Keys are content-addressed: count the ones for these texts.
            present = sum(1 for t in texts.values() if client.keys(f"sieve:tok:*:{content_hash_hex(t)}"))
            if present == len(texts):
                break
            await asyncio.sleep(0.2)
        assert present == len(texts), "the embed worker did not cache the token vectors at write time"
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=30
        )
        assert resp.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
        assert "6 cached, 0 recomputed" in resp.stages[1].method
    finally:
        await stop_api(api)


async def test_late_interaction_on_an_empty_result_needs_no_worker(api) -> None:  # type: ignore[no-untyped-def]
    name = f"empty-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    resp = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=QUERY, settings=LATE), timeout=10
    )
    assert list(resp.hits) == []
    assert resp.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED and resp.stages[1].candidates_in == 0
