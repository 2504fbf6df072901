"""Lexical and hybrid retrieval, and the API's vectors, through a real in-process gRPC server and real model."""

from __future__ import annotations

import uuid

import grpc
import numpy as np
import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

from sieve_core.models.bi_encoder import BiEncoderRunner
from tests.conftest import MODEL, MODELS_DIR

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = {
    "kinase": ("Protein kinase C phosphorylates the receptor XR-7731 in hepatocytes", {"lang": "en"}),
    "liver": ("The liver cells respond to insulin signalling", {"lang": "en"}),
    "ocean": ("Ocean currents carry heat toward the poles", {"lang": "en"}),
    "forest": ("Tropical forests store large amounts of carbon", {"lang": "en"}),
    "bakery": ("A bakery sells bread and pastries every morning", {"lang": "fr"}),
}
HYBRID = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_HYBRID)
LEXICAL = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_LEXICAL)


async def _collection(api, language: str = "", docs=DOCS) -> str:  # type: ignore[no-untyped-def]
    name = f"hybrid-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(name=name, text_language=language)
        )
    )
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name,
            documents=[documents_pb2.Document(id=i, text=t, metadata=m) for i, (t, m) in docs.items()],
        )
    )
    return name


async def _search(api, name: str, query: str, settings, **kw):  # type: ignore[no-untyped-def]
    return await api.search.Search(
        search_pb2.SearchRequest(collection=name, query=query, top_k=5, settings=settings, **kw)
    )


async def test_lexical_finds_an_exact_code_and_reports_its_stage(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    resp = await _search(api, name, "XR-7731", LEXICAL)
    assert [h.id for h in resp.hits] == ["kinase"]  # no other document has the code's words
    assert [s.stage for s in resp.stages][0] == common_pb2.STAGE_LEXICAL
    report = resp.stages[0]
    assert report.status == search_pb2.STAGE_STATUS_COMPLETED and report.candidates_out == 1
    assert "BM25" in report.model_id and report.took_ms > 0
    (score,) = resp.hits[0].stage_scores
    assert score.stage == common_pb2.STAGE_LEXICAL and score.score == pytest.approx(resp.hits[0].score)
    assert score.score > 0


async def test_hybrid_reports_each_part_and_hits_carry_every_score(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    resp = await _search(api, name, "kinase receptor in liver cells", HYBRID)
    stages = [s.stage for s in resp.stages]
    assert stages[:3] == [common_pb2.STAGE_RETRIEVE, common_pb2.STAGE_LEXICAL, common_pb2.STAGE_FUSION]
    assert all(s.status == search_pb2.STAGE_STATUS_COMPLETED for s in resp.stages[:3])
    assert resp.stages[2].method == "rrf k=60"
    top = resp.hits[0]
    assert top.id in ("kinase", "liver")
    by_stage = {s.stage: s for s in top.stage_scores}
    # Found by both sides: its dense and BM25 scores, and the fused score it is ranked by.
    assert set(by_stage) == {common_pb2.STAGE_RETRIEVE, common_pb2.STAGE_LEXICAL, common_pb2.STAGE_FUSION}
    fused = by_stage[common_pb2.STAGE_FUSION].score
    expected = 1 / (60 + by_stage[common_pb2.STAGE_RETRIEVE].rank + 1) + 1 / (
        60 + by_stage[common_pb2.STAGE_LEXICAL].rank + 1
    )
    assert fused == pytest.approx(expected) and top.score == pytest.approx(fused)
    # A document no query word reaches has no lexical score, only dense and fused.
    ocean = next(h for h in resp.hits if h.id == "ocean")
    assert common_pb2.STAGE_LEXICAL not in {s.stage for s in ocean.stage_scores}
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)


async def test_weighted_fusion_and_collection_defaults(api) -> None:  # type: ignore[no-untyped-def]
    name = f"hybrid-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(
                name=name,
                defaults=common_pb2.SearchSettings(
                    retrieval=common_pb2.RETRIEVAL_HYBRID, fusion=common_pb2.FUSION_WEIGHTED, dense_weight=0.0
                ),
            )
        )
    )
    described = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
    assert described.collection.defaults.retrieval == common_pb2.RETRIEVAL_HYBRID
    assert described.collection.defaults.dense_weight == 0.0
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, (t, _) in DOCS.items()]
        )
    )
    resp = await _search(api, name, "bread", None)  # the collection's defaults: all weight on BM25
    assert resp.stages[2].method == "weighted dense=0"
    assert resp.hits[0].id == "bakery" and resp.hits[0].score == pytest.approx(1.0)
    assert all(h.score == pytest.approx(0.0) for h in resp.hits[1:])


