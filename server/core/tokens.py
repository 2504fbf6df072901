"""Late interaction from stored token vectors: which collections store them, the stage that scores them,
and the backfill of documents still pending.

Token vectors are written with their documents (server/storage/store.py `tokens`), so a search reads the
candidates' blobs by key from the store and scores MaxSim here, in the executor (numpy releases the GIL),
straight from the int8 blobs (sieve_core.late_interaction.maxsim_blobs). Nothing moves over the network
but, for a ColBERT bundle, the query's token vectors from a worker. Zero-shot (the default: MaxSim over the
collection's bi-encoder's own token vectors) the query's token vectors come from the same encoder pass
that made the retrieval vector.

Pending documents (a ColBERT bundle's token vectors are computed after the write, by the workers; or a
collection whose token model changed) are filled by `TokenBackfill`, a loop of the server: never by the
query path. A search ranks a pending candidate after the scored ones and says how many there were.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.dispatch.dispatcher import Dispatcher, StageUnavailable
from server.storage.records import CollectionRow
from server.storage.store import Store
from sieve_core.cache import ResultCache, query_tokens_key
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument, NotFound
from sieve_core.late_interaction import BestMatches, maxsim_blobs
from sieve_core.logs import request_id
from sieve_core.models.bundle import BundleManifest
from sieve_core.token_codec import FORMATS
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, TokenFormat, check_blob, prepare_query
from sieve_core.types import (
    Hit,
    SearchSettings,
    Stage,
    StageReport,
    StageScore,
    StageStatus,
    TokenStorageInfo,
    TokenStorageSpec,
)

log = logging.getLogger(__name__)

ENABLE_HINT = (
    "create the collection with token_storage (e.g. pool_factor 2) or with defaults.late_interaction "
    "BEST_EFFORT to store token vectors with its documents"
)
BACKFILL_BATCH = 64  # pending documents per worker task: ~2 s of ColBERT encoding on 2 cores
BACKFILL_IDLE_S = 5.0  # how often the loop looks for pending documents when nobody wakes it
BACKFILL_TASK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TokenPlan:
    """How one collection's token vectors are made and stored."""

    fmt: TokenFormat
    model: str  # bundle name whose token vectors are stored
    model_id: str  # its name@revision
    dims: int  # the model's token width (before any projection)
    zero_shot: bool  # the model is the collection's bi-encoder: token vectors come from the same pass
    label: str  # what the stage report shows as the model
    cache_id: str  # the model's BundleManifest.cache_id (query token cache keys)


def format_at_creation(
    spec: TokenStorageSpec | None, defaults: SearchSettings, token_dims: int
) -> TokenFormat | None:
    """The format a new collection stores token vectors in: the spec's, or the default when its defaults
    ask for late interaction; None: it stores none."""
    if spec is None:
        return DEFAULT_TOKEN_FORMAT if defaults.late_interaction.enabled else None
    pool = spec.pool_factor or DEFAULT_TOKEN_FORMAT.pool_factor
    if not 1 <= pool <= 16:
        raise InvalidArgument(f"token_storage.pool_factor must be 0 (default), or 1 (none) to 16, got {pool}")
    if not 0 <= spec.projection_dims <= token_dims:
        raise InvalidArgument(
            f"token_storage.projection_dims must be 0 (none) or 1..{token_dims} (the token vectors' width), "
            f"got {spec.projection_dims}"
        )
    codec = spec.codec or DEFAULT_TOKEN_FORMAT.codec
    if codec not in FORMATS:
        raise InvalidArgument(
            f"token_storage.codec must be empty (default: {DEFAULT_TOKEN_FORMAT.codec}) or one of "
            f"{', '.join(sorted(FORMATS))}, got {codec!r}"
        )
    return TokenFormat(pool_factor=pool, projection_dims=spec.projection_dims, codec=codec)


def plan_from(
    row: CollectionRow, token_model: str, manifest: BundleManifest, zero_shot: bool
) -> TokenPlan | None:
    if row.token_format is None:
        return None
    fmt = TokenFormat.from_json(json.loads(row.token_format))
    if zero_shot:
        label = f"{manifest.model_id} (MaxSim over its token vectors, zero-shot)"
    else:
        label = f"{manifest.model_id} (ColBERT)"
    return TokenPlan(fmt, token_model, manifest.model_id, manifest.dims, zero_shot, label, manifest.cache_id)


