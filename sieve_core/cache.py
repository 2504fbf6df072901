"""Redis as a cache of model outputs: query vectors (and query token vectors), re-rank scores,
cross-encoder pair scores. Documents' token vectors are not here: they live in the collection's store.

Every key names what its value depends on, so nothing is ever invalidated by hand:
- a query vector (and a query's token vectors) depends on the model (weights and serving settings:
  `BundleManifest.cache_id`) and the query text, not on any collection;
- a stage's scores for a search depend on the stage's model, the query, the candidates' content, and,
  as the issue asks, the collection generation: a write moves the generation, so an upsert makes every
  cached result of that collection unreachable by construction;
- a cross-encoder pair score depends on the model, the query and the document's content hash.

Values carry a TTL (`Settings.cache_ttl_s`) so unreachable entries go away; with Redis' `volatile-lru`
policy only such entries are evicted under memory pressure, never the Celery queues.

Redis is an optimisation here, never a dependency of an answer: every error is a miss, logged once per
outage, and after a failure the cache stays off for `OFF_AFTER_ERROR_S` so that a search with Redis
down does not pay a connect timeout per lookup.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
import redis

from sieve_core import redis_conn
from sieve_core.config import Settings

log = logging.getLogger(__name__)

KEY_VERSION = "v1"
OFF_AFTER_ERROR_S = 2.0


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()[:32]


def query_vector_key(model_cache_id: str, query: str) -> str:
    return f"sieve:qvec:{KEY_VERSION}:{model_cache_id}:{_digest(query)}"


def query_tokens_key(model_cache_id: str, query: str) -> str:
    """A query's token vectors (zero-shot: with its sentence vector, from the same encoder pass)."""
    return f"sieve:qtok:{KEY_VERSION}:{model_cache_id}:{_digest(query)}"


def stage_scores_key(
    stage: str,
    model_cache_id: str,
    collection_id: int,
    generation: int,
    query: str,
    content_hashes: Sequence[str],
) -> str:
    candidates = _digest(query, *content_hashes)
    return f"sieve:scores:{KEY_VERSION}:{stage}:{model_cache_id}:c{collection_id}:g{generation}:{candidates}"


def pair_score_key(model_cache_id: str, query: str, content_hash: str) -> str:
    return f"sieve:pair:{KEY_VERSION}:{model_cache_id}:{_digest(query)}:{content_hash}"


class ResultCache:
    """A small, failure-tolerant wrapper of a Redis client for cached model outputs."""

    def __init__(self, client: redis.Redis | None, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self._off_until = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout_s: float = 0.25) -> ResultCache:
        """A cache on SIEVE_REDIS_URL (password and TLS as configured), or a disabled one without it."""
        if settings.redis_url is None:
            return cls(None, ttl_s=settings.cache_ttl_s)
        return cls(redis_conn.client(settings, timeout_s=timeout_s), ttl_s=settings.cache_ttl_s)

    @property
    def enabled(self) -> bool:
        return self.client is not None and time.monotonic() >= self._off_until

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            if time.monotonic() >= self._off_until:
                log.warning("cache %s failed, cache off for %.0f s: %s", what, OFF_AFTER_ERROR_S, exc)
            self._off_until = time.monotonic() + OFF_AFTER_ERROR_S

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys or not self.enabled:
            self.misses += len(keys)
            return [None] * len(keys)
        try:
            values: list[bytes | None] = self.client.mget(list(keys))  # type: ignore[union-attr,assignment]
        except redis.RedisError as exc:
            self._failed("read", exc)
            self.misses += len(keys)
            return [None] * len(keys)
        found = sum(v is not None for v in values)
        self.hits += found
        self.misses += len(keys) - found
        return values

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def put_many(self, items: dict[str, bytes]) -> None:
        if not items or not self.enabled:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                for key, value in items.items():
                    pipe.set(key, value, ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            self._failed("write", exc)

    def put(self, key: str, value: bytes) -> None:
        self.put_many({key: value})

    # -- typed values ------------------------------------------------------------------------------
    def get_vector(self, key: str, dims: int) -> np.ndarray | None:
        raw = self.get(key)
        if raw is None or len(raw) != 4 * dims:
            return None
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)

    def put_vector(self, key: str, vector: np.ndarray) -> None:
        self.put(key, np.ascontiguousarray(vector, dtype="<f4").tobytes())

    def get_matrix(self, key: str, dims: int) -> np.ndarray | None:
        """A float32 (rows, dims) matrix stored by `put_matrix`, or None (absent, or not that width)."""
        raw = self.get(key)
        if raw is None or len(raw) % (4 * dims) or not raw:
            return None
        return np.frombuffer(raw, dtype="<f4").reshape(-1, dims).astype(np.float32)

    def put_matrix(self, key: str, matrix: np.ndarray) -> None:
        self.put(key, np.ascontiguousarray(matrix, dtype="<f4").tobytes())

    def get_scores(self, key: str, count: int) -> list[float] | None:
        raw = self.get(key)
        if raw is None or len(raw) != 8 * count:
            return None
        return np.frombuffer(raw, dtype="<f8").tolist()

    def put_scores(self, key: str, scores: Sequence[float]) -> None:
        self.put(key, np.asarray(scores, dtype="<f8").tobytes())