async def test_filters_apply_to_both_sides(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    flt = common_pb2.Filter(all=[common_pb2.Condition(key="lang", equals="fr")])
    for settings in (HYBRID, LEXICAL):
        resp = await _search(api, name, "protein kinase bread", settings, filter=flt)
        assert [h.id for h in resp.hits] == ["bakery"]


@pytest.mark.parametrize(
    "query",
    ['title:kinase AND "receptor', "kinase) OR (1=1", "*:*", "\u202ekinase", "キナーゼ kinase", "+-&&||!"],
)
async def test_query_syntax_is_only_words(api, query: str) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    for settings in (LEXICAL, HYBRID):
        resp = await _search(api, name, query, settings)  # never an error the user did not cause
        if "kinase" in query:
            assert resp.hits[0].id == "kinase"


async def test_analyzer_language_is_chosen_at_creation(api) -> None:  # type: ignore[no-untyped-def]
    docs = {"haus": ("Die Häuser stehen am Fluss", {}), "auto": ("Das Auto fährt schnell", {})}
    name = await _collection(api, "german", docs)
    info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
    assert info.collection.text_language == "german"
    resp = await _search(api, name, "Haus", LEXICAL)  # German stemming: Häuser -> haus
    assert [h.id for h in resp.hits] == ["haus"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collection(api, "klingon")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_language" in err.value.details()


async def test_lexical_writes_are_searchable_at_once_and_deletes_leave(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id="ocean", text="Glaciers calve icebergs")]
        )
    )
    assert [h.id for h in (await _search(api, name, "icebergs", LEXICAL)).hits] == ["ocean"]
    assert not (await _search(api, name, "currents", LEXICAL)).hits  # the replaced text is gone
    await api.documents.DeleteDocuments(documents_pb2.DeleteDocumentsRequest(collection=name, ids=["ocean"]))
    assert not (await _search(api, name, "icebergs", LEXICAL)).hits


async def test_upsert_with_vectors_and_search_by_vector(api) -> None:  # type: ignore[no-untyped-def]
    runner = BiEncoderRunner(MODELS_DIR / MODEL)
    name = f"vectors-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name))
    )
    texts = {i: t for i, (t, _) in DOCS.items()}
    vectors = runner.embed(list(texts.values()))
    # A vector the server would never compute for this text: proof that the given vector is what is stored.
    planted = np.zeros(runner.dims, dtype=np.float32)
    planted[7] = 1.0
    docs = [
        documents_pb2.Document(id=i, text=t, vector=v.tolist())
        for (i, t), v in zip(texts.items(), vectors, strict=True)
    ]
    docs[0] = documents_pb2.Document(id="kinase", text=texts["kinase"], vector=planted.tolist())
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(collection=name, documents=docs, embedding_model=MODEL)
    )
    resp = await api.search.Search(
        search_pb2.SearchRequest(collection=name, query_vector=planted.tolist(), top_k=2)
    )
    assert resp.hits[0].id == "kinase" and resp.hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert "client vector" in resp.stages[0].model_id
    # The others' stored vectors are the model's: a text query finds them as usual.
    resp = await _search(api, name, "heat carried by sea water", None)
    assert resp.hits[0].id == "ocean"