def storage_info(row: CollectionRow, plan: TokenPlan | None) -> TokenStorageInfo | None:
    if plan is None:
        return None
    return TokenStorageInfo(
        pool_factor=plan.fmt.pool_factor,
        projection_dims=plan.fmt.projection_dims,
        codec=plan.fmt.codec,
        description=plan.fmt.describe(),
        model_id=row.token_model_id or plan.model_id,
        pending=row.tokens_pending,
    )


def check_blobs(plan: TokenPlan, blobs: dict[str, bytes]) -> None:
    """Token blobs computed elsewhere (an index job's workers) must be in the collection's format."""
    for doc_id, blob in blobs.items():
        try:
            check_blob(blob, plan.fmt, plan.dims)
        except ValueError as exc:
            raise InvalidArgument(f"token vectors for {doc_id!r}: {exc}") from None


# -- the stage ------------------------------------------------------------------------------------------


@dataclass
class QueryTokens:
    """The query's token vectors as the model made them (not yet projected), and where they came from."""

    rows: np.ndarray
    source: str  # "encoder pass", "cache" or "worker"


class TokenStage:
    """The late-interaction stage over stored token vectors (run by the cascade)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        dispatcher: Dispatcher,
        cache: ResultCache,
        run: Callable[..., Awaitable[Any]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.cache = cache
        self._run = run  # runs a blocking call in the engine's executor

    async def query_tokens(self, plan: TokenPlan, query: str, timeout_s: float) -> QueryTokens:
        """A ColBERT bundle's query token vectors: from the cache, else from a `colbert` worker."""
        key = query_tokens_key(plan.cache_id, query)
        rows = await self._run(self.cache.get_matrix, key, plan.dims)
        if rows is not None:
            return QueryTokens(rows, "cache")
        result = await self.dispatcher.query_tokens(plan.model, query, timeout_s)
        rows = result.rows()
        if rows.shape[1] != plan.dims:
            raise StageUnavailable(
                f"the worker's {result.model_id} made {rows.shape[1]}-d query vectors, not {plan.dims}"
            )
        await self._run(self.cache.put_matrix, key, rows)
        return QueryTokens(rows, "worker")

    async def score(
        self, collection_id: int, plan: TokenPlan, query: QueryTokens, hits: list[Hit], keep: int
    ) -> tuple[list[Hit], StageReport]:
        started = time.perf_counter()
        scores, pending, nbytes, matches = await self._run(
            self._maxsim, collection_id, plan, query.rows, hits
        )
        ranked = _rank(hits, scores, keep)
        for hit in ranked:
            hit.matches = matches.get(hit.key)
        method = f"store: {len(hits) - len(pending)} docs, {_mb(nbytes)}, {plan.fmt.describe()}"
        if pending:
            method += f"; {len(pending)} pending (ranked after the scored ones)"
        method += f"; query tokens: {query.source}"
        status, reason = StageStatus.COMPLETED, ""
        if hits and len(pending) == len(hits):
            status = StageStatus.DEGRADED
            reason = (
                f"none of the {len(hits)} candidates has its token vectors stored yet (the workers compute "
                "a ColBERT bundle's after the write); kept the previous order"
            )
        return ranked, StageReport(
            Stage.LATE_INTERACTION,
            status,
            reason,
            len(hits),
            len(ranked),
            (time.perf_counter() - started) * 1000,
            plan.label,
            method,
            token_source="store",
            token_bytes=nbytes,
            tokens_pending=len(pending),
            query_token_source=query.source,
        )

    def _maxsim(
        self, collection_id: int, plan: TokenPlan, rows: np.ndarray, hits: Sequence[Hit]
    ) -> tuple[dict[int, float], list[int], int, dict[int, tuple[bytes, BestMatches]]]:
        """In the executor: read the candidates' blobs by key, MaxSim straight from them, keeping the
        argmax (which stored row each query token matched) with each blob for the evidence spans."""
        blobs = self.store.token_blobs(collection_id, [h.key for h in hits])
        found = [h.key for h in hits if h.key in blobs]
        pending = [h.key for h in hits if h.key not in blobs]
        q = prepare_query(rows, plan.fmt)
        best: list[BestMatches | None] = [None] * len(found)
        values = (
            maxsim_blobs(q, [blobs[k] for k in found], best=best) if found else np.zeros(0, dtype=np.float32)
        )
        nbytes = sum(len(blobs[k]) for k in found)
        matches = {k: (blobs[k], b) for k, b in zip(found, best, strict=True) if b is not None}
        return dict(zip(found, values.tolist(), strict=True)), pending, nbytes, matches


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} KB"


