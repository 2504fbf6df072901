"""Fusing the dense and lexical candidate lists of a hybrid search into one list (pure functions, no I/O).

Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): score = sum over lists of 1 / (k + rank),
rank from 1; it needs no score calibration, which BM25 scores (unbounded, query-dependent) and cosines (in
[-1, 1]) do not share. Weighted fusion: each list's scores min-max normalised to [0, 1] over its own
candidates, then w * dense + (1 - w) * lexical, a candidate missing from a list counting 0 there; it lets a
caller lean on one side when it knows which one its queries need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sieve_core.types import FusionMethod


@dataclass(frozen=True)
class Ranked:
    """One retriever's candidates, best first."""

    keys: np.ndarray  # uint64
    scores: np.ndarray  # float64, higher is better


@dataclass(frozen=True)
class Fused:
    """A fused candidate with what each side said about it (None: not among that side's candidates)."""

    key: int
    score: float
    dense: float | None
    dense_rank: int | None  # 0-based
    lexical: float | None
    lexical_rank: int | None


def fuse(
    dense: Ranked,
    lexical: Ranked,
    count: int,
    method: FusionMethod,
    rrf_k: int = 60,
    dense_weight: float = 0.5,
) -> list[Fused]:
    """The best `count` of the union of both lists under `method`, best first (ties: dense rank, then key)."""
    d_rank = {int(k): i for i, k in enumerate(dense.keys.tolist())}
    l_rank = {int(k): i for i, k in enumerate(lexical.keys.tolist())}
    d_norm = _min_max(dense.scores)
    l_norm = _min_max(lexical.scores)
    out = []
    for key in dict.fromkeys([*d_rank, *l_rank]):
        dr, lr = d_rank.get(key), l_rank.get(key)
        if method == FusionMethod.WEIGHTED:
            score = dense_weight * (d_norm[dr] if dr is not None else 0.0) + (1.0 - dense_weight) * (
                l_norm[lr] if lr is not None else 0.0
            )
        else:
            score = (1.0 / (rrf_k + dr + 1) if dr is not None else 0.0) + (
                1.0 / (rrf_k + lr + 1) if lr is not None else 0.0
            )
        out.append(
            Fused(
                key,
                float(score),
                float(dense.scores[dr]) if dr is not None else None,
                dr,
                float(lexical.scores[lr]) if lr is not None else None,
                lr,
            )
        )
    big = len(d_rank) + len(l_rank) + 1
    out.sort(key=lambda f: (-f.score, f.dense_rank if f.dense_rank is not None else big, f.key))
    return out[: max(count, 0)]


def _min_max(scores: np.ndarray) -> list[float]:
    if len(scores) == 0:
        return []
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo <= 1e-12:  # one candidate, or all equal: each is as good as the best
        return [1.0] * len(scores)
    return ((scores - lo) / (hi - lo)).tolist()