@pytest.mark.parametrize(
    ("model", "length", "message"),
    [
        ("", 384, "embedding_model is not set"),
        ("bge-small-en-v1.5", 384, "cannot be stored in a collection of"),
        (MODEL, 383, "has 383 dimensions"),
    ],
)
async def test_vectors_of_another_model_or_shape_are_refused(api, model, length, message) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    doc = documents_pb2.Document(id="x", text="anything", vector=[0.1] * length)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.documents.UpsertDocuments(
            documents_pb2.UpsertDocumentsRequest(collection=name, documents=[doc], embedding_model=model)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_search_by_vector_checks_its_shape_and_what_needs_text(api) -> None:  # type: ignore[no-untyped-def]
    name = await _collection(api)
    for request, message in (
        (
            search_pb2.SearchRequest(collection=name, query_vector=[0.1] * 10),
            "query_vector has 10 dimensions",
        ),
        (
            search_pb2.SearchRequest(collection=name, query_vector=[0.1] * 384, settings=LEXICAL),
            "lexical retrieval",
        ),
        (search_pb2.SearchRequest(collection=name, query_vector=[float("nan")] * 384), "NaN"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.search.Search(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_a_store_without_full_text_indexes_gets_them_rebuilt_on_start(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A data directory from before hybrid retrieval (or one whose full-text files were lost): on start each
    collection's full-text index is rebuilt from the store, and the log says so."""
    import shutil

    from tests.conftest import make_settings, start_api, stop_api

    settings = make_settings(tmp_path / "data")
    first = await start_api(settings)
    try:
        name = await _collection(first)
    finally:
        await stop_api(first)
    (directory,) = (tmp_path / "data" / "collections").iterdir()
    shutil.rmtree(directory / "fulltext")
    second = await start_api(settings)
    try:
        assert "rebuilding the full-text index from the store" in caplog.text
        resp = await _search(second, name, "XR-7731", LEXICAL)
        assert [h.id for h in resp.hits] == ["kinase"]
    finally:
        await stop_api(second)


@pytest.mark.parametrize("retrieval", [common_pb2.RETRIEVAL_HYBRID, common_pb2.RETRIEVAL_LEXICAL])
async def test_fused_candidates_feed_late_interaction(api, retrieval) -> None:  # type: ignore[no-untyped-def]
    """Late interaction re-ranks what hybrid (or lexical) retrieval returned: candidates only BM25 found are
    among its inputs and outputs, and each hit keeps the first stage's scores beside the MaxSim score."""
    name = f"hybrid-li-{uuid.uuid4().hex[:8]}"
    await api.collections.CreateCollection(
        collections_pb2.CreateCollectionRequest(
            collection=collections_pb2.Collection(
                name=name,
                defaults=common_pb2.SearchSettings(late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT),
            )
        )
    )
    await api.documents.UpsertDocuments(
        documents_pb2.UpsertDocumentsRequest(
            collection=name, documents=[documents_pb2.Document(id=i, text=t) for i, (t, _) in DOCS.items()]
        )
    )
    settings = common_pb2.SearchSettings(
        retrieval=retrieval,
        late_interaction=common_pb2.STAGE_MODE_REQUIRED,
        retrieve_candidates=3,
        late_interaction_keep=3,
    )
    resp = await _search(api, name, "XR-7731 phosphorylation", settings)
    stages = {s.stage: s for s in resp.stages}
    late = stages[common_pb2.STAGE_LATE_INTERACTION]
    first = common_pb2.STAGE_FUSION if retrieval == common_pb2.RETRIEVAL_HYBRID else common_pb2.STAGE_LEXICAL
    assert late.status == search_pb2.STAGE_STATUS_COMPLETED
    assert stages[first].candidates_out == late.candidates_in == len(resp.hits) >= 1
    kinase = next(h for h in resp.hits if h.id == "kinase")  # found by its code, which only BM25 matches
    kept = {s.stage for s in kinase.stage_scores}
    assert {common_pb2.STAGE_LEXICAL, common_pb2.STAGE_LATE_INTERACTION} <= kept
    assert kinase.score == pytest.approx(kinase.stage_scores[-1].score)  # ranked by MaxSim now
