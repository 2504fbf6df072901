"""The lexical side of the first stage and its fusion with the dense side (hybrid retrieval).

Lexical: BM25 over the collection's full-text index (server/storage/fulltext.py), the filter applied as the
set of keys the store says match. Hybrid: the dense and lexical lists, each of `retrieve_candidates`, fused
(server/core/fusion.py) into one list of that many, which is what late interaction and the cross-encoder
re-rank. Each side reports its own stage (RETRIEVE for dense, LEXICAL, then FUSION), and every hit carries
the scores it has: dense and lexical where it was among that side's candidates, and the fused score.
"""

from __future__ import annotations

import time

import numpy as np

from server.core.fusion import Fused, Ranked, fuse
from server.storage.fulltext import FullTextIndex
from server.storage.store import Store
from sieve_core.types import (
    Condition,
    FusionMethod,
    SearchSettings,
    Stage,
    StageReport,
    StageScore,
    StageStatus,
)


def lexical(
    store: Store,
    collection_id: int,
    fulltext: FullTextIndex,
    text: str,
    filt: tuple[Condition, ...],
    count: int,
) -> tuple[Ranked, StageReport]:
    """BM25 top `count` (blocking: run it in the read executor)."""
    started = time.perf_counter()
    allowed = store.filter_keys(collection_id, filt) if filt else None
    keys, scores = fulltext.search(text, count, allowed)
    report = StageReport(
        Stage.LEXICAL,
        StageStatus.COMPLETED,
        candidates_in=len(fulltext) if allowed is None else len(allowed),
        candidates_out=len(keys),
        took_ms=(time.perf_counter() - started) * 1000,
        model_id=f"BM25 ({fulltext.language} analysis)",
        method="tantivy" + ("+filter" if allowed is not None else ""),
    )
    return Ranked(keys, scores), report


def fused(
    dense: Ranked, lex: Ranked, count: int, settings: SearchSettings
) -> tuple[list[Fused], StageReport]:
    """The fused list of `count` and its stage report."""
    started = time.perf_counter()
    method = settings.fusion if settings.fusion != FusionMethod.UNSPECIFIED else FusionMethod.RRF
    rrf_k = settings.rrf_k or 60
    weight = 0.5 if settings.dense_weight is None else settings.dense_weight
    out = fuse(dense, lex, count, method, rrf_k=rrf_k, dense_weight=weight)
    described = f"rrf k={rrf_k}" if method == FusionMethod.RRF else f"weighted dense={weight:g}"
    report = StageReport(
        Stage.FUSION,
        StageStatus.COMPLETED,
        candidates_in=len(dense.keys) + len(lex.keys),
        candidates_out=len(out),
        took_ms=(time.perf_counter() - started) * 1000,
        method=described,
    )
    return out, report


def fused_keys(items: list[Fused]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.asarray([f.key for f in items], dtype=np.uint64),
        np.asarray([f.score for f in items], dtype=np.float64),
    )


def fused_stage_scores(item: Fused, rank: int) -> list[StageScore]:
    """What each side said about a fused hit, then the fused score (its rank in the fused list)."""
    out = []
    if item.dense is not None and item.dense_rank is not None:
        out.append(StageScore(Stage.RETRIEVE, item.dense, item.dense_rank))
    if item.lexical is not None and item.lexical_rank is not None:
        out.append(StageScore(Stage.LEXICAL, item.lexical, item.lexical_rank))
    out.append(StageScore(Stage.FUSION, item.score, rank))
    return out
