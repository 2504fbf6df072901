"""The whole cascade with configured models: retrieve -> ColBERT -> cross-encoder, on a real worker.

The ColBERT and cross-encoder bundles are exported here from seeded checkpoints of the real
architectures (no trained weights are reachable; see tests/integration/test_colbert.py and test_cross_encoder.py
for their parity with the reference libraries). What this proves is the plumbing: which model each
stage runs, that the stored token vectors come from the ColBERT bundle (computed by an embed worker after
the write, pending until then), that the query's come from a worker, that scores are the runners' own, the
per-stage reports, and the caches.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.late_interaction import maxsim_blobs
from sieve_core.models.bundle import load_bundle_manifest
from sieve_core.models.colbert import ColbertRunner
from sieve_core.models.cross_encoder import CrossEncoderRunner
from sieve_core.models.export import subprocess_env
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many, prepare_query
from tests.conftest import MODEL, MODELS_DIR, ROOT, Worker, make_settings, start_api, start_worker, stop_api
from tests.corpus import DOCS, QUERY

pytestmark = pytest.mark.asyncio(loop_scope="session")

COLBERT, CROSS = "colbert-seeded", "cross-seeded"
CASCADE = common_pb2.SearchSettings(
    retrieve_candidates=6,
    late_interaction=common_pb2.STAGE_MODE_REQUIRED,
    late_interaction_keep=4,
    cross_encoder=common_pb2.STAGE_MODE_REQUIRED,
    cross_encoder_keep=3,
)


@dataclass
class Models:
    directory: Path


def _export(kind: str, module: str, work: Path, name: str) -> subprocess.Popen[bytes]:
    checkpoint = work / f"{name}-checkpoint"
    script = (
        f"{sys.executable} -m {module} seed --out {checkpoint} && "
        f"{sys.executable} -m sieve_core.models.export {kind} --source {checkpoint} "
        f"--out {work / 'models' / name} --name {name}"
    )
    return subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    work = tmp_path_factory.mktemp("stage-models")
    (work / "models").mkdir()
    (work / "models" / MODEL).symlink_to(MODELS_DIR / MODEL)
    # Both exports at once: independent processes, and this module's main cost.
    procs = [
        _export("colbert", "sieve_core.models.export_colbert", work, COLBERT),
        _export("cross-encoder", "sieve_core.models.export_cross_encoder", work, CROSS),
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return Models(work / "models")


@pytest.fixture(scope="module")
def stage_worker(
    models: Models, redis_url: str, client_app, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    running = start_worker(
        redis_url,
        client_app,
        tmp_path_factory.mktemp("stage-worker") / "worker.log",
        queues="embed,colbert,cross_encoder",
        models_dir=models.directory,
        extra_env={"SIEVE_LATE_INTERACTION_MODEL": COLBERT, "SIEVE_CROSS_ENCODER_MODEL": CROSS},
        name="stages",
    )
    try:
        yield running
    finally:
        running.kill()


def _settings(models: Models, redis_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        models_dir=models.directory,
        late_interaction_model=COLBERT,
        cross_encoder_model=CROSS,
        rerank_timeout_s=30.0,
    )


async def _wait_until_stored(api, name: str, limit_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Until the collection reports no document pending its token vectors."""
    deadline = time.monotonic() + limit_s
    while True:
        info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        storage = info.collection.token_storage
        assert info.collection.HasField("token_storage")
        if storage.pending == 0:
            return
        assert time.monotonic() < deadline, f"{storage.pending} documents still pending"
        await asyncio.sleep(0.1)


