"""Unit tests of hybrid fusion (server/core/fusion.py): reciprocal rank fusion and weighted fusion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.core.fusion import Ranked, fuse
from sieve_core.types import FusionMethod


def _ranked(keys: list[int], scores: list[float]) -> Ranked:
    return Ranked(np.asarray(keys, dtype=np.uint64), np.asarray(scores, dtype=np.float64))


def test_rrf_sums_reciprocal_ranks_and_keeps_each_sides_scores() -> None:
    dense = _ranked([1, 2, 3], [0.9, 0.8, 0.7])
    lexical = _ranked([3, 4, 1], [12.0, 9.0, 3.0])
    out = fuse(dense, lexical, 10, FusionMethod.RRF, rrf_k=60)
    by_key = {f.key: f for f in out}
    assert by_key[1].score == pytest.approx(1 / 61 + 1 / 63)
    assert by_key[3].score == pytest.approx(1 / 63 + 1 / 61)
    assert by_key[2].score == pytest.approx(1 / 62)
    assert by_key[4].score == pytest.approx(1 / 62)
    # 1 and 3 tie on the fused score: the dense rank breaks it; 2 and 4 likewise.
    assert [f.key for f in out] == [1, 3, 2, 4]
    assert (by_key[1].dense, by_key[1].dense_rank, by_key[1].lexical, by_key[1].lexical_rank) == (
        0.9,
        0,
        3.0,
        2,
    )
    assert by_key[2].lexical is None and by_key[2].lexical_rank is None
    assert by_key[4].dense is None and by_key[4].lexical == 9.0


def test_rrf_k_decides_how_much_the_top_ranks_dominate() -> None:
    dense = _ranked([1, 2, 3, 4], [4, 3, 2, 1])
    lexical = _ranked([5, 6, 7, 4], [4, 3, 2, 1])
    # 1 is first in one list, 4 fourth in both: 1/(k+1) against 2/(k+4); the first wins when k < 2.
    assert fuse(dense, lexical, 1, FusionMethod.RRF, rrf_k=1)[0].key == 1
    assert fuse(dense, lexical, 1, FusionMethod.RRF, rrf_k=60)[0].key == 4


def test_weighted_fusion_normalises_each_side_and_weights_them() -> None:
    dense = _ranked([1, 2], [0.9, 0.5])  # normalised 1, 0
    lexical = _ranked([2, 3], [20.0, 10.0])  # normalised 1, 0
    only_dense = fuse(dense, lexical, 3, FusionMethod.WEIGHTED, dense_weight=1.0)
    assert [f.key for f in only_dense][0] == 1 and only_dense[0].score == pytest.approx(1.0)
    only_lexical = fuse(dense, lexical, 3, FusionMethod.WEIGHTED, dense_weight=0.0)
    assert only_lexical[0].key == 2 and only_lexical[0].score == pytest.approx(1.0)
    half = {f.key: f.score for f in fuse(dense, lexical, 3, FusionMethod.WEIGHTED, dense_weight=0.5)}
    assert half == pytest.approx({1: 0.5, 2: 0.5, 3: 0.0})


def test_one_side_empty_gives_the_other_side_in_its_order() -> None:
    dense = _ranked([7, 8, 9], [0.3, 0.2, 0.1])
    empty = _ranked([], [])
    for method in FusionMethod.RRF, FusionMethod.WEIGHTED:
        assert [f.key for f in fuse(dense, empty, 10, method)] == [7, 8, 9]
        assert [f.key for f in fuse(empty, dense, 2, method)] == [7, 8]
    assert fuse(empty, empty, 10, FusionMethod.RRF) == []


@given(
    d=st.lists(st.integers(0, 50), unique=True, max_size=30),
    lx=st.lists(st.integers(0, 50), unique=True, max_size=30),
    count=st.integers(0, 80),
    weighted=st.booleans(),
)
def test_fused_list_is_the_best_of_the_union_without_duplicates(d, lx, count, weighted) -> None:  # type: ignore[no-untyped-def]
    dense = _ranked(d, sorted(np.linspace(0, 1, len(d)).tolist(), reverse=True))
    lexical = _ranked(lx, list(range(len(lx), 0, -1)))
    method = FusionMethod.WEIGHTED if weighted else FusionMethod.RRF
    out = fuse(dense, lexical, count, method)
    keys = [f.key for f in out]
    assert len(keys) == len(set(keys)) == min(count, len(set(d) | set(lx)))
    assert set(keys) <= set(d) | set(lx)
    assert all(a.score >= b.score for a, b in zip(out, out[1:], strict=False))
