"""Document writes: embed off the loop, commit on the single writer thread, then update the index.

A collection that stores the bi-encoder's own token vectors (zero-shot late interaction) gets them from
the same encoder pass as the vectors, compressed in the pool, and committed in the same transaction as
the documents; a ColBERT bundle's are computed after the write by the workers (the documents are
pending meanwhile, see server/core/tokens.py).

A write is durable once the store has committed it, and visible to searches once the writer thread has
applied it to the collection's index (`Collection.visible_generation`); `wait_for_generation` lets a
search wait for its own writes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from server.core import validation
from server.core.collections import Collection, Collections
from server.core.executors import Executors
from server.core.tokens import check_blobs
from server.storage.records import UpsertOutcome
from server.storage.store import Store
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition, InvalidArgument, NotFound
from sieve_core.late_interaction_service import encode_documents
from sieve_core.types import Document, WriteResult

log = logging.getLogger(__name__)


class Writes:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        collections: Collections,
        run: Executors,
        on_pending_tokens: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._store = store
        self._collections = collections
        self._run = run
        # Wakes the token backfill: a write left documents without token vectors (a ColBERT bundle's).
        self._on_pending_tokens = on_pending_tokens

    async def upsert(
        self,
        name: str,
        docs: list[Document],
        given: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        embedding_model: str = "",
    ) -> WriteResult:
        """Embed the documents whose text is new or changed and commit them. `given`: the client's own
        vectors by id (of the collection's model, as `embedding_model` must say); those are stored as they
        are, the others embedded here as usual."""
        col = self._collections.get(name)
        validation.documents(docs, self._settings)
        vectors: dict[str, np.ndarray] = {}
        if given:
            validation.embedding_model(embedding_model, col.row.embedding_model, col.row.embedding_model_id)
            ids = {d.id for d in docs}
            for doc_id, values in given.items():
                if doc_id in ids:
                    vectors[doc_id] = validation.vector(values, col.row.dims, f"document {doc_id!r} vector")
        unchanged = await self._run.read(self._store.unchanged_ids, col.row.id, docs)
        embedded, tokens = await self._embed(
            col, [d for d in docs if d.id not in unchanged and d.id not in vectors]
        )
        vectors.update(embedded)
        return WriteResult(await self._commit(col, docs, vectors, tokens), len(docs))

    async def upsert_embedded(
        self,
        name: str,
        docs: list[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes] | None = None,
    ) -> WriteResult:
        """Commit documents whose vectors (and token vectors) were computed elsewhere (an index job's
        embedding workers, in the same encoder pass).

        The same atomic write as `upsert`, on the single writer thread, idempotent by id. The documents
        were validated where they came from (an index job's source reader checks every line and keeps one
        per id), so only the vectors and the token blobs' format are checked here. `vectors` must hold a
        vector for every document whose text is new or changed; one that is missing because a concurrent
        write changed the stored text meanwhile is embedded here (with its token vectors).
        """
        col = self._collections.get(name)
        for doc_id, vector in vectors.items():
            if np.shape(vector) != (col.row.dims,):
                raise InvalidArgument(
                    f"vector for {doc_id!r} has shape {np.shape(vector)}; the collection needs ({col.row.dims},)"
                )
        tokens = dict(tokens or {}) if col.tokens is not None else {}
        if col.tokens is not None:
            await self._run.read(check_blobs, col.tokens, tokens)
        return WriteResult(await self._commit(col, docs, dict(vectors), tokens), len(docs))

    async def _commit(
        self, col: Collection, docs: list[Document], vectors: dict[str, np.ndarray], tokens: dict[str, bytes]
    ) -> int:
        """Commit on the writer thread; returns the write's generation. A document stored with a new vector
        but no token vectors (a ColBERT bundle's come later; a client's vector had no encoder pass) is
        pending: the token backfill is woken for it."""
        while True:
            outcome = await self._run.write(self._commit_upsert, col, docs, vectors, tokens)
            if not outcome.missing_vectors:
                if col.tokens is not None and any(doc_id not in tokens for doc_id in vectors):
                    self._on_pending_tokens()
                return outcome.generation
            # A concurrent write changed some texts after we looked: embed those too and try again.
            missing = set(outcome.missing_vectors)
            more_vectors, more_tokens = await self._embed(col, [d for d in docs if d.id in missing])
            vectors.update(more_vectors)
            tokens.update(more_tokens)

    async def _embed(
        self, col: Collection, docs: list[Document]
    ) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
        """The documents' vectors and, when the collection stores the bi-encoder's own token vectors
        (zero-shot), their compressed token vectors: one encoder pass for both, compressed in the pool."""
        if not docs:
            return {}, {}
        fmt = col.tokens.fmt if col.tokens is not None and col.tokens.zero_shot else None
        texts = [d.text for d in docs]
        matrix, blobs = await self._run.read(
            encode_documents, col.runner, texts, fmt, self._settings.embed_batch_size
        )
        vectors = {d.id: matrix[i] for i, d in enumerate(docs)}
        return vectors, ({d.id: blobs[i] for i, d in enumerate(docs)} if blobs is not None else {})

    def _commit_upsert(
        self,
        col: Collection,
        docs: list[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes],
    ) -> UpsertOutcome:
        self._collections.check_current(col)
        outcome = self._store.upsert(col.row.id, docs, vectors, tokens)
        if outcome.missing_vectors:
            return outcome
        # The store has committed: the write is durable. Now make it visible in the index.
        col.index.remove(np.array(outcome.removed, dtype=np.uint64))
        if outcome.added:
            keys = np.array([k for k, _ in outcome.added], dtype=np.uint64)
            col.index.add(keys, np.stack([v for _, v in outcome.added]))
        if col.fulltext is not None:
            texts = {d.id: d.text for d in docs}
            added = [(k, texts[i]) for (k, _), i in zip(outcome.added, outcome.added_ids, strict=True)]
            col.fulltext.apply(added, outcome.removed, outcome.generation)
        self._collections.published(col, len(docs), outcome.generation)
        if outcome.removed:
            self._compact(col)
        return outcome

    def _compact(self, col: Collection) -> None:
        """Give the pages of replaced or deleted documents (their token vectors above all) back to the
        file system once enough are free. The write is committed already: a failure here only waits for
        the next one."""
        if col.tokens is None:
            return
        try:
            released = self._store.compact()
        except (OSError, sqlite3.Error) as exc:
            log.warning("collection %r: compaction skipped: %s", col.row.name, exc)
            return
        if released:
            log.info("store compacted: %d pages (%.1f MB) released", released, released * 4096 / 1e6)

    async def delete_documents(self, name: str, ids: list[str]) -> WriteResult:
        col = self._collections.get(name)
        validation.ids(ids, self._settings)
        return await self._run.write(self._commit_delete, col, ids)

    def _commit_delete(self, col: Collection, ids: list[str]) -> WriteResult:
        self._collections.check_current(col)
        generation, keys = self._store.delete(col.row.id, ids)
        col.index.remove(np.array(keys, dtype=np.uint64))
        if col.fulltext is not None:
            col.fulltext.apply([], keys, generation)
        self._collections.published(col, len(keys), generation)
        if keys:
            self._compact(col)
        unique = len(dict.fromkeys(ids))
        return WriteResult(generation, len(keys), unique - len(keys))

    async def wait_for_generation(self, col: Collection, generation: int, timeout_s: float) -> int:
        """Read your writes: wait until the collection's index shows `generation`, for at most `timeout_s`,
        then FAILED_PRECONDITION. Returns the generation the index shows."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        delay = 0.002
        while col.visible_generation < generation:
            if not self._collections.is_current(col):
                raise NotFound(f"collection {col.row.name!r} was deleted")
            left = deadline - time.monotonic()
            if left <= 0:
                raise FailedPrecondition(
                    f"collection {col.row.name!r} is at generation {col.visible_generation}, below the "
                    f"requested min_generation {generation}; retry later"
                )
            # The writer thread publishes visible_generation; a short poll costs nothing next to a write.
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return col.visible_generation
