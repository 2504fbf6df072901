"""The logic behind the `embed` and `late_interaction` worker tasks, callable in-process too.

Takes a runner and a Redis client, never a Celery object, so the server can run the same code in its
own executor and tests can drive it with a fake runner.

Token cache policy. Blobs live under `token_cache_key(runner.manifest.cache_id, content_hash, fmt)`, so
the key names the model revision and its serving settings (max length...), the codec and the exact text; a key never goes stale, only unused. Each blob is
written with a TTL (`DEFAULT_TOKEN_TTL_S`, a week) so that blobs of deleted or replaced documents go
away on their own, and Redis should run with `maxmemory-policy volatile-lru`: under memory pressure it
then evicts the least recently read *cache* entries (they have a TTL) and never the Celery broker's
queues (they have none), which `allkeys-lru` could. An evicted or expired blob is recomputed from the
text by the next re-rank that needs it and written back; the result says how many that was.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import redis

from sieve_core.contracts import (
    EmbedRequest,
    EmbedResult,
    LateInteractionRequest,
    LateInteractionResult,
    content_hash_hex,
)
from sieve_core.late_interaction import encode_tokens, maxsim_blobs, read_header, token_cache_key
from sieve_core.models.bundle import BundleManifest

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL_S = 7 * 24 * 3600
# Keys per MGET: ~100 SciFact-sized int8 blobs are ~9 MB; 32 per round trip keeps each reply to a few
# MB (Redis buffers a whole reply) while a re-rank of 100 candidates still takes only 4 round trips.
MGET_BATCH = 32


class TokenRunner(Protocol):
    """What late interaction needs from a model: BiEncoderRunner (zero-shot) and ColbertRunner have it."""

    model_id: str
    manifest: BundleManifest

    def query_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]: ...

    def document_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]: ...


class EmbedRunner(TokenRunner, Protocol):
    """A bi-encoder: sentence vectors, and token vectors from the same encoder run."""

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]: ...


class TokenCache:
    """Token blobs in Redis: batched MGET, pipelined SET with a TTL. Redis errors degrade to misses."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = DEFAULT_TOKEN_TTL_S, batch: int = MGET_BATCH):
        if ttl_s < 1 or batch < 1:
            raise ValueError("ttl_s and batch must be >= 1")
        self.client = client
        self.ttl_s = ttl_s
        self.batch = batch

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        try:
            for start in range(0, len(keys), self.batch):
                out.extend(self.client.mget(keys[start : start + self.batch]))  # type: ignore[arg-type]
        except redis.RedisError as exc:
            log.warning("token cache read failed, recomputing %d documents: %s", len(keys), exc)
            return [None] * len(keys)
        return out

    def missing(self, keys: Sequence[str]) -> list[bool]:
        """Per key, whether it is absent (one pipelined EXISTS each, no blob bytes moved)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return [not found for found in pipe.execute()]
        except redis.RedisError as exc:
            log.warning("token cache lookup failed: %s", exc)
            return [True] * len(keys)

    def put_many(self, items: dict[str, bytes]) -> bool:
        if not items:
            return True
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, blob in items.items():
                    pipe.set(key, blob, ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("token cache write of %d blobs failed: %s", len(items), exc)
            return False
        return True


def _usable(blob: bytes | None, fmt: str, dims: int | None) -> bool:
    """A cached value is used only if it is a well-formed blob of the requested format (and width)."""
    if blob is None:
        return False
    try:
        info = read_header(blob)
    except ValueError as exc:
        log.warning("discarding an unreadable token blob: %s", exc)
        return False
    return info.fmt == fmt and (dims is None or info.dims == dims)


def token_key(runner: TokenRunner, content_hash: str, fmt: str) -> str:
    return token_cache_key(runner.manifest.cache_id, content_hash, fmt)


def embed(
    runner: EmbedRunner,
    cache: TokenCache | None,
    request: EmbedRequest,
    *,
    token_runner: TokenRunner | None = None,
    batch_size: int = 32,
) -> EmbedResult:
    """Vectors for the texts; with want_tokens, their document token blobs cached (only where missing).

    The token vectors come from `token_runner` (a ColBERT bundle) when given, else from the bi-encoder's
    own encoder run, which then yields sentence and token vectors in one pass.
    """
    tokens_by = token_runner or runner
    keys: list[str] = []
    todo: dict[str, int] = {}  # cache key -> position of the first text with that key
    if request.want_tokens:
        if cache is None:
            raise ValueError("want_tokens needs a token cache")
        keys = [token_key(tokens_by, content_hash_hex(t), request.token_format) for t in request.texts]
        # The same text twice in one batch (or already cached) is stored once.
        for i, (key, absent) in enumerate(zip(keys, cache.missing(keys), strict=True)):
            if absent:
                todo.setdefault(key, i)
    same_pass = tokens_by is runner and bool(todo)
    vectors, rows = runner.encode(request.texts, batch_size, tokens=same_pass)
    if todo and not same_pass:
        fresh = tokens_by.document_token_vectors([request.texts[i] for i in todo.values()], batch_size)
        rows = [np.empty(0)] * len(request.texts)
        for i, matrix in zip(todo.values(), fresh, strict=True):
            rows[i] = matrix
    computed = 0
    if todo and cache is not None and rows is not None:
        blobs = {key: encode_tokens(rows[i], request.token_format) for key, i in todo.items()}
        cache.put_many(blobs)
        computed = len(blobs)
    return EmbedResult.build(runner.model_id, vectors, keys, computed)


def late_interaction(
    runner: TokenRunner, cache: TokenCache, request: LateInteractionRequest, *, batch_size: int = 32
) -> LateInteractionResult:
    """One query encoding, cached document blobs (misses recomputed and written back), then MaxSim."""
    query = runner.query_token_vectors([request.query])[0]
    fmt = request.token_format
    keys = [token_key(runner, c.content_hash, fmt) for c in request.candidates]
    blobs = cache.get_many(keys)
    bytes_read = sum(len(b) for b in blobs if b is not None)
    dims = int(query.shape[1])
    miss_texts: dict[str, str] = {}
    for key, blob, candidate in zip(keys, blobs, request.candidates, strict=True):
        if not _usable(blob, fmt, dims):
            miss_texts[key] = candidate.text
    fresh: dict[str, bytes] = {}
    if miss_texts:
        matrices = runner.document_token_vectors(list(miss_texts.values()), batch_size)
        # Scored from the encoded blob, not the float32 rows, so a cold and a warm re-rank agree exactly.
        fresh = {key: encode_tokens(m, fmt) for key, m in zip(miss_texts, matrices, strict=True)}
        cache.put_many(fresh)
    final = [fresh.get(key) or blob for key, blob in zip(keys, blobs, strict=True)]
    scores = maxsim_blobs(query, final)  # type: ignore[arg-type]  # every entry is a blob by now
    recomputed = sum(1 for key in keys if key in fresh)
    return LateInteractionResult(
        model_id=runner.model_id,
        scores=[float(s) for s in scores],
        cache_hits=len(keys) - recomputed,
        recomputed=recomputed,
        bytes_read=bytes_read,
    )