async def test_retrieve_colbert_cross_encoder(
    models: Models, stage_worker: Worker, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    api = await start_api(_settings(models, redis_url, tmp_path))
    try:
        name = f"full-{uuid.uuid4().hex[:8]}"
        defaults = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, defaults=defaults)
            )
        )
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
            )
        )
        # After the write: an embed worker computes the documents' ColBERT token vectors (its own pass),
        # the server stores them; until then the collection reports them pending.
        await _wait_until_stored(api, name)
        colbert_id = load_bundle_manifest(models.directory / COLBERT).model_id
        info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        assert info.collection.token_storage.model_id == colbert_id
        assert "task sieve.document_tokens SUCCESS" in stage_worker.log.read_text(errors="replace")

        request = search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=CASCADE)
        resp = await api.search.Search(request, timeout=60)
        retrieve, late, cross = resp.stages
        assert [s.status for s in resp.stages] == [search_pb2.STAGE_STATUS_COMPLETED] * 3, resp.stages
        assert (retrieve.candidates_out, late.candidates_in, late.candidates_out) == (6, 6, 4)
        assert (cross.candidates_in, cross.candidates_out) == (4, 3)
        assert COLBERT in late.model_id and "ColBERT" in late.model_id
        # Document token vectors from the store (no document encoder pass at query time); the query's from
        # the ColBERT bundle's query encoder on a worker.
        assert (late.token_source, late.tokens_pending, late.query_token_source) == ("store", 0, "worker")
        assert late.method.startswith("store: 6 docs") and "query tokens: worker" in late.method, late.method
        assert CROSS in cross.model_id and "0 cached, 4 computed" in cross.method
        assert len(resp.hits) == 3
        for hit in resp.hits:
            assert [s.stage for s in hit.stage_scores] == [
                common_pb2.STAGE_RETRIEVE,
                common_pb2.STAGE_LATE_INTERACTION,
                common_pb2.STAGE_CROSS_ENCODER,
            ]
            assert hit.score == hit.stage_scores[2].score
        assert [h.score for h in resp.hits] == sorted((h.score for h in resp.hits), reverse=True)

        # The scores are the runners' own, computed here in-process on the same texts.
        texts = [DOCS[h.id] for h in resp.hits]
        expected_ce = CrossEncoderRunner(models.directory / CROSS).score(QUERY, texts)
        np.testing.assert_allclose([h.score for h in resp.hits], expected_ce, atol=1e-5)
        colbert = ColbertRunner(models.directory / COLBERT)
        query_tokens = prepare_query(colbert.query_token_vectors([QUERY])[0], DEFAULT_TOKEN_FORMAT)
        blobs = compress_many(
            colbert.document_token_vectors(texts), DEFAULT_TOKEN_FORMAT, colbert.document_token_offsets(texts)
        )
        expected_li = maxsim_blobs(query_tokens, blobs)
        # Computed in other processes (the worker's ONNX runs): equal within float noise.
        np.testing.assert_allclose([h.stage_scores[1].score for h in resp.hits], expected_li, rtol=0.01)

        # The same search again: the query's ColBERT token vectors come from the cache (no worker), the
        # cross-encoder's scores too.
        again = await api.search.Search(request, timeout=60)
        assert again.stages[1].query_token_source == "cache" and again.stages[2].method == "cache"
        assert [h.id for h in again.hits] == [h.id for h in resp.hits]
        assert [h.score for h in again.hits] == pytest.approx([h.score for h in resp.hits])

        # A different query over the same documents: a worker encodes it, the documents come from the store.
        other = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query="aspirin and the heart", top_k=3, settings=CASCADE
            ),
            timeout=60,
        )
        assert other.stages[1].query_token_source == "worker" and other.stages[1].token_source == "store"
        assert "computed" in other.stages[2].method
    finally:
        await stop_api(api)


async def test_cross_encoder_without_its_worker_degrades_or_fails(
    models: Models, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # A configured model, but no worker consumes the cross_encoder queue of this broker (database 2).
    url = redis_url.rsplit("/", 1)[0] + "/2"
    settings = make_settings(
        tmp_path, redis_url=url, models_dir=models.directory, cross_encoder_model=CROSS, rerank_timeout_s=1.0
    )
    api = await start_api(settings)
    try:
        name = f"nocross-{uuid.uuid4().hex[:8]}"
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
        )
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
            )
        )
        best = common_pb2.SearchSettings(
            cross_encoder=common_pb2.STAGE_MODE_BEST_EFFORT, cross_encoder_keep=3
        )
        started = time.monotonic()
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=best), timeout=5
        )
        assert time.monotonic() - started < 3
        cross = resp.stages[2]
        assert cross.status == search_pb2.STAGE_STATUS_DEGRADED and "no worker answered" in cross.reason
        assert resp.hits[0].id == "aspirin" and all(len(h.stage_scores) == 1 for h in resp.hits)
    finally:
        await stop_api(api)


