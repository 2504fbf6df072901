"""Issue 15 through the gRPC API of an in-process server (no Redis): evidence spans on late-interaction
hits, SearchStream (one message per stage, the final one equal to Search), budgets and tiers in the stage
reports, and the re-rank gain counters."""

from __future__ import annotations

import re
import uuid

import pytest
from sieve.v1 import collections_pb2, common_pb2, documents_pb2, search_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")

DOCS = {
    "aspirin": "😀 Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "mito": "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "vitd": "Vitamin D deficiency is associated with an increased risk of bone fractures (naïve café).",
    "exercise": "Regular exercise improves insulin sensitivity in adults with type 2 diabetes.",
    "smoking": "Smoking is a major risk factor for lung cancer and chronic obstructive pulmonary disease.",
    "coffee": "Coffee consumption has been linked to a lower risk of type 2 diabetes in cohort studies.",
}
LATE = common_pb2.SearchSettings(
    late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, retrieve_candidates=6, late_interaction_keep=4
)
QUERIES = ["does aspirin prevent heart attacks", "vitamin D and bone fractures", "smoking lung cancer"]


@pytest.fixture(scope="module")
async def collection(api) -> str:  # type: ignore[no-untyped-def]
    name = f"explain-{uuid.uuid4().hex[:8]}"
    collection = collections_pb2.Collection(name=name, token_storage=collections_pb2.TokenStorage())
    await api.collections.CreateCollection(collections_pb2.CreateCollectionRequest(collection=collection))
    docs = [documents_pb2.Document(id=i, text=t) for i, t in DOCS.items()]
    await api.documents.UpsertDocuments(documents_pb2.UpsertDocumentsRequest(collection=name, documents=docs))
    return name


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 2}


@pytest.mark.parametrize("query", QUERIES)
async def test_late_interaction_hits_carry_evidence_inside_their_text(api, collection, query) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=query, top_k=3, settings=LATE)
    response = await api.search.Search(request)
    assert response.stages[1].status == search_pb2.STAGE_STATUS_COMPLETED
    for hit in response.hits:
        assert 0 < len(hit.evidence) <= 5
        starts = [s.start for s in hit.evidence]
        assert starts == sorted(starts)
        for span in hit.evidence:
            # Code points of the text (a Python str's indices), inside it, not empty.
            assert 0 <= span.start < span.end <= len(hit.text) and span.score > 0
    top = response.hits[0]
    covered = _words(" ".join(top.text[s.start : s.end] for s in top.evidence))
    assert covered & _words(query), (query, top.id, covered)


async def test_without_late_interaction_there_is_no_evidence(api, collection) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=QUERIES[0], top_k=3)
    response = await api.search.Search(request)
    assert response.hits and all(len(h.evidence) == 0 for h in response.hits)


LEXICAL = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_LEXICAL)
HYBRID = common_pb2.SearchSettings(retrieval=common_pb2.RETRIEVAL_HYBRID, retrieve_candidates=6)


def _inside_and_in_order(hit: search_pb2.Hit) -> None:
    starts = [s.start for s in hit.evidence]
    assert starts == sorted(starts) and len(hit.evidence) <= 5
    for span in hit.evidence:
        assert 0 <= span.start < span.end <= len(hit.text) and span.score > 0


def _stem_of_a_query_word(piece: str, query: str) -> bool:
    """`piece` (one span's text) is words of the query up to their stems ("attack" for "attacks")."""
    return all(any(w[:5] == q[:5] for q in _words(query)) for w in _words(piece))


@pytest.mark.parametrize("query", QUERIES)
async def test_lexical_hits_carry_the_spans_of_their_matched_terms(api, collection, query) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=query, top_k=3, settings=LEXICAL)
    response = await api.search.Search(request)
    assert response.stages[0].stage == common_pb2.STAGE_LEXICAL and response.hits
    for hit in response.hits:  # BM25 found each, so each has at least one matched term
        assert hit.evidence
        _inside_and_in_order(hit)
        for span in hit.evidence:
            piece = hit.text[span.start : span.end]
            assert _stem_of_a_query_word(piece, query), (query, hit.id, piece)
    top = response.hits[0]
    covered = _words(" ".join(top.text[s.start : s.end] for s in top.evidence))
    assert covered & _words(query), (query, top.id, covered)


async def test_lexical_spans_are_code_points_and_adjacent_terms_merge(api, collection) -> None:  # type: ignore[no-untyped-def]
    # "naïve café": accents before the words (UTF-8 bytes != code points); two adjacent terms, one span.
    query = "café naïve fractures"
    request = search_pb2.SearchRequest(collection=collection, query=query, top_k=1, settings=LEXICAL)
    (hit,) = (await api.search.Search(request)).hits
    assert hit.id == "vitd"
    assert sorted(hit.text[s.start : s.end] for s in hit.evidence) == ["fractures", "naïve café"]
    # The rarer terms weigh more: "naïve café" (two terms, each in one document) outscores one term.
    by_text = {hit.text[s.start : s.end]: s.score for s in hit.evidence}
    assert by_text["naïve café"] > by_text["fractures"]


