"""Filtered search keeps recall: the true top-k among matching documents, even when 1% match."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.models.bi_encoder import BiEncoderRunner
from tests.conftest import MODEL, MODELS_DIR, make_settings, start_api, stop_api

pytestmark = pytest.mark.asyncio(loop_scope="session")

WORDS = [
    "protein",
    "cell",
    "gene",
    "virus",
    "tumor",
    "patient",
    "therapy",
    "dose",
    "brain",
    "neuron",
    "heart",
    "blood",
    "immune",
    "vaccine",
    "mouse",
    "trial",
    "risk",
    "diet",
    "sleep",
    "exercise",
    "climate",
    "ocean",
    "carbon",
    "forest",
    "river",
    "soil",
    "crop",
    "insect",
    "bird",
    "market",
    "price",
    "bank",
    "loan",
    "tax",
    "trade",
    "school",
    "student",
    "teacher",
    "exam",
    "music",
    "film",
    "novel",
    "poem",
    "theatre",
]
N_DOCS, SELECTIVE_EVERY = 2000, 100  # 1% of documents carry the selective tag


def _corpus() -> list[tuple[str, str, dict[str, str]]]:
    rng = random.Random(7)
    docs = []
    for i in range(N_DOCS):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        meta = {"tag": "rare" if i % SELECTIVE_EVERY == 0 else "common", "third": str(i % 3)}
        docs.append((f"doc-{i}", text, meta))
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str, dict[str, str]]]:
    return _corpus()


@pytest.fixture(scope="module")
def vectors(corpus) -> np.ndarray:  # type: ignore[no-untyped-def]
    return BiEncoderRunner(MODELS_DIR / MODEL).embed([t for _, t, _ in corpus])


QUERIES = [
    "gene therapy for tumor patients",
    "carbon in ocean and forest soil",
    "student exam music",
    "immune response to a vaccine",
    "bank loan and market price",
    "sleep diet exercise heart",
]


def _brute_force(corpus, vectors, query_vec, keep, k):  # type: ignore[no-untyped-def]
    idx = [i for i, (_, _, m) in enumerate(corpus) if keep(m)]
    scores = vectors[idx] @ query_vec
    order = np.argsort(-scores, kind="stable")[:k]
    return [corpus[idx[j]][0] for j in order]


async def _load(api, corpus) -> str:  # type: ignore[no-untyped-def]
    name = f"flt-{random.randrange(1 << 30)}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    for i in range(0, len(corpus), 500):
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(
                collection=name,
                documents=[
                    documents_pb2.Document(id=d, text=t, metadata=m) for d, t, m in corpus[i : i + 500]
                ],
            )
        )
    return name


def _flt(**kv: str) -> common_pb2.Filter:
    return common_pb2.Filter(all=[common_pb2.Condition(key=k, equals=v) for k, v in kv.items()])


async def _recall(api, name, corpus, vectors, flt, keep, k: int) -> tuple[float, set[str]]:  # type: ignore[no-untyped-def]
    runner = BiEncoderRunner(MODELS_DIR / MODEL)
    found, methods = 0, set()
    for query in QUERIES:
        resp = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=query, top_k=k, filter=flt)
        )
        got = [h.id for h in resp.hits]
        truth = _brute_force(corpus, vectors, runner.embed([query])[0], keep, k)
        assert len(got) == len(truth) == k
        assert all(keep(dict(h.metadata)) for h in resp.hits)
        found += len(set(got) & set(truth))
        methods.add(resp.stages[0].method)
    return found / (k * len(QUERIES)), methods


async def test_selective_filter_returns_true_top_k(api, corpus, vectors) -> None:  # type: ignore[no-untyped-def]
    name = await _load(api, corpus)
    recall, methods = await _recall(
        api, name, corpus, vectors, _flt(tag="rare"), lambda m: m["tag"] == "rare", 10
    )
    assert methods == {"exact"}
    assert recall == 1.0
    # Two conditions: 1% AND a third of those.
    recall, _ = await _recall(
        api,
        name,
        corpus,
        vectors,
        _flt(tag="rare", third="0"),
        lambda m: m["tag"] == "rare" and m["third"] == "0",
        5,
    )
    assert recall == 1.0


async def test_broad_filter_through_the_graph_keeps_recall(tmp_path, corpus, vectors) -> None:  # type: ignore[no-untyped-def]
    # Force the HNSW path for every filter: the graph walk widens until enough matches are found.
    graph_only = await start_api(make_settings(tmp_path, exact_filter_max=0))
    try:
        name = await _load(graph_only, corpus)
        for flt, keep in [
            (_flt(third="1"), lambda m: m["third"] == "1"),
            (_flt(tag="rare"), lambda m: m["tag"] == "rare"),
        ]:
            recall, methods = await _recall(graph_only, name, corpus, vectors, flt, keep, 10)
            assert methods == {"hnsw+filter"}
            assert recall >= 0.95, recall
    finally:
        await stop_api(graph_only)
