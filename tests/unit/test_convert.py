"""The Search reply as a protobuf message (server/transport/convert.py): every hit, stage score and evidence
span of the core's result, in order, whatever way the message is built."""

from __future__ import annotations

from sieve.v1 import search_pb2

from server.transport.convert import search_result_to_pb, search_update_to_pb
from sieve_core.types import (
    Hit,
    SearchResult,
    SearchUpdate,
    Span,
    Stage,
    StageReport,
    StageScore,
    StageStatus,
)


def _result() -> SearchResult:
    hits = [
        Hit(
            f"doc-{i}",
            1.0 / (i + 1),
            text=f"text {i}" if i % 2 else "",
            metadata={"lang": "en", "n": str(i)} if i % 3 else {},
            stage_scores=[
                StageScore(Stage.RETRIEVE, 0.5 + i / 100, i),
                StageScore(Stage.LATE_INTERACTION, 20.0 - i, 7 - i),
            ][: 1 + i % 2],
            evidence=[Span(3 * j + i, 3 * j + i + 2, 0.25 * j) for j in range(i % 4)],
        )
        for i in range(7)
    ]
    stages = [
        StageReport(Stage.RETRIEVE, StageStatus.COMPLETED, candidates_in=100, candidates_out=7, took_ms=8.5),
        StageReport(Stage.LATE_INTERACTION, StageStatus.DEGRADED, reason="why", took_ms=1.25),
    ]
    return SearchResult(hits, stages, generation=42, took_ms=12.5)


def test_a_reply_message_holds_every_hit_score_and_span_in_order() -> None:
    result = _result()
    message = search_result_to_pb(result)
    assert [h.id for h in message.hits] == [h.id for h in result.hits]
    for sent, hit in zip(message.hits, result.hits, strict=True):
        assert (sent.score, sent.text, dict(sent.metadata)) == (hit.score, hit.text, hit.metadata)
        assert [(s.stage, s.score, s.rank) for s in sent.stage_scores] == [
            (int(s.stage), s.score, s.rank) for s in hit.stage_scores
        ]
        assert [(e.start, e.end, e.score) for e in sent.evidence] == [
            (e.start, e.end, e.score) for e in hit.evidence
        ]
    assert [(r.stage, r.status, r.reason, r.took_ms) for r in message.stages] == [
        (int(r.stage), int(r.status), r.reason, r.took_ms) for r in result.stages
    ]
    assert (message.generation, message.took_ms) == (42, 12.5)
    # What a client reads back off the wire is the same message.
    assert search_pb2.SearchResponse.FromString(message.SerializeToString()) == message
    assert sum(len(h.evidence) for h in message.hits) == sum(len(h.evidence) for h in result.hits) > 0


def test_a_stream_message_carries_the_same_reply() -> None:
    result = _result()
    update = search_update_to_pb(SearchUpdate(result, Stage.LATE_INTERACTION, final=True))
    assert update.result == search_result_to_pb(result)
    assert update.final and update.stage == int(Stage.LATE_INTERACTION)