async def test_hybrid_spans_for_lexical_hits_only_and_late_interaction_wins(api, collection) -> None:  # type: ignore[no-untyped-def]
    query = QUERIES[1]
    hybrid = await api.search.Search(
        search_pb2.SearchRequest(collection=collection, query=query, top_k=6, settings=HYBRID)
    )
    for hit in hybrid.hits:
        lexical = any(s.stage == common_pb2.STAGE_LEXICAL for s in hit.stage_scores)
        assert bool(hit.evidence) == lexical, (hit.id, list(hit.stage_scores))
    assert any(not h.evidence for h in hybrid.hits)  # a hit only the dense side found: no spans
    # With late interaction after the fusion, each hit carries late interaction's spans, not its lexical ones.
    settings = common_pb2.SearchSettings()
    settings.CopyFrom(HYBRID)
    settings.MergeFrom(LATE)
    settings.late_interaction_keep = 6
    late = await api.search.Search(
        search_pb2.SearchRequest(collection=collection, query=query, top_k=6, settings=settings)
    )
    dense = await api.search.Search(
        search_pb2.SearchRequest(collection=collection, query=query, top_k=6, settings=LATE)
    )
    assert late.stages[-2].status == search_pb2.STAGE_STATUS_COMPLETED
    dense_spans = {h.id: list(h.evidence) for h in dense.hits}
    lexical_spans = {h.id: list(h.evidence) for h in hybrid.hits}
    for hit in late.hits:
        assert list(hit.evidence) == dense_spans[hit.id]
    assert any(lexical_spans[h.id] and list(h.evidence) != lexical_spans[h.id] for h in late.hits)


async def test_omit_documents_reads_no_text_for_lexical_spans(api, collection) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(
        collection=collection, query=QUERIES[0], top_k=3, settings=LEXICAL, omit_documents=True
    )
    response = await api.search.Search(request)
    assert response.hits and all(not h.text and not h.evidence for h in response.hits)


def _same(a: search_pb2.SearchResponse, b: search_pb2.SearchResponse) -> None:
    """Equal but for timings."""
    assert [(h.id, h.score, h.text, list(h.evidence), list(h.stage_scores)) for h in a.hits] == [
        (h.id, h.score, h.text, list(h.evidence), list(h.stage_scores)) for h in b.hits
    ]
    for x, y in zip(a.stages, b.stages, strict=True):
        x.took_ms = y.took_ms = 0
        x.method = re.sub(r"\d+ KB|[\d.]+ MB", "", x.method)
        y.method = re.sub(r"\d+ KB|[\d.]+ MB", "", y.method)
    assert list(a.stages) == list(b.stages) and a.generation == b.generation


@pytest.mark.parametrize("query", QUERIES)
async def test_search_stream_sends_each_stage_then_the_search_answer(api, collection, query) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=query, top_k=3, settings=LATE)
    messages = [m async for m in api.search.SearchStream(request)]
    assert [m.stage for m in messages] == [common_pb2.STAGE_RETRIEVE, common_pb2.STAGE_LATE_INTERACTION]
    assert [m.final for m in messages] == [False, True]
    first, final = messages
    assert [s.stage for s in first.result.stages] == [common_pb2.STAGE_RETRIEVE]
    assert all(len(h.evidence) == 0 for h in first.result.hits)  # retrieval has no evidence
    assert [s.stage for s in final.result.stages] == [
        common_pb2.STAGE_RETRIEVE,
        common_pb2.STAGE_LATE_INTERACTION,
        common_pb2.STAGE_CROSS_ENCODER,
    ]
    assert not final.deadline_reached
    _same(final.result, await api.search.Search(request))


async def test_search_stream_without_reranking_is_one_final_message(api, collection) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=QUERIES[1], top_k=2)
    messages = [m async for m in api.search.SearchStream(request)]
    assert len(messages) == 1 and messages[0].final and messages[0].stage == common_pb2.STAGE_RETRIEVE
    _same(messages[0].result, await api.search.Search(request))


async def test_a_budget_too_small_for_late_interaction_skips_it_and_says_so(api, collection) -> None:  # type: ignore[no-untyped-def]
    settings = common_pb2.SearchSettings()
    settings.CopyFrom(LATE)
    settings.latency_budget_ms = 1
    request = search_pb2.SearchRequest(collection=collection, query=QUERIES[0], top_k=3, settings=settings)
    messages = [m async for m in api.search.SearchStream(request)]
    final = messages[-1]
    assert final.final and final.deadline_reached
    retrieve, late = final.result.stages[:2]
    assert retrieve.plan.startswith("budget 1 ms") and "ms kept back" in retrieve.plan
    assert late.status == search_pb2.STAGE_STATUS_DEGRADED
    assert "skipped by the latency budget" in late.reason and late.plan
    # The order is the retrieval's.
    assert [h.id for h in final.result.hits] == [h.id for h in messages[0].result.hits]


