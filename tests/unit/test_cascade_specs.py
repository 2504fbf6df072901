"""`sieve eval` cascade specs (sieve_cli/evaluate.py): the first stage, the re-ranking stages, their settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from sieve.v1 import common_pb2

from sieve_cli.evaluate import EvalOptions, cascade_settings, describe_cascade, first_stage, parse_cascade

OPTS = EvalOptions(folder=Path("."))


@pytest.mark.parametrize(
    ("spec", "first", "stages", "retrieval"),
    [
        ("retrieve", "retrieve", (), common_pb2.RETRIEVAL_DENSE),
        ("late", "retrieve", ("late",), common_pb2.RETRIEVAL_DENSE),
        ("late+cross", "retrieve", ("late", "cross"), common_pb2.RETRIEVAL_DENSE),
        ("lexical", "lexical", (), common_pb2.RETRIEVAL_LEXICAL),
        ("hybrid", "hybrid", (), common_pb2.RETRIEVAL_HYBRID),
        ("hybrid+late", "hybrid", ("late",), common_pb2.RETRIEVAL_HYBRID),
        ("hybrid+late+cross", "hybrid", ("late", "cross"), common_pb2.RETRIEVAL_HYBRID),
        ("lexical+cross", "lexical", ("cross",), common_pb2.RETRIEVAL_LEXICAL),
    ],
)
def test_specs_name_a_first_stage_and_re_rankers(spec, first, stages, retrieval) -> None:  # type: ignore[no-untyped-def]
    assert parse_cascade(spec) == stages
    assert first_stage(spec) == first
    settings = cascade_settings(spec, OPTS)
    assert settings.retrieval == retrieval
    assert settings.late_interaction == (
        common_pb2.STAGE_MODE_REQUIRED if "late" in stages else common_pb2.STAGE_MODE_OFF
    )
    if retrieval == common_pb2.RETRIEVAL_HYBRID:
        assert settings.fusion == common_pb2.FUSION_RRF and settings.rrf_k == 60
        assert describe_cascade(spec, OPTS).startswith("hybrid (rrf k=60) 100")
    else:
        assert not settings.HasField("rrf_k")


@pytest.mark.parametrize(
    "spec", ["late+hybrid", "hybrid+hybrid", "cross+late", "lexical+lexical", "bm25", ""]
)
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="bad cascade"):
        parse_cascade(spec)
