"""The logic behind the `cross_encoder` worker task, callable in-process too (benchmarks, tests).

Pair scores are cached under `pair_score_key(model cache id, query, content hash)`: a repeated query
re-scores only the candidates whose text it has not seen, and a changed document has a new content hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sieve_core.cache import ResultCache, pair_score_key
from sieve_core.contracts import CrossEncoderRequest, CrossEncoderResult
from sieve_core.models.bundle import BundleManifest


class PairRunner(Protocol):
    model_id: str
    manifest: BundleManifest

    def score(self, query: str, documents: Sequence[str], batch_size: int = 16) -> np.ndarray: ...


def cross_encoder(
    runner: PairRunner, cache: ResultCache | None, request: CrossEncoderRequest, *, batch_size: int = 16
) -> CrossEncoderResult:
    keys = [
        pair_score_key(runner.manifest.cache_id, request.query, c.content_hash) for c in request.candidates
    ]
    cached = cache.get_many(keys) if cache is not None else [None] * len(keys)
    scores: dict[str, float] = {}
    for key, raw in zip(keys, cached, strict=True):
        if raw is not None and len(raw) == 8:
            scores[key] = float(np.frombuffer(raw, dtype="<f8")[0])
    todo: dict[str, str] = {}  # key -> text, each distinct text scored once
    for key, candidate in zip(keys, request.candidates, strict=True):
        if key not in scores:
            todo.setdefault(key, candidate.text)
    if todo:
        fresh = runner.score(request.query, list(todo.values()), batch_size)
        computed = {key: float(s) for key, s in zip(todo, fresh.tolist(), strict=True)}
        scores.update(computed)
        if cache is not None:
            cache.put_many({k: np.float64(v).astype("<f8").tobytes() for k, v in computed.items()})
    return CrossEncoderResult(
        model_id=runner.model_id,
        scores=[scores[k] for k in keys],
        cache_hits=sum(1 for key in keys if key not in todo),
        computed=len(todo),
    )
