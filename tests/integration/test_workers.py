"""The distributed path: a real redis-server and a real Celery worker process (prefork, one child).

Eager mode is not a test of a worker: tasks here cross the broker as JSON, run in a forked pool
process that built its own ONNX session, and come back through the result backend.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from celery.result import AsyncResult

from sieve_core import late_interaction_service as service
from sieve_core.contracts import (
    Candidate,
    CrossEncoderRequest,
    DocumentTokensRequest,
    DocumentTokensResult,
    EmbedRequest,
    EmbedResult,
    QueryTokensRequest,
    QueryTokensResult,
    TokenFormatSpec,
    content_hash,
    content_hash_hex,
)
from sieve_core.errors import InvalidArgument
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.tasking import (
    MAX_WORKER_LOST_RETRIES,
    TASK_DOCUMENT_TOKENS,
    TASK_EMBED,
    TASK_QUERY_TOKENS,
    SieveCelery,
)
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, TokenFormat, compress, compress_many
from tests.conftest import MODEL, MODELS_DIR, Worker, require_bundle

DOCS = [
    "Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "Vitamin D deficiency is associated with an increased risk of bone fractures.",
    "Regular exercise improves insulin sensitivity in adults with type 2 diabetes.",
    "Smoking is a major risk factor for lung cancer and chronic obstructive pulmonary disease.",
]
QUERY = "does aspirin prevent heart attacks"
FORMAT = TokenFormatSpec.of(DEFAULT_TOKEN_FORMAT)


@pytest.fixture(scope="module")
def runner() -> BiEncoderRunner:
    require_bundle()
    return BiEncoderRunner(MODELS_DIR / MODEL, intra_op_threads=1)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _call(app: SieveCelery, name: str, payload: dict, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    return app.send_task(name, args=[payload]).get(timeout=timeout)  # type: ignore[no-any-return]


def _same_blob(a: bytes, b: bytes) -> None:
    """Two processes' ONNX runs differ in float noise: the same header and shape, codes within one step
    wherever the clustering agreed (pooling groups identically for these texts)."""
    from sieve_core.token_codec import decode_tokens, read_header

    assert read_header(a) == read_header(b)
    np.testing.assert_allclose(decode_tokens(a), decode_tokens(b), atol=2e-2)


def test_content_hash_matches_the_store() -> None:
    for text in ["", "abc", "naïve — ünïcode", DOCS[0]]:
        assert content_hash_hex(text) == content_hash(text).hex()


def test_contracts_round_trip_and_validate() -> None:
    request = CrossEncoderRequest(query="q", model=MODEL, candidates=[Candidate.of(d) for d in DOCS[:2]])
    assert CrossEncoderRequest.from_json(request.to_json()) == request
    bad = request.to_json()
    bad["candidates"][0]["content_hash"] = content_hash_hex("something else")
    with pytest.raises(ValueError, match="not the hash"):
        CrossEncoderRequest.from_json(bad)
    embed = EmbedRequest(texts=DOCS, model=MODEL, token_format=FORMAT)
    assert EmbedRequest.from_json(embed.to_json()) == embed
    assert EmbedRequest.from_json(embed.to_json()).token_format.format() == DEFAULT_TOKEN_FORMAT  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        EmbedRequest.from_json({"texts": ["x"], "model": "../etc"})
    with pytest.raises(ValueError):
        EmbedRequest.from_json({"texts": ["x"], "model": MODEL, "surprise": 1})
    with pytest.raises(ValueError):  # no pool factor 0
        EmbedRequest.from_json(
            {"texts": ["x"], "model": MODEL, "token_format": {"pool_factor": 0, "projection_dims": 0}}
        )
    # The query-path task carries the query only: no candidate texts, no token vectors.
    assert set(QueryTokensRequest(query=QUERY, model=MODEL).to_json()) == {"query", "model"}


class _CountingRunner:
    """The real runner, counting encoder runs (one `encode` call is one pass over the texts)."""

    def __init__(self, runner: BiEncoderRunner) -> None:
        self._runner = runner
        self.model_id = runner.model_id
        self.manifest = runner.manifest
        self.passes = 0

    def encode(self, texts, batch_size=32, *, tokens=False):  # type: ignore[no-untyped-def]
        self.passes += 1
        return self._runner.encode(texts, batch_size, tokens=tokens)

    def query_token_vectors(self, texts, batch_size=32):  # type: ignore[no-untyped-def]
        self.passes += 1
        return self._runner.query_token_vectors(texts, batch_size)

    def document_token_vectors(self, texts, batch_size=32):  # type: ignore[no-untyped-def]
        self.passes += 1
        return self._runner.document_token_vectors(texts, batch_size)

    def document_token_offsets(self, texts):  # type: ignore[no-untyped-def]
        return self._runner.document_token_offsets(texts)  # tokenization only: no encoder pass


def test_embed_makes_vectors_and_token_blobs_in_one_encoder_pass(runner: BiEncoderRunner) -> None:
    counting = _CountingRunner(runner)
    fmt = TokenFormat(pool_factor=2)
    request = EmbedRequest(texts=DOCS, model=MODEL, token_format=TokenFormatSpec.of(fmt))
    result = service.embed(counting, request)  # type: ignore[arg-type]
    assert counting.passes == 1
    assert result.token_model_id == runner.model_id
    vectors, rows = runner.encode(DOCS, tokens=True)
    np.testing.assert_array_equal(result.vectors(), vectors)
    assert result.token_blobs() == compress_many(rows, fmt, runner.token_offsets(DOCS))  # type: ignore[arg-type]
    # Without a format: one pass, no token vectors.
    counting.passes = 0
    plain = service.embed(counting, EmbedRequest(texts=DOCS, model=MODEL))  # type: ignore[arg-type]
    assert counting.passes == 1 and plain.token_blobs() == [] and plain.token_model_id == ""


def test_embed_task_returns_vectors_and_token_blobs(
    worker: Worker, client_app: SieveCelery, runner: BiEncoderRunner
) -> None:
    request = EmbedRequest(texts=DOCS, model=MODEL, token_format=FORMAT)
    result = EmbedResult.from_json(_call(client_app, TASK_EMBED, request.to_json()))
    assert result.model_id == runner.model_id and "@" in result.model_id
    vectors = result.vectors()
    assert vectors.shape == (len(DOCS), runner.dims)
    assert _cosine_rows(vectors, runner.embed(DOCS)).min() >= 0.9999
    blobs = result.token_blobs()
    for text, blob in zip(DOCS, blobs, strict=True):
        _same_blob(
            blob,
            compress(runner.token_vectors([text])[0], DEFAULT_TOKEN_FORMAT, runner.token_offsets([text])[0]),
        )
    # A bad payload comes back as the core's InvalidArgument, rebuilt from JSON on the caller's side.
    with pytest.raises(InvalidArgument, match="EmbedRequest"):
        _call(client_app, TASK_EMBED, {"texts": [], "model": MODEL})


def test_document_and_query_token_tasks(
    worker: Worker, client_app: SieveCelery, runner: BiEncoderRunner
) -> None:
    request = DocumentTokensRequest(texts=DOCS, model=MODEL, token_format=FORMAT)
    result = DocumentTokensResult.from_json(_call(client_app, TASK_DOCUMENT_TOKENS, request.to_json()))
    assert result.model_id == runner.model_id
    for text, blob in zip(DOCS, result.token_blobs(), strict=True):
        _same_blob(
            blob,
            compress(runner.token_vectors([text])[0], DEFAULT_TOKEN_FORMAT, runner.token_offsets([text])[0]),
        )
    query = QueryTokensResult.from_json(
        _call(client_app, TASK_QUERY_TOKENS, QueryTokensRequest(query=QUERY, model=MODEL).to_json())
    )
    np.testing.assert_allclose(query.rows(), runner.query_token_vectors([QUERY])[0], atol=1e-4)
    # A bundle without token vectors is refused by name.
    with pytest.raises(InvalidArgument, match="bundle name"):
        _call(client_app, TASK_QUERY_TOKENS, {"query": "q", "model": "../x"})


def _slow_embed(app: SieveCelery) -> tuple[AsyncResult, list[str]]:
    # A real, naturally slow job (no test-only sleep): 300 long texts take seconds to embed on 2 cores.
    base = " ".join(DOCS)
    texts = [f"{i}: {base}" for i in range(300)]
    return app.send_task(TASK_EMBED, args=[EmbedRequest(texts=texts, model=MODEL).to_json()]), texts


def _kill_when_running(result: AsyncResult, worker: Worker, spare: set[int]) -> int:
    """Waits until a pool process not in `spare` runs the task (task_track_started stores its pid with
    the STARTED state), then SIGKILLs that process and returns its pid."""
    deadline = time.monotonic() + 30
    while True:
        state, info = result.state, result.info
        if state == "STARTED" and info["pid"] not in spare:
            victim = int(info["pid"])
            assert victim != worker.proc.pid
            os.kill(victim, signal.SIGKILL)
            return victim
        assert state in ("PENDING", "STARTED", "RETRY") and time.monotonic() < deadline, (
            state,
            worker.tail(),
        )
        time.sleep(0.02)


def test_task_redelivered_after_its_pool_process_is_killed(
    worker: Worker, client_app: SieveCelery, runner: BiEncoderRunner
) -> None:
    async_result, texts = _slow_embed(client_app)
    _kill_when_running(async_result, worker, set())
    # The parent sees its pool process die (WorkerLostError) and sends the task again (acks_late +
    # retry/reject_on_worker_lost); a new pool process loads its model and runs it to the end.
    result = EmbedResult.from_json(async_result.get(timeout=60))
    assert result.vectors().shape == (len(texts), runner.dims)
    np.testing.assert_allclose(result.vectors()[:1], runner.embed(texts[:1]), atol=1e-5)
    log = worker.log.read_text(errors="replace")
    assert "WorkerLostError" in log, worker.tail()
    # Received twice: the kill really came mid-task (a task that had already stored its result would
    # be acknowledged, not run again).
    assert log.count(f"{TASK_EMBED}[{async_result.id}] received") == 2, worker.tail()
    assert worker.proc.poll() is None


def test_a_task_that_keeps_killing_its_process_fails_after_bounded_retries(
    worker: Worker, client_app: SieveCelery
) -> None:
    async_result, _ = _slow_embed(client_app)
    killed: set[int] = set()
    for _ in range(MAX_WORKER_LOST_RETRIES + 1):
        killed.add(_kill_when_running(async_result, worker, killed))
    with pytest.raises(Exception, match="exited prematurely"):
        async_result.get(timeout=30)
    assert async_result.state == "FAILURE"
    log = worker.log.read_text(errors="replace")
    assert log.count(f"{TASK_EMBED}[{async_result.id}] received") == MAX_WORKER_LOST_RETRIES + 1
    # The worker itself survived and still serves.
    assert EmbedResult.from_json(
        _call(client_app, TASK_EMBED, EmbedRequest(texts=["ok"], model=MODEL).to_json())
    )
