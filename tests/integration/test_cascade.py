"""The search cascade end to end with real Redis and a real Celery worker: zero-shot late interaction
from the server's token store, and what it no longer needs (Redis, a worker, a second encoder pass).

Also index jobs on the worker: their batches come back with the documents' token vectors from the same
encoder pass, and the server commits them with the documents.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest
import redis as redis_client
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, jobs_pb2, search_pb2

from sieve_core.token_codec import decode_tokens, read_header
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress
from tests.conftest import MODEL, Worker, make_settings, run_index_job, start_api, stop_api
from tests.corpus import DOCS, QUERY

pytestmark = pytest.mark.asyncio(loop_scope="session")

LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=6, late_interaction_keep=3
)
REQUIRED = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_REQUIRED, retrieve_candidates=6, late_interaction_keep=3
)


async def _collection(api, docs: dict[str, str] = DOCS) -> str:  # type: ignore[no-untyped-def]
    name = f"cascade-{uuid.uuid4().hex[:8]}"
    collection = collections_pb2.Collection(name=name, token_storage=collections_pb2.TokenStorage())
    await api.collections.CreateCollection(collections_pb2.CreateCollectionRequest(collection=collection))
    if docs:
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in docs.items()]
            )
        )
    return name


def _tasks_run(worker: Worker) -> int:
    """Tasks the worker has finished so far (each logs one 'task ... in N ms' line)."""
    return sum(1 for line in worker.log.read_text(errors="replace").splitlines() if " items in " in line)


async def test_late_interaction_from_the_store_uses_no_worker(
    worker: Worker, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(make_settings(tmp_path, redis_url=redis_url))
    try:
        tasks_before = _tasks_run(worker)
        name = await _collection(api)
        first = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=LATE), timeout=30
        )
        retrieve, late, _ = first.stages
        assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
        assert (retrieve.candidates_out, late.candidates_in, late.candidates_out) == (6, 6, 3)
        assert (late.token_source, late.query_token_source) == ("store", "encoder pass")
        assert [h.id for h in first.hits][0] == "aspirin" and len(first.hits) == 3

        # The same query again: its vector and token vectors both come from Redis (one cached matrix).
        again = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=QUERY, top_k=3, settings=LATE, omit_documents=True
            ),
            timeout=30,
        )
        assert again.stages[1].query_token_source == "cache", again.stages[1]
        assert [h.id for h in again.hits] == [h.id for h in first.hits]
        assert [h.score for h in again.hits] == pytest.approx([h.score for h in first.hits], abs=1e-6)
        client = redis_client.Redis.from_url(redis_url)
        assert client.keys("sieve:qtok:v1:all-MiniLM-L6-v2@*")
        assert not client.keys("sieve:tok:*")  # no document token vectors in Redis any more
        # Neither the upsert nor the searches sent the worker anything.
        assert _tasks_run(worker) == tasks_before
    finally:
        await stop_api(api)


async def test_a_replaced_text_is_scored_from_its_new_token_vectors(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(make_settings(tmp_path, redis_url=redis_url))
    try:
        name = await _collection(api)
        request = search_pb2.SearchRequest(collection=name, query=QUERY, top_k=6, settings=LATE)
        first = await api.search.Search(request, timeout=30)
        changed = "Aspirin does not reduce the risk of a heart attack in healthy adults, a new trial finds."
        write = await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id="aspirin", text=changed)]
            )
        )
        after = await api.search.Search(request, timeout=30)
        assert after.generation == write.generation > first.generation
        before_scores = {h.id: h.score for h in first.hits}
        after_scores = {h.id: h.score for h in after.hits}
        assert after_scores["aspirin"] != pytest.approx(before_scores["aspirin"], abs=1e-4)
        # The others' token vectors are unchanged: so are their scores.
        for doc_id in set(DOCS) - {"aspirin"}:
            assert after_scores[doc_id] == pytest.approx(before_scores[doc_id], abs=1e-5)
    finally:
        await stop_api(api)


@pytest.mark.parametrize("redis", [None, "redis://127.0.0.1:1/0"], ids=["no-redis", "redis-unreachable"])
async def test_late_interaction_needs_no_redis(api, redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = api if redis is None else await start_api(make_settings(tmp_path, redis_url=redis))
    try:
        name = await _collection(target)
        started = time.monotonic()
        resp = await target.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=REQUIRED), timeout=10
        )
        assert time.monotonic() - started < 5
        late = resp.stages[1]
        assert late.status == search_pb2.STAGE_STATUS_COMPLETED, late.reason
        assert late.token_source == "store" and resp.hits[0].id == "aspirin"
        assert [len(h.stage_scores) for h in resp.hits] == [2, 2, 2]
    finally:
        if target is not api:
            await stop_api(target)


async def test_no_worker_is_needed_within_a_short_deadline(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Database 1 of the same Redis: a broker no worker listens on. Zero-shot late interaction runs in the
    # server, so a REQUIRED stage completes well within a short deadline.
    api = await start_api(make_settings(tmp_path, redis_url=redis_url.rsplit("/", 1)[0] + "/1"))
    try:
        name = await _collection(api)
        started = time.monotonic()
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=REQUIRED), timeout=2.0
        )
        assert time.monotonic() - started < 2.0
        assert resp.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
        assert [h.id for h in resp.hits][0] == "aspirin"
    finally:
        await stop_api(api)


async def test_an_index_job_stores_the_token_vectors_of_its_workers_encoder_pass(
    worker: Worker, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(make_settings(tmp_path / "data", redis_url=redis_url))
    try:
        name = await _collection(api, {})
        texts = {f"j{i}": f"{text} (edition {i})" for i, text in enumerate(list(DOCS.values()) * 4)}
        path = tmp_path / "job.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))
        final = await run_index_job(api, name, path, batch_size=8)
        assert (final.state, final.done, final.embedder) == (
            jobs_pb2.JOB_STATE_SUCCEEDED,
            len(texts),
            "workers",
        )
        # One task per batch (vectors and token vectors together), none for token vectors alone.
        log = worker.log.read_text(errors="replace")
        assert "task sieve.document_tokens " not in log and "task sieve.embed SUCCESS" in log
        info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        assert info.collection.token_storage.pending == 0 and info.collection.document_count == len(texts)
        store = api.server.engine.store
        cid = store.get_collection(name).id
        docs = store.get_documents(cid, list(texts))
        blobs = store.token_blobs(cid, [d.key for d in docs.values()])
        runner = api.server.engine.models.get(MODEL)
        for doc_id, doc in docs.items():
            text = texts[doc_id]
            mine = compress(
                runner.token_vectors([text])[0], DEFAULT_TOKEN_FORMAT, runner.token_offsets([text])[0]
            )
            theirs = blobs[doc.key]  # computed by the worker process: equal within float noise
            assert read_header(theirs) == read_header(mine)
            np.testing.assert_allclose(decode_tokens(theirs), decode_tokens(mine), atol=2e-2)
        resp = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=QUERY, top_k=3, settings=REQUIRED, min_generation=final.generation
            ),
            timeout=30,
        )
        assert (
            resp.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED and resp.stages[1].tokens_pending == 0
        )
    finally:
        await stop_api(api)


async def test_late_interaction_on_an_empty_result_needs_no_worker(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api, {})
    resp = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=QUERY, settings=LATE), timeout=10
    )
    assert list(resp.hits) == []
    assert resp.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED and resp.stages[1].candidates_in == 0
