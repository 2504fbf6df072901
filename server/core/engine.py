"""The server's core, as the transport and the jobs see it: a thin facade over its parts.

- collections.py: the collections, their indexes (loaded, caught up, snapshotted) and models;
- writes.py: document writes on the single writer thread;
- retrieval.py: the query vector and the index search (the first stage of a search), reads by id;
- search.py: a search as a sequence of updates (Search: the last; SearchStream: each), budgets planned;
- cascade.py: the re-ranking stages: late interaction here (tokens.py), the cross-encoder on the workers;
- budget.py: latency budgets: tiers, measured stage costs, the plan;
- tokens.py: stored token vectors: formats, the late-interaction stage, the backfill of pending ones;
- validation.py: every request's arguments, checked once, here or in the part that serves the request.

Transport-free (no protobuf): the gRPC servicers translate messages to these calls and back. Blocking
work (ONNX, usearch, SQLite) runs in executors (executors.py), so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import numpy as np

from server.core.cascade import Cascade
from server.core.collections import Collections
from server.core.executors import Executors
from server.core.follower import Follower
from server.core.indexing import IndexTarget
from server.core.retrieval import Retrieval
from server.core.search import Searches
from server.core.tokens import TokenBackfill, TokenStage
from server.core.writes import Writes
from server.dispatch.dispatcher import Dispatcher
from server.storage.backends import open_store
from sieve_core.cache import ResultCache
from sieve_core.config import Settings
from sieve_core.late_interaction_service import encode_documents
from sieve_core.models.registry import ModelRegistry
from sieve_core.types import (
    CollectionInfo,
    CollectionSpec,
    Document,
    SearchQuery,
    SearchResult,
    SearchUpdate,
    WriteResult,
)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = open_store(settings)
        # The process's one model registry: the collections' bi-encoders, the re-rankers' manifests.
        self.models = ModelRegistry(
            settings.models_dir, intra_op_threads=settings.onnx_threads, spin=settings.onnx_spin
        )
        self.dispatcher = Dispatcher(settings)
        self.cache = ResultCache.from_settings(settings)
        self._run = Executors(settings)
        self.collections = Collections(settings, self.store, self.models, self._run)
        self.backfill = TokenBackfill(
            settings,
            self.store,
            self.dispatcher,
            self.collections.with_pending_tokens,
            self.collections.factory.token_blobs,
            self._run.read,
            self._run.write,
        )
        self.writes = Writes(settings, self.store, self.collections, self._run, self.backfill.wake)
        self.retrieval = Retrieval(settings, self.store, self.collections, self.cache, self._run)
        token_stage = TokenStage(settings, self.store, self.dispatcher, self.cache, self._run.read)
        self.cascade = Cascade(
            settings,
            self.models,
            self.dispatcher,
            self.cache,
            self._run.pool,
            token_stage,
            self.retrieval.load,
        )
        self.searches = Searches(
            settings, self.collections, self.writes, self.retrieval, self.cascade, self._run
        )
        # With a store other servers write too (PostgreSQL), their writes are followed into the indexes.
        self.follower = Follower(self.store, self.collections, self._run)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the default model and every collection's index, on the writer thread; then follow other
        servers' writes (a shared store) and start the loop that has pending documents' token vectors computed."""
        await self._run.run(self._run.writer, self.collections.open)
        self.follower.start()
        self.backfill.start()

    async def close(self) -> None:
        """Stop the token backfill and the follower, snapshot every index, then stop the executors."""
        await self.backfill.stop()
        await asyncio.to_thread(self.follower.stop)
        await self._run.run(self._run.writer, self.collections.snapshot_all)
        await self._run.run(self._run.writer, self.collections.close)
        self.dispatcher.close()
        self._run.shutdown()

    # -- collections and documents ---------------------------------------------------------------
    async def create_collection(self, spec: CollectionSpec) -> CollectionInfo:
        return await self.collections.create(spec)

    async def get_collection(self, name: str) -> CollectionInfo:
        return await self.collections.describe(name)

    async def list_collections(self) -> list[CollectionInfo]:
        return await self.collections.list_infos()

    async def delete_collection(self, name: str) -> None:
        await self.collections.delete(name)

    async def upsert(
        self,
        name: str,
        docs: list[Document],
        vectors: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        embedding_model: str = "",
    ) -> WriteResult:
        """Upsert; with `vectors` (by id, from the client), those documents are stored with them unembedded."""
        return await self.writes.upsert(name, docs, vectors, embedding_model)

    async def upsert_embedded(
        self,
        name: str,
        docs: list[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes] | None = None,
    ) -> WriteResult:
        return await self.writes.upsert_embedded(name, docs, vectors, tokens)

    async def get_documents(self, name: str, ids: list[str]) -> tuple[list[Document], list[str]]:
        return await self.retrieval.get_documents(name, ids)

    async def delete_documents(self, name: str, ids: list[str]) -> WriteResult:
        return await self.writes.delete_documents(name, ids)

    # -- search (server/core/search.py) -------------------------------------------------------------
    async def search(self, query: SearchQuery, timeout_s: float | None = None) -> SearchResult:
        """The search's final answer. `timeout_s`: time left before the caller's deadline."""
        return await self.searches.search(query, timeout_s)

    def search_stream(
        self, query: SearchQuery, timeout_s: float | None = None
    ) -> AsyncIterator[SearchUpdate]:
        """The search's ranking after each stage that runs, the last update final (= `search`)."""
        return self.searches.stream(query, timeout_s)

    # -- for index jobs (server.core.indexing.IndexingEngine) --------------------------------------
    async def index_target(self, name: str) -> IndexTarget:
        col = self.collections.get(name)
        info = await self.collections.describe(name)
        if col.tokens is None:
            return IndexTarget(info, None, None)
        return IndexTarget(info, col.tokens.fmt, None if col.tokens.zero_shot else col.tokens.model)

    def unchanged_ids(self, collection: str, docs: list[Document]) -> set[str]:
        # `collection` is a job's, validated when the job started: look it up, do not check it again.
        return self.store.unchanged_ids(self.collections.find(collection).row.id, docs)

    def embed(self, collection: str, texts: list[str]) -> tuple[np.ndarray, list[bytes] | None]:
        col = self.collections.get(collection)
        fmt = col.tokens.fmt if col.tokens is not None and col.tokens.zero_shot else None
        return encode_documents(col.runner, texts, fmt, self.settings.embed_batch_size)
