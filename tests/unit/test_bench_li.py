"""Smoke tests of issue 13's benchmark code (no service, no model, no measurement): the formats offered,
the verdict and target logic that prints MISSED, and the scale test's synthetic token blobs."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sieve_core.token_codec import decode_tokens, read_header
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, check_blob

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = ("token_formats", "late_interaction_service", "late_interaction_scale")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ModuleType]]:
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import each other by module name
    yield {name: importlib.import_module(name) for name in SCRIPTS}
    for name in (*SCRIPTS, "run", "late_interaction_reference"):
        sys.modules.pop(name, None)


def test_every_pool_and_projection_combination_is_measured(bench: dict[str, ModuleType]) -> None:
    formats = bench["token_formats"].FORMATS
    assert {(f.pool_factor, f.projection_dims) for f in formats} == {
        (p, d) for p in (1, 2, 3, 4) for d in (0, 128)
    }
    assert DEFAULT_TOKEN_FORMAT in formats


def test_verdict_names_the_formats_meeting_the_bar(bench: dict[str, ModuleType]) -> None:
    tf = bench["token_formats"]

    def row(fmt: str, ndcg: float, size: float) -> dict[str, object]:
        return {
            "format": fmt,
            "token_format": {},
            "ndcg@10": ndcg,
            "bytes_per_document": size,
            "meets_bar": ndcg >= tf.NDCG_BAR and size <= tf.BYTES_BAR,
        }

    rows = [
        row("int8", 0.709, 92_000),
        row("int4, pool 2", 0.704, 23_000),
        row("int8, pool 3", 0.707, 25_000),
    ]
    verdict = tf._verdict(rows)
    assert verdict["default"] == "int4, pool 2" and verdict["default_meets_bar"] is False
    assert verdict["meeting_bar"] == ["int8, pool 3"]
    assert verdict["best_ndcg_meeting_bar"] == verdict["smallest_meeting_bar"] == "int8, pool 3"


def test_targets_are_judged_in_their_direction_and_nan_is_missed(bench: dict[str, ModuleType]) -> None:
    judge = bench["late_interaction_service"].judge
    targets = judge(
        {
            "li_stage_p50_over_retrieve_stage_p50": 1.5,  # <= 1.5: met at the bound
            "searches_per_s_late_over_retrieve": 0.49,  # >= 0.5: missed
            "concurrency_throughput_late_over_retrieve": float("nan"),
            "indexing_docs_per_s_late_over_plain": 0.95,
            "first_after_flush_over_warm": 2.5,  # <= 2: missed
        }
    )
    assert {k: v["met"] for k, v in targets.items()} == {
        "li_stage_p50_over_retrieve_stage_p50": True,
        "searches_per_s_late_over_retrieve": False,
        "concurrency_throughput_late_over_retrieve": False,
        "indexing_docs_per_s_late_over_plain": True,
        "first_after_flush_over_warm": False,
    }


def test_synthetic_blobs_are_default_format_blobs_of_unit_rows(bench: dict[str, ModuleType]) -> None:
    scale = bench["late_interaction_scale"]
    rng = np.random.default_rng(0)
    synthetic = scale.SyntheticBlobs(rng)
    for n in (1, 60, 64):
        blob = synthetic.blob(n)
        info = check_blob(blob, DEFAULT_TOKEN_FORMAT, scale.DIMS)
        assert info.n_tokens == n and info.unit_norm
        np.testing.assert_allclose(np.linalg.norm(decode_tokens(blob), axis=1), 1.0, atol=1e-5)
    assert read_header(synthetic.blob(5)).pool_factor == DEFAULT_TOKEN_FORMAT.pool_factor
    counts = np.array([1, 4, 5, 238, 254])
    rows = scale.pooled_rows(counts, rng, 1000)
    assert set(rows.tolist()) <= {math.ceil(c / DEFAULT_TOKEN_FORMAT.pool_factor) for c in counts}