def _rank(hits: list[Hit], scores: dict[int, float], keep: int) -> list[Hit]:
    """Scored candidates by MaxSim, then the pending ones in their previous order; the first `keep`."""
    scored = sorted((h for h in hits if h.key in scores), key=lambda h: -scores[h.key])
    rest = [h for h in hits if h.key not in scores]
    ranked = (scored + rest)[:keep]
    for rank, hit in enumerate(ranked):
        if hit.key in scores:
            hit.score = scores[hit.key]
            hit.stage_scores.append(StageScore(Stage.LATE_INTERACTION, hit.score, rank))
    return ranked


# -- backfill ------------------------------------------------------------------------------------------


@dataclass
class BackfillTarget:
    """One collection with pending documents, as the engine sees it."""

    name: str
    collection_id: int
    plan: TokenPlan


class TokenBackfill:
    """A server loop that has pending documents' token vectors computed (workers, or in-process without
    Redis) and stores them (on the writer thread). Woken by writes that leave documents pending."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        dispatcher: Dispatcher,
        targets: Callable[[], list[BackfillTarget]],
        compute_locally: Callable[[TokenPlan, list[str]], list[bytes]],
        run: Callable[..., Awaitable[Any]],
        write: Callable[..., Awaitable[Any]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self._targets = targets
        self._compute_locally = compute_locally
        self._run = run
        self._write = write
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stored = 0  # token vectors stored by this loop since start (tests and logs)
        self._reported: dict[str, int] = {}

    def start(self) -> None:
        self._wake.set()  # a first pass at once: documents left pending by an earlier run or an upgrade
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sieve-token-backfill")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        backoff = BACKFILL_IDLE_S
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            try:
                busy = await self._pass()
                backoff = BACKFILL_IDLE_S
                if busy:
                    self._wake.set()  # more may be pending: go on at once
            except StageUnavailable as exc:
                log.warning("token vectors of pending documents wait for the workers: %s", exc)
                backoff = min(60.0, backoff * 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("token backfill failed; retrying in %.0f s", backoff)
                backoff = min(60.0, backoff * 2)

    async def _pass(self) -> bool:
        """One batch for each collection with pending documents. True if any was stored."""
        busy = False
        for target in self._targets():
            try:
                row = await self._run(self.store.get_collection, target.name)
            except NotFound:  # deleted since the list was taken
                continue
            if self._reported.get(target.name) != row.tokens_pending and row.tokens_pending:
                log.info("collection %r: %d documents pending token vectors", target.name, row.tokens_pending)
            self._reported[target.name] = row.tokens_pending
            if not row.tokens_pending:
                continue
            if not await self._run(self.store.claim, target.collection_id):
                continue  # another server sharing the store computes them (Database.claim)
            docs = await self._run(self.store.pending_tokens, target.collection_id, BACKFILL_BATCH)
            if not docs:
                continue
            texts = [d.text for d in docs]
            # Outside any call: the tasks (and the workers' log lines) carry the collection's name.
            request_id.set(f"tokens-{target.name}")
            if self.settings.redis_url is None:
                blobs = await self._run(self._compute_locally, target.plan, texts)
            else:
                result = await self.dispatcher.document_tokens(
                    target.plan.model, texts, target.plan.fmt, BACKFILL_TASK_TIMEOUT_S
                )
                blobs = result.token_blobs()
            for blob in blobs:
                check_blob(blob, target.plan.fmt, target.plan.dims)
            written = await self._write(
                self.store.put_tokens,
                target.collection_id,
                {d.key: b for d, b in zip(docs, blobs, strict=True)},
            )
            self.stored += written
            busy = busy or written > 0
            if row.tokens_pending - written <= 0:
                log.info("collection %r: every document has its token vectors", target.name)
        return busy
