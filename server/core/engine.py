"""The server's core: collections, documents and search over the store, the index and the models.

Transport-free (no protobuf): the gRPC servicers translate messages to these calls and back. Blocking
work (ONNX, usearch, SQLite) runs in executors: reads and model work in a shared pool, every write in a
single writer thread, so the server is the single writer of its collections and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from server.core import validation
from server.core.cascade import Cascade
from server.dispatch.dispatcher import Dispatcher
from server.storage.index import VectorIndex
from server.storage.store import CollectionRow, Store
from sieve_core.cache import ResultCache, query_vector_key
from sieve_core.config import Settings
from sieve_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, storage_error
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.models.bundle import BundleError
from sieve_core.types import (
    CollectionInfo,
    CollectionSpec,
    Document,
    Hit,
    SearchQuery,
    SearchResult,
    SearchSettings,
    Stage,
    StageMode,
    StageReport,
    StageScore,
    StageStatus,
    WriteResult,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelRegistry:
    """Bi-encoder runners by bundle name, each loaded once and shared by every collection using it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._runners: dict[str, BiEncoderRunner] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> BiEncoderRunner:
        with self._lock:
            runner = self._runners.get(name)
            if runner is None:
                path = self._settings.models_dir / name
                validation.model_name(name, "embedding_model")
                try:
                    runner = BiEncoderRunner(
                        path, intra_op_threads=self._settings.onnx_threads, spin=self._settings.onnx_spin
                    )
                except BundleError as exc:
                    raise FailedPrecondition(
                        f"embedding model {name!r} is not available on this server ({exc}); export it into "
                        f"{self._settings.models_dir}/ with `sieve models export bi-encoder --source DIR "
                        f"--out {path}` (the default model: `make models`)"
                    ) from None
                if runner.manifest.kind != "bi_encoder":
                    raise FailedPrecondition(
                        f"model {name!r} is a {runner.manifest.kind} model, not a bi-encoder"
                    )
                runner.warmup()
                self._runners[name] = runner
            return runner


@dataclass
class _Collection:
    row: CollectionRow
    index: VectorIndex
    runner: BiEncoderRunner
    defaults: SearchSettings
    directory: Path
    snapshot_generation: int = 0
    # The generation whose writes the index shows (set by the writer thread after each index update).
    visible_generation: int = 0
    unsnapshotted_writes: int = 0
    last_snapshot: float = field(default_factory=time.monotonic)
    snapshot_retry_at: float = 0.0  # after a failed snapshot (e.g. a full disk), not before this


def _settings_to_json(s: SearchSettings) -> str:
    return json.dumps({k: v if v is None or isinstance(v, str) else int(v) for k, v in asdict(s).items()})