async def test_a_missing_late_interaction_bundle_is_a_failed_precondition(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, late_interaction_model="no-such-colbert")
    server = await start_api(settings)
    try:
        # A collection that would store the missing bundle's token vectors cannot be created.
        name = f"nocolbert-{uuid.uuid4().hex[:8]}"
        late = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await server.collections.CreateCollection(
                collections_pb2.CreateCollectionRequest(
                    collection=collections_pb2.Collection(name=name, defaults=late)
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "no-such-colbert" in err.value.details() and "sieve models export colbert" in err.value.details()
        )

        # One without token vectors: late interaction is refused (REQUIRED) or degraded, saying why.
        await server.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
        )
        required = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_REQUIRED)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await server.search.Search(
                search_pb2.SearchRequest(collection=name, query=QUERY, settings=required)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stores no token vectors" in err.value.details()
        resp = await server.search.Search(
            search_pb2.SearchRequest(collection=name, query=QUERY, settings=late)
        )
        assert resp.stages[1].status == search_pb2.STAGE_STATUS_DEGRADED
        assert "token_storage" in resp.stages[1].reason
    finally:
        await stop_api(server)


async def test_a_collection_picks_its_bundles(
    models: Models, stage_worker: Worker, redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # No models in the server's settings: the collection's defaults name them, a request may override.
    settings = make_settings(
        tmp_path, redis_url=redis_url, models_dir=models.directory, rerank_timeout_s=30.0
    )
    api = await start_api(settings)
    try:
        name = f"picks-{uuid.uuid4().hex[:8]}"
        defaults = common_pb2.SearchSettings(
            late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT,
            late_interaction_model=COLBERT,
            cross_encoder_model=CROSS,
        )
        created = await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, defaults=defaults)
            )
        )
        assert created.collection.defaults.cross_encoder_model == CROSS
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
            )
        )
        await _wait_until_stored(api, name)
        request = search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=CASCADE)
        resp = await api.search.Search(request, timeout=60)
        assert [s.status for s in resp.stages] == [search_pb2.STAGE_STATUS_COMPLETED] * 3, resp.stages
        assert COLBERT in resp.stages[1].model_id and CROSS in resp.stages[2].model_id
        # The collection stores ColBERT token vectors: asking for the zero-shot ones is refused by name.
        zero_shot = common_pb2.SearchSettings(
            late_interaction=common_pb2.STAGE_MODE_REQUIRED, late_interaction_model=MODEL
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.search.Search(
                search_pb2.SearchRequest(collection=name, query=QUERY, settings=zero_shot)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and COLBERT in err.value.details()

        # A request naming a bundle the server does not have: a clear FAILED_PRECONDITION.
        missing = common_pb2.SearchSettings(
            cross_encoder=common_pb2.STAGE_MODE_REQUIRED, cross_encoder_model="nope"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.search.Search(search_pb2.SearchRequest(collection=name, query=QUERY, settings=missing))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'nope'" in err.value.details()
        # A name that cannot be a bundle: INVALID_ARGUMENT.
        bad = common_pb2.SearchSettings(late_interaction_model="../etc")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.search.Search(search_pb2.SearchRequest(collection=name, query=QUERY, settings=bad))
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "late_interaction_model" in err.value.details()
        )
    finally:
        await stop_api(api)


async def test_colbert_token_vectors_pending_without_workers_are_reported_not_computed_by_searches(
    models: Models, redis_url: str, tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    # A broker no worker listens on (database 3): the ColBERT token vectors cannot be computed.
    url = redis_url.rsplit("/", 1)[0] + "/3"
    settings = make_settings(
        tmp_path,
        redis_url=url,
        models_dir=models.directory,
        late_interaction_model=COLBERT,
        rerank_timeout_s=1.0,
    )
    api = await start_api(settings)
    try:
        name = f"pending-{uuid.uuid4().hex[:8]}"
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, token_storage=collections_pb2.TokenStorage())
            )
        )
        with caplog.at_level("INFO", logger="server.core.tokens"):
            await api.documents.UpsertDocuments(
                documents_pb2.UpsertDocumentsRequest(
                    collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
                )
            )
            info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
            assert info.collection.token_storage.pending == len(DOCS)
            best = common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT)
            resp = await api.search.Search(
                search_pb2.SearchRequest(collection=name, query=QUERY, top_k=3, settings=best), timeout=10
            )
            late = resp.stages[1]
            # The query path computes no document's token vectors: it says they are pending.
            assert late.status == search_pb2.STAGE_STATUS_DEGRADED, late
            assert "token vectors stored yet" in late.reason or "no worker answered" in late.reason, (
                late.reason
            )
            deadline = time.monotonic() + 10
            while f"collection {name!r}: {len(DOCS)} documents pending token vectors" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text[-2000:]
                await asyncio.sleep(0.1)
        info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        assert info.collection.token_storage.pending == len(DOCS)
    finally:
        await stop_api(api)
