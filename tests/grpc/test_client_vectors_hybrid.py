"""The Python facade's hybrid settings and vector calls against a real in-process server: documents upserted
with their own vectors (a list and a numpy array) are stored as given and found by `query_vector`; the
retrieval, fusion, rrf_k and dense_weight keywords reach the server (its fusion stage reports the k or the
weight it used), in the sync and asyncio clients alike."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import sieve
from sieve import AsyncSieveClient, SieveClient

from tests.conftest import Api

aio = pytest.mark.asyncio(loop_scope="session")


def _unit(dims: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


def _stage(response, stage: int):
    return next(s for s in response.stages if s.stage == stage)


def _vectors_and_hybrid(address: str, name: str) -> None:
    with SieveClient(address) as client:
        created = client.create_collection(name)
        a, b = _unit(created.dimensions, 1), _unit(created.dimensions, 2)
        written = client.upsert_documents(
            name,
            [
                {"id": "a", "text": "quarks and gluons", "vector": a},  # numpy array
                {"id": "b", "text": "owls hunt mice", "vector": b.tolist()},  # plain list
                {"id": "c", "text": "the cat sat on the mat"},  # embedded by the server
            ],
            embedding_model=created.embedding_model,
        )
        assert written.upserted == 3
        # Stored as given: the vector search finds each by its own vector with cosine 1 (f16 index aside).
        for doc_id, v in (("a", a), ("b", b)):
            hits = client.search(name, "", query_vector=v, top_k=1, min_generation=written.generation).hits
            assert hits[0].id == doc_id and hits[0].score > 0.999
        # Refused without the model that made them.
        with pytest.raises(sieve.InvalidArgument, match="embedding_model"):
            client.upsert_documents(name, [{"id": "d", "text": "x", "vector": a}])

        rrf = client.search(name, "owls", retrieval="hybrid", fusion="rrf", rrf_k=7)
        assert _stage(rrf, sieve.Stage.STAGE_LEXICAL).candidates_out >= 1
        assert _stage(rrf, sieve.Stage.STAGE_FUSION).method == "rrf k=7"
        assert rrf.hits[0].id == "b"
        weighted = client.search(name, "owls", retrieval="hybrid", fusion="weighted", dense_weight=0.25)
        assert _stage(weighted, sieve.Stage.STAGE_FUSION).method == "weighted dense=0.25"
        lexical = client.search(name, "cat", retrieval="lexical")
        stages = [s.stage for s in lexical.stages]
        assert stages[0] == sieve.Stage.STAGE_LEXICAL and sieve.Stage.STAGE_RETRIEVE not in stages
        assert lexical.hits[0].id == "c"
        streamed = list(client.search_stream(name, "owls", retrieval="hybrid", rrf_k=9))
        assert _stage(streamed[-1].result, sieve.Stage.STAGE_FUSION).method == "rrf k=9"
        with pytest.raises(ValueError, match="unknown retrieval"):
            client.search(name, "owls", retrieval="sparse")  # type: ignore[arg-type]
        client.delete_collection(name)


@aio
async def test_sync_client_vectors_and_hybrid_settings(api: Api) -> None:
    await asyncio.to_thread(_vectors_and_hybrid, api.address, f"cv-{uuid.uuid4().hex[:10]}")


@aio
async def test_async_client_vectors_and_hybrid_settings(api: Api) -> None:
    name = f"cv-{uuid.uuid4().hex[:10]}"
    async with AsyncSieveClient(api.address) as client:
        created = await client.create_collection(name)
        v = _unit(created.dimensions, 3)
        written = await client.upsert_documents(
            name,
            [{"id": "v", "text": "a vector of its own", "vector": v}],
            embedding_model=created.embedding_model,
        )
        hits = (await client.search(name, "", query_vector=v, min_generation=written.generation)).hits
        assert hits[0].id == "v" and hits[0].score > 0.999
        hybrid = await client.search(name, "vector", retrieval="hybrid", fusion="weighted", dense_weight=0.75)
        assert _stage(hybrid, sieve.Stage.STAGE_FUSION).method == "weighted dense=0.75"
        await client.delete_collection(name)