async def test_a_stage_the_first_plan_skipped_runs_if_time_is_left_at_its_start(api, collection) -> None:  # type: ignore[no-untyped-def]
    from server.core.budget import BudgetPlanner
    from sieve_core.types import Stage

    cascade = api.server.engine.cascade
    saved, cascade.budget = cascade.budget, BudgetPlanner()  # this server's measured costs, put back below
    try:
        for n in (1, 50, 100) * 10:  # a retrieval believed to take a second: nothing fits the first plan
            cascade.budget.costs.observe(Stage.RETRIEVE, "", n, 1000.0)
        assert cascade.budget.costs.model(Stage.RETRIEVE).estimate(6) > 400
        settings = common_pb2.SearchSettings()
        settings.CopyFrom(LATE)
        settings.latency_budget_ms = 400
        request = search_pb2.SearchRequest(
            collection=collection, query=QUERIES[0], top_k=3, settings=settings
        )
        late = (await api.search.Search(request)).stages[1]
    finally:
        cascade.budget = saved
    # Retrieval really took milliseconds: late interaction, planned again at its start, ran in full.
    assert late.status == search_pb2.STAGE_STATUS_COMPLETED and not late.candidates_cut_from
    first, at_start = late.plan.split("; at start: ")
    assert "0 of 6 candidates fit" in first and "6 of 6 candidates fit" in at_start, late.plan


async def test_a_tier_brings_its_budget_and_depths(api, collection) -> None:  # type: ignore[no-untyped-def]
    settings = common_pb2.SearchSettings(
        late_interaction=common_pb2.STAGE_MODE_BEST_EFFORT, tier=common_pb2.SEARCH_TIER_BEST
    )
    request = search_pb2.SearchRequest(collection=collection, query=QUERIES[0], top_k=3, settings=settings)
    response = await api.search.Search(request)
    retrieve, late = response.stages[:2]
    assert retrieve.plan.startswith("budget 400 ms")
    assert late.status == search_pb2.STAGE_STATUS_COMPLETED and late.plan
    assert late.candidates_in == len(DOCS)  # the tier's 200 candidates, of 6 documents


async def test_bad_budget_and_tier_are_invalid_arguments(api, collection) -> None:  # type: ignore[no-untyped-def]
    import grpc

    for settings in (
        common_pb2.SearchSettings(latency_budget_ms=0),
        common_pb2.SearchSettings(tier=42),  # type: ignore[arg-type]
    ):
        request = search_pb2.SearchRequest(collection=collection, query="x", settings=settings)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await api.search.Search(request)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "latency_budget_ms" in raised.value.details() or "tier" in raised.value.details()


async def test_reports_say_whether_a_stage_changed_the_top_k(api, collection) -> None:  # type: ignore[no-untyped-def]
    request = search_pb2.SearchRequest(collection=collection, query=QUERIES[0], top_k=3, settings=LATE)
    messages = [m async for m in api.search.SearchStream(request)]
    before = [h.id for h in messages[0].result.hits]
    after = [h.id for h in messages[-1].result.hits]
    late = messages[-1].result.stages[1]
    assert late.top_k_changed == (before != after)
    assert late.top_k_new == len(set(after) - set(before))


async def test_top_k_counters_count_what_the_reports_say(api, collection) -> None:  # type: ignore[no-untyped-def]
    metrics = api.server.metrics

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(f"{name}_total", labels) or 0.0

    def counts() -> tuple[float, float, float]:
        stage = "late_interaction"
        return (
            value("sieve_stage_top_k", stage=stage, outcome="changed"),
            value("sieve_stage_top_k", stage=stage, outcome="unchanged"),
            value("sieve_stage_top_k_new", stage=stage),
        )

    before = counts()
    changed = new = 0
    for query in QUERIES:
        # All six documents: late interaction reorders some of retrieval's ranking for these queries.
        request = search_pb2.SearchRequest(collection=collection, query=query, top_k=6, settings=LATE)
        late = (await api.search.Search(request)).stages[1]
        changed += late.top_k_changed
        new += late.top_k_new
        # A streamed search counts once, by its final message.
        [m async for m in api.search.SearchStream(request)]
    after = counts()
    assert after[0] - before[0] == 2 * changed
    assert after[1] - before[1] == 2 * (len(QUERIES) - changed)
    assert after[2] - before[2] == 2 * new
    assert changed > 0


async def test_search_stream_errors_are_statuses(api, collection) -> None:  # type: ignore[no-untyped-def]
    import grpc

    cases = [
        (search_pb2.SearchRequest(collection=collection, query="x", top_k=100_000), "INVALID_ARGUMENT"),
        (search_pb2.SearchRequest(collection="no-such-collection", query="x"), "NOT_FOUND"),
        (
            search_pb2.SearchRequest(
                collection=collection,
                query="x",
                settings=common_pb2.SearchSettings(cross_encoder=common_pb2.STAGE_MODE_REQUIRED),
            ),
            "FAILED_PRECONDITION",
        ),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [m async for m in api.search.SearchStream(request)]
        assert raised.value.code().name == code, raised.value.details()