def _settings_from_json(text: str) -> SearchSettings:
    raw = json.loads(text)
    for mode in ("late_interaction", "cross_encoder"):
        raw[mode] = StageMode(raw.get(mode, 0))
    return SearchSettings(**raw)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.data_dir / "sieve.db")
        self.models = ModelRegistry(settings)
        self.dispatcher = Dispatcher(settings)
        self._pool = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="sieve-work")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sieve-write")
        self.cache = ResultCache.from_settings(settings)
        self.cascade = Cascade(settings, self.dispatcher, self.cache, self._pool)
        self._collections: dict[str, _Collection] = {}
        self.server_defaults = SearchSettings(
            retrieve_candidates=settings.default_retrieve_candidates,
            ef_search=settings.default_ef_search,
            late_interaction=StageMode.OFF,
            late_interaction_keep=settings.default_top_k,
            cross_encoder=StageMode.OFF,
            cross_encoder_keep=settings.default_top_k,
            late_interaction_model=settings.late_interaction_model,
            cross_encoder_model=settings.cross_encoder_model,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        """Load the default model and every collection's index (caught up from the store). Blocking."""
        try:
            self.models.get(self.settings.default_embedding_model)
        except FailedPrecondition:
            log.warning("default embedding model %r is not available", self.settings.default_embedding_model)
        for row in self.store.list_collections():
            self._collections[row.name] = self._load_collection(row)

    async def start(self) -> None:
        await self._run(self._writer, self.open)

    async def close(self) -> None:
        """Snapshot every index, then stop the executors."""
        await self._run(self._writer, self._snapshot_all)
        self.dispatcher.close()
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def _snapshot_all(self) -> None:
        for col in self._collections.values():
            if col.visible_generation != col.snapshot_generation:
                self._snapshot(col, col.visible_generation)

    async def _run(self, executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        # run_in_executor does not carry contextvars into the thread: copy them, so that the request id
        # reaches log lines written there and the tasks sent from there (Dispatcher.precompute_tokens).
        call = partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def _write(self, fn: Any, *args: Any) -> Any:
        """Run a write on the writer thread. A full or read-only data directory becomes a clear error
        (RESOURCE_EXHAUSTED / FAILED_PRECONDITION, see sieve_core.errors.storage_error), not INTERNAL."""
        return await self._run(self._writer, self._storage_guarded, fn, *args)

    def _storage_guarded(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (OSError, sqlite3.Error) as exc:
            mapped = storage_error(exc, self.settings.data_dir)
            if mapped is None:
                raise
            log.warning("write refused: %s", mapped.message)
            raise mapped from exc

    def _collection_dir(self, row: CollectionRow) -> Path:
        return self.settings.data_dir / "collections" / str(row.id)

    def _load_collection(self, row: CollectionRow) -> _Collection:
        runner = self.models.get(row.embedding_model)
        directory = self._collection_dir(row)
        started = time.monotonic()
        loaded = VectorIndex.load_latest(
            directory, row.dims, row.metric, ef_search=self.settings.default_ef_search
        )
        if loaded is None:
            index, snap_gen = self._new_index(row), 0
        else:
            index, snap_gen = loaded
        applied = 0
        for change in self.store.changes_since(row.id, snap_gen, row.dims):
            index.remove(change.removed_keys)
            index.add(change.added_keys, change.added_vectors)
            applied += len(change.removed_keys) + len(change.added_keys)
        if len(index) != row.doc_count:
            log.warning(
                "collection %r: index has %d vectors but the store %d documents; rebuilding the index",
                row.name,
                len(index),
                row.doc_count,
            )
            index, snap_gen = self._new_index(row), 0
            for change in self.store.changes_since(row.id, 0, row.dims):
                index.add(change.added_keys, change.added_vectors)
        log.info(
            "collection %r: %d documents at generation %d (snapshot %d, %d changes applied) in %.2fs",
            row.name,
            row.doc_count,
            row.generation,
            snap_gen,
            applied,
            time.monotonic() - started,
        )
        col = _Collection(row, index, runner, _settings_from_json(row.defaults_json), directory, snap_gen)
        col.visible_generation = row.generation
        col.unsnapshotted_writes = applied
        return col

    def _new_index(self, row: CollectionRow) -> VectorIndex:
        return VectorIndex(
            row.dims,
            row.metric,
            connectivity=self.settings.hnsw_connectivity,
            ef_construction=self.settings.hnsw_ef_construction,
            ef_search=self.settings.default_ef_search,
        )

    def _snapshot(self, col: _Collection, generation: int) -> None:
        try:
            col.index.save(col.directory, generation)
        except Exception as exc:
            # A snapshot only shortens the next start (the store holds every write): a full or read-only
            # disk must fail neither the write that made it due nor a shutdown. Keep the previous one.
            col.snapshot_retry_at = time.monotonic() + min(self.settings.snapshot_interval_s, 30.0)
            log.warning(
                "collection %r: index snapshot at generation %d failed, keeping the one at %d: %s",
                col.row.name,
                generation,
                col.snapshot_generation,
                exc,
                exc_info=not isinstance(exc, OSError | RuntimeError),  # RuntimeError: usearch's I/O errors
            )
            return
        col.snapshot_generation = generation
        col.unsnapshotted_writes = 0
        col.last_snapshot = time.monotonic()
        try:
            self.store.prune_tombstones(col.row.id, generation)
        except (OSError, sqlite3.Error) as exc:  # harmless: the next snapshot prunes them
            log.warning("collection %r: tombstones not pruned: %s", col.row.name, exc)

    def _maybe_snapshot(self, col: _Collection, changed: int, generation: int) -> None:
        col.visible_generation = generation
        col.unsnapshotted_writes += changed
        due = (
            col.unsnapshotted_writes >= self.settings.snapshot_every_writes
            or time.monotonic() - col.last_snapshot >= self.settings.snapshot_interval_s
        )
        if due and time.monotonic() >= col.snapshot_retry_at:
            self._snapshot(col, generation)

    def _get(self, name: str) -> _Collection:
        validation.collection_name(name)
        col = self._collections.get(name)
        if col is None:
            raise NotFound(f"collection {name!r} does not exist")
        return col

    def _info(self, col: _Collection) -> CollectionInfo:
        row = self.store.get_collection(col.row.name)
        return CollectionInfo(
            name=row.name,
            embedding_model=row.embedding_model,
            embedding_model_id=row.embedding_model_id,
            metric=row.metric,
            dimensions=row.dims,
            defaults=col.defaults,
            document_count=row.doc_count,
            generation=row.generation,
            created_at=row.created_at,
        )

    # -- collections -----------------------------------------------------------------------------
    async def create_collection(self, spec: CollectionSpec) -> CollectionInfo:
        name = validation.collection_name(spec.name)
        metric = validation.metric(spec.metric, self.settings)
        defaults = validation.search_settings(spec.defaults, self.settings, "defaults")
        model = spec.embedding_model or self.settings.default_embedding_model
        return await self._write(self._create, name, model, metric, defaults)

    def _create(self, name: str, model: str, metric: str, defaults: SearchSettings) -> CollectionInfo:
        if name in self._collections:
            raise AlreadyExists(f"collection {name!r} already exists")
        if len(self._collections) >= self.settings.max_collections:
            raise FailedPrecondition(
                f"this server already holds the maximum of {self.settings.max_collections} collections"
            )
        runner = self.models.get(model)
        row = self.store.create_collection(
            name, model, runner.model_id, metric, runner.dims, _settings_to_json(defaults)
        )
        directory = self._collection_dir(row)
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of an earlier collection with this row id
        col = _Collection(row, self._new_index(row), runner, defaults, directory)
        self._collections[name] = col
        return self._info(col)

    async def get_collection(self, name: str) -> CollectionInfo:
        col = self._get(name)
        return await self._run(self._pool, self._info, col)

    async def list_collections(self) -> list[CollectionInfo]:
        cols = list(self._collections.values())
        return await self._run(self._pool, self._infos, cols)

    def _infos(self, cols: list[_Collection]) -> list[CollectionInfo]:
        out = []
        for col in cols:
            try:
                out.append(self._info(col))
            except NotFound:  # deleted since the list was taken: not an error of the listing
                continue
        return out

    async def delete_collection(self, name: str) -> None:
        self._get(name)
        await self._write(self._delete_collection, name)

    def _delete_collection(self, name: str) -> None:
        col = self._collections.get(name)
        if col is None:
            raise NotFound(f"collection {name!r} does not exist")
        self.store.delete_collection(name)  # first: if the disk refuses, the collection stays as it was
        del self._collections[name]
        shutil.rmtree(col.directory, ignore_errors=True)

    # -- documents -------------------------------------------------------------------------------
    async def upsert(self, name: str, docs: list[Document]) -> WriteResult:
        col = self._get(name)
        validation.documents(docs, self.settings)
        unchanged = await self._run(self._pool, self.store.unchanged_ids, col.row.id, docs)
        to_embed = [d for d in docs if d.id not in unchanged]
        vectors = await self._embed(col, to_embed)
        while True:
            outcome = await self._write(self._commit_upsert, col, docs, vectors)
            if not outcome.missing_vectors:
                if col.defaults.late_interaction not in (StageMode.UNSPECIFIED, StageMode.OFF) and to_embed:
                    # The collection re-ranks by late interaction: have a worker cache the new texts' token
                    # vectors now, so a warm re-rank never runs the document encoder.
                    texts = [d.text for d in to_embed]
                    await self._run(
                        self._pool,
                        self.dispatcher.precompute_tokens,
                        col.row.embedding_model,
                        texts,
                        col.defaults.over(self.server_defaults).late_interaction_model,
                    )
                return WriteResult(outcome.generation, len(docs))
            # A concurrent write changed some texts after we looked: embed those too and try again.
            missing = set(outcome.missing_vectors)
            vectors.update(await self._embed(col, [d for d in docs if d.id in missing]))

    async def _embed(self, col: _Collection, docs: list[Document]) -> dict[str, np.ndarray]:
        if not docs:
            return {}
        matrix = await self._run(
            self._pool, col.runner.embed, [d.text for d in docs], self.settings.embed_batch_size
        )
        return {d.id: matrix[i] for i, d in enumerate(docs)}

    def _commit_upsert(self, col: _Collection, docs: list[Document], vectors: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
        if self._collections.get(col.row.name) is not col:
            raise NotFound(f"collection {col.row.name!r} was deleted")
        outcome = self.store.upsert(col.row.id, docs, vectors)
        if outcome.missing_vectors:
            return outcome
        # The store has committed: the write is durable. Now make it visible in the index.
        col.index.remove(np.array(outcome.removed, dtype=np.uint64))
        if outcome.added:
            keys = np.array([k for k, _ in outcome.added], dtype=np.uint64)
            col.index.add(keys, np.stack([v for _, v in outcome.added]))
        self._maybe_snapshot(col, len(docs), outcome.generation)
        return outcome

    async def upsert_embedded(
        self, name: str, docs: list[Document], vectors: dict[str, np.ndarray]
    ) -> WriteResult:
        """Commit documents whose vectors were computed elsewhere (an index job's embedding workers).

        The same atomic write as `upsert`, on the single writer thread, idempotent by id. `vectors` must
        hold a vector for every document whose text is new or changed; one that is missing because a
        concurrent write changed the stored text meanwhile is embedded here. No token vectors are queued:
        the worker that computed the vectors cached them in the same encoder pass when asked to.
        """
        col = self._get(name)
        validation.documents(docs, self.settings)
        for doc_id, vector in vectors.items():
            if np.shape(vector) != (col.row.dims,):
                raise InvalidArgument(
                    f"vector for {doc_id!r} has shape {np.shape(vector)}; the collection needs ({col.row.dims},)"
                )
        vectors = dict(vectors)
        while True:
            outcome = await self._write(self._commit_upsert, col, docs, vectors)
            if not outcome.missing_vectors:
                return WriteResult(outcome.generation, len(docs))
            missing = set(outcome.missing_vectors)
            vectors.update(await self._embed(col, [d for d in docs if d.id in missing]))

    async def wait_for_generation(self, name: str, generation: int, timeout_s: float) -> int:
        """Read your writes: wait until the collection's index shows `generation`, for at most `timeout_s`,
        then FAILED_PRECONDITION. Returns the generation the index shows."""
        col = self._get(name)
        deadline = time.monotonic() + max(0.0, timeout_s)
        delay = 0.002
        while col.visible_generation < generation:
            if self._collections.get(name) is not col:
                raise NotFound(f"collection {name!r} was deleted")
            left = deadline - time.monotonic()
            if left <= 0:
                raise FailedPrecondition(
                    f"collection {name!r} is at generation {col.visible_generation}, below the requested "
                    f"min_generation {generation}; retry later"
                )
            # The writer thread publishes visible_generation; a short poll costs nothing next to a write.
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return col.visible_generation

    async def get_documents(self, name: str, ids: list[str]) -> tuple[list[Document], list[str]]:
        col = self._get(name)
        validation.ids(ids, self.settings)
        found = await self._run(self._pool, self.store.get_documents, col.row.id, ids)
        docs = [Document(found[i].doc_id, found[i].text, found[i].metadata) for i in ids if i in found]
        return docs, [i for i in ids if i not in found]

    async def delete_documents(self, name: str, ids: list[str]) -> WriteResult:
        col = self._get(name)
        validation.ids(ids, self.settings)
        return await self._write(self._commit_delete, col, ids)

    def _commit_delete(self, col: _Collection, ids: list[str]) -> WriteResult:
        if self._collections.get(col.row.name) is not col:
            raise NotFound(f"collection {col.row.name!r} was deleted")
        generation, keys = self.store.delete(col.row.id, ids)
        col.index.remove(np.array(keys, dtype=np.uint64))
        self._maybe_snapshot(col, len(keys), generation)
        unique = len(dict.fromkeys(ids))
        return WriteResult(generation, len(keys), unique - len(keys))

    # -- search ----------------------------------------------------------------------------------
    async def search(self, query: SearchQuery, timeout_s: float | None = None) -> SearchResult:
        """Retrieve, then re-rank as the settings ask. `timeout_s`: time left before the caller's deadline."""
        started = time.perf_counter()
        top_k = validation.search(query, self.settings)
        col = self._get(query.collection)
        settings = query.settings.over(col.defaults).over(self.server_defaults)
        self.cascade.check_required(settings, col.row.embedding_model)
        modes = (settings.late_interaction, settings.cross_encoder)
        reranking = any(m not in (StageMode.OFF, StageMode.UNSPECIFIED) for m in modes)
        candidates = max(top_k, settings.retrieve_candidates or 0) if reranking else top_k
        # Re-rankers need the candidates' texts (to recompute evicted token vectors) even if the reply omits them.
        fetch_texts = not query.omit_documents or reranking
        hits, report, generation = await self._run(
            self._pool, self._retrieve, col, query, candidates, settings, fetch_texts
        )
        deadline = (
            None if timeout_s is None else time.monotonic() + timeout_s - (time.perf_counter() - started)
        )
        hits, reranked = await self.cascade.rerank(
            collection_id=col.row.id,
            generation=generation,
            embedding_model=col.row.embedding_model,
            query=query.query,
            hits=hits,
            settings=settings,
            top_k=top_k,
            deadline=deadline,
        )
        stages = [report, *reranked]
        hits = hits[:top_k]
        if query.omit_documents:
            for hit in hits:
                hit.text, hit.metadata = "", {}
        return SearchResult(hits, stages, generation, (time.perf_counter() - started) * 1000)

    def _retrieve(
        self, col: _Collection, query: SearchQuery, count: int, settings: SearchSettings, with_text: bool
    ) -> tuple[list[Hit], StageReport, int]:
        started = time.perf_counter()
        generation = col.visible_generation  # every write up to here is in the index
        vector = self._query_vector(col, query.query)
        if query.filter:
            keys, scores, method, seen = self._filtered_search(col, vector, query, count, settings)
        elif len(col.index) <= self.settings.full_scan_max:
            keys, scores = col.index.search_all(vector, count)
            method, seen = "exact", len(col.index)
        else:
            keys, scores = col.index.search(vector, count, settings.ef_search)
            method, seen = "hnsw", len(col.index)
        docs = self.store.documents_by_keys(col.row.id, keys.tolist(), with_text=with_text)
        hits: list[Hit] = []
        for key, score in zip(keys.tolist(), scores.tolist(), strict=True):
            doc = docs.get(key)
            if doc is None:  # removed between the index search and the lookup
                continue
            hits.append(
                Hit(doc.doc_id, score, doc.text, doc.metadata, [StageScore(Stage.RETRIEVE, score, len(hits))])
            )
        report = StageReport(
            Stage.RETRIEVE,
            StageStatus.COMPLETED,
            candidates_in=seen,
            candidates_out=len(hits),
            took_ms=(time.perf_counter() - started) * 1000,
            model_id=col.runner.model_id,
            method=method,
        )
        return hits, report, generation

    def _query_vector(self, col: _Collection, text: str) -> np.ndarray:
        """The query's embedding, from the Redis cache when this model has embedded it before."""
        key = query_vector_key(col.runner.manifest.cache_id, text)
        vector = self.cache.get_vector(key, col.runner.dims)
        if vector is None:
            vector = col.runner.embed([text])[0]
            self.cache.put_vector(key, vector)
        return vector

    def _filtered_search(
        self, col: _Collection, vector: np.ndarray, query: SearchQuery, count: int, settings: SearchSettings
    ) -> tuple[np.ndarray, np.ndarray, str, int]:
        """True top-k among matching documents: exact when the filter is selective, else a widening HNSW walk."""
        allowed = self.store.filter_keys(col.row.id, query.filter)
        if len(allowed) <= self.settings.exact_filter_max:
            keys, scores = col.index.search_exact(vector, allowed, count)
            return keys, scores, "exact", len(allowed)
        total = max(len(col.index), 1)
        # Expect len(allowed)/total of the graph's neighbours to match; ask for twice what that needs.
        want = min(total, max(count * 2 * total // len(allowed), count))
        while True:
            keys, scores = col.index.search(vector, want, max(settings.ef_search or 0, want))
            keep = np.isin(keys, allowed)
            if keep.sum() >= count or want >= total:
                return keys[keep][:count], scores[keep][:count], "hnsw+filter", len(allowed)
            want = min(total, want * 2)
