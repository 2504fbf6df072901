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
import redis
from celery.result import AsyncResult

from server.storage.store import content_hash
from sieve_core.contracts import (
    Candidate,
    EmbedRequest,
    EmbedResult,
    LateInteractionRequest,
    LateInteractionResult,
    content_hash_hex,
)
from sieve_core.errors import InvalidArgument
from sieve_core.late_interaction import maxsim_blobs, token_cache_key
from sieve_core.late_interaction_service import TokenCache, late_interaction
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.tasking import (
    MAX_WORKER_LOST_RETRIES,
    TASK_EMBED,
    TASK_LATE_INTERACTION,
    SieveCelery,
)
from tests.conftest import MODEL, MODELS_DIR, Worker, require_bundle

DOCS = [
    "Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "Vitamin D deficiency is associated with an increased risk of bone fractures.",
    "Regular exercise improves insulin sensitivity in adults with type 2 diabetes.",
    "Smoking is a major risk factor for lung cancer and chronic obstructive pulmonary disease.",
]
QUERY = "does aspirin prevent heart attacks"


@pytest.fixture(scope="module")
def runner() -> BiEncoderRunner:
    require_bundle()
    return BiEncoderRunner(MODELS_DIR / MODEL, intra_op_threads=1)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _call(app: SieveCelery, name: str, payload: dict, timeout: float = 30) -> dict:  # type: ignore[type-arg]
    return app.send_task(name, args=[payload]).get(timeout=timeout)  # type: ignore[no-any-return]


def test_content_hash_matches_the_store() -> None:
    for text in ["", "abc", "naïve — ünïcode", DOCS[0]]:
        assert content_hash_hex(text) == content_hash(text).hex()


def test_contracts_round_trip_and_validate() -> None:
    request = LateInteractionRequest(query="q", model=MODEL, candidates=[Candidate.of(d) for d in DOCS[:2]])
    assert LateInteractionRequest.from_json(request.to_json()) == request
    bad = request.to_json()
    bad["candidates"][0]["content_hash"] = content_hash_hex("something else")
    with pytest.raises(ValueError, match="not the hash"):
        LateInteractionRequest.from_json(bad)
    with pytest.raises(ValueError):
        EmbedRequest.from_json({"texts": ["x"], "model": "../etc"})
    with pytest.raises(ValueError):
        EmbedRequest.from_json({"texts": ["x"], "model": MODEL, "surprise": 1})


def test_embed_task_matches_in_process_runner_and_writes_token_blobs(
    worker: Worker, client_app: SieveCelery, runner: BiEncoderRunner, redis_url: str
) -> None:
    request = EmbedRequest(texts=DOCS, model=MODEL, want_tokens=True)
    result = EmbedResult.from_json(_call(client_app, TASK_EMBED, request.to_json()))
    assert result.model_id == runner.model_id and "@" in result.model_id
    vectors = result.vectors()
    assert vectors.shape == (len(DOCS), runner.dims)
    assert _cosine_rows(vectors, runner.embed(DOCS)).min() >= 0.9999
    assert result.tokens_computed == len(DOCS)
    client = redis.Redis.from_url(redis_url)
    revision = runner.manifest.revision
    for text, key in zip(DOCS, result.token_keys, strict=True):
        assert revision in key and content_hash_hex(text) in key
        assert key == token_cache_key(runner.manifest.cache_id, content_hash_hex(text), "int8")
        assert client.exists(key) and client.ttl(key) > 0
    # A bad payload comes back as the core's InvalidArgument, rebuilt from JSON on the caller's side.
    with pytest.raises(InvalidArgument, match="EmbedRequest"):
        _call(client_app, TASK_EMBED, {"texts": [], "model": MODEL})
    # Cached blobs are not encoded again.
    again = EmbedResult.from_json(_call(client_app, TASK_EMBED, request.to_json()))
    assert again.tokens_computed == 0 and again.token_keys == result.token_keys


def test_late_interaction_warm_then_one_miss(
    worker: Worker, client_app: SieveCelery, runner: BiEncoderRunner, redis_url: str
) -> None:
    _call(client_app, TASK_EMBED, EmbedRequest(texts=DOCS, model=MODEL, want_tokens=True).to_json())
    client = redis.Redis.from_url(redis_url)
    keys = [token_cache_key(runner.manifest.cache_id, content_hash_hex(d), "int8") for d in DOCS]
    blobs = client.mget(keys)
    expected = maxsim_blobs(runner.token_vectors([QUERY])[0], blobs)  # type: ignore[arg-type]
    request = LateInteractionRequest(query=QUERY, model=MODEL, candidates=[Candidate.of(d) for d in DOCS])

    warm = LateInteractionResult.from_json(_call(client_app, TASK_LATE_INTERACTION, request.to_json()))
    assert (warm.cache_hits, warm.recomputed) == (len(DOCS), 0)
    assert warm.bytes_read == sum(len(b) for b in blobs)  # type: ignore[arg-type]
    np.testing.assert_allclose(warm.scores, expected, rtol=1e-5, atol=1e-5)
    assert int(np.argmax(warm.scores)) == 0  # the aspirin document

    client.delete(keys[2])
    cold = LateInteractionResult.from_json(_call(client_app, TASK_LATE_INTERACTION, request.to_json()))
    assert (cold.cache_hits, cold.recomputed) == (len(DOCS) - 1, 1)
    # Recomputed in another process: the same int8 blob up to ONNX float noise, so the same score
    # within int8 quantisation error (a fraction of 1e-3 per query token).
    np.testing.assert_allclose(cold.scores, expected, atol=5e-3)
    assert client.exists(keys[2]), "the recomputed blob was not written back"


def test_service_treats_a_corrupt_blob_as_a_miss(runner: BiEncoderRunner, redis_url: str) -> None:
    cache = TokenCache(redis.Redis.from_url(redis_url), ttl_s=60)
    docs = [d + " (service test)" for d in DOCS[:3]]
    request = LateInteractionRequest(query=QUERY, model=MODEL, candidates=[Candidate.of(d) for d in docs])
    first = late_interaction(runner, cache, request)
    assert (first.cache_hits, first.recomputed) == (0, 3)
    key = token_cache_key(runner.manifest.cache_id, content_hash_hex(docs[1]), "int8")
    cache.client.set(key, b"SVTK garbage")
    second = late_interaction(runner, cache, request)
    assert (second.cache_hits, second.recomputed) == (2, 1)
    assert second.scores == first.scores


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
