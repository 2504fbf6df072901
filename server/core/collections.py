"""Collections: their in-memory state (index, runner, defaults), kept in step with the store.

On start every collection's index is loaded from its latest snapshot and caught up from the store's
change log; afterwards the writer thread updates the index after each committed write and snapshots it
now and then (a snapshot only shortens the next start: the store holds every write).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.core import validation
from server.core.executors import Executors
from server.core.tokens import BackfillTarget, TokenPlan, format_at_creation, plan_from, storage_info
from server.storage.fulltext import FullTextIndex, open_fulltext
from server.storage.index import VectorIndex
from server.storage.store import CollectionRow, Store
from sieve_core.config import Settings
from sieve_core.errors import AlreadyExists, FailedPrecondition, NotFound
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.models.bundle import BundleError, BundleManifest
from sieve_core.models.registry import TOKEN_VECTORS, ModelKindError, ModelRegistry
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many
from sieve_core.types import (
    CollectionInfo,
    CollectionSpec,
    FusionMethod,
    RetrievalMode,
    SearchSettings,
    SearchTier,
    StageMode,
    TokenStorageSpec,
)

log = logging.getLogger(__name__)


@dataclass
class Collection:
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
    # BM25 over the documents' texts (lexical and hybrid retrieval), kept in step by the writer thread.
    fulltext: FullTextIndex | None = None
    # How the collection stores its documents' token vectors (late interaction); None: it stores none.
    tokens: TokenPlan | None = None


def server_defaults(settings: Settings) -> SearchSettings:
    """The last level of search settings, under the request's and the collection's."""
    return SearchSettings(
        retrieve_candidates=settings.default_retrieve_candidates,
        ef_search=settings.default_ef_search,
        late_interaction=StageMode.OFF,
        late_interaction_keep=settings.default_top_k,
        cross_encoder=StageMode.OFF,
        cross_encoder_keep=settings.default_top_k,
        late_interaction_model=settings.late_interaction_model,
        cross_encoder_model=settings.cross_encoder_model,
        retrieval=RetrievalMode.DENSE,
        fusion=FusionMethod.RRF,
        rrf_k=settings.default_rrf_k,
        dense_weight=0.5,
    )


def token_model(defaults: SearchSettings, base: SearchSettings, embedding_model: str) -> str:
    """The bundle whose token vectors a collection stores: its late-interaction model (the collection's
    default, else the server's SIEVE_LATE_INTERACTION_MODEL), else its own bi-encoder (zero-shot). The one
    place that decides it."""
    return defaults.over(base).late_interaction_model or embedding_model


def _settings_to_json(s: SearchSettings) -> str:
    # Enums as their ints; dense_weight stays a float.
    return json.dumps(
        {k: v if v is None or isinstance(v, str | float) else int(v) for k, v in asdict(s).items()}
    )


def _settings_from_json(text: str) -> SearchSettings:
    raw = json.loads(text)
    for mode in ("late_interaction", "cross_encoder"):
        raw[mode] = StageMode(raw.get(mode, 0))
    raw["tier"] = SearchTier(raw.get("tier", 0))  # collections made before tiers have none
    raw["retrieval"] = RetrievalMode(raw.get("retrieval", 0))  # absent in collections made before hybrid
    raw["fusion"] = FusionMethod(raw.get("fusion", 0))
    return SearchSettings(**raw)


class Collections:
    """The collections by name; create, list and delete them; load, update and snapshot their indexes."""

    def __init__(self, settings: Settings, store: Store, models: ModelRegistry, run: Executors) -> None:
        self._settings = settings
        self._store = store
        self._models = models
        self._run = run
        self._by_name: dict[str, Collection] = {}
        self.defaults = server_defaults(settings)

    # -- lookups -----------------------------------------------------------------------------------
    def get(self, name: str) -> Collection:
        """The collection of a request's (not yet validated) name; NotFound if there is none."""
        return self.find(validation.collection_name(name))

    def find(self, name: str) -> Collection:
        """The collection of an already validated name; NotFound if there is none."""
        col = self._by_name.get(name)
        if col is None:
            raise NotFound(f"collection {name!r} does not exist")
        return col

    def check_current(self, col: Collection) -> None:
        """On the writer thread, before a write: refuse one to a collection deleted since it was looked up."""
        if self._by_name.get(col.row.name) is not col:
            raise NotFound(f"collection {col.row.name!r} was deleted")

    def is_current(self, col: Collection) -> bool:
        return self._by_name.get(col.row.name) is col

    def embedding_runner(self, name: str) -> BiEncoderRunner:
        """The process's bi-encoder runner of a bundle; FAILED_PRECONDITION saying how to get it if there is none."""
        try:
            return self._models.bi_encoder(name)
        except ModelKindError as exc:
            raise FailedPrecondition(str(exc)) from None
        except BundleError as exc:
            path = self._models.models_dir / name
            raise FailedPrecondition(
                f"embedding model {name!r} is not available on this server ({exc}); export it into "
                f"{self._models.models_dir}/ with `sieve models export bi-encoder --source DIR "
                f"--out {path}` (the default model: `make models`)"
            ) from None

    def token_blobs(self, plan: TokenPlan, texts: list[str]) -> list[bytes]:
        """Documents' compressed token vectors computed in this process (no Redis, so no workers: the
        backfill of pending documents), with the registry's runner of the plan's model."""
        runner = self._models.token_runner(plan.model)
        rows = runner.document_token_vectors(texts, self._settings.embed_batch_size)
        return compress_many(rows, plan.fmt, runner.document_token_offsets(texts))

    def info(self, col: Collection) -> CollectionInfo:
        row = self._store.get_collection(col.row.name)
        return CollectionInfo(
            name=row.name,
            embedding_model=row.embedding_model,
            embedding_model_id=row.embedding_model_id,
            metric=row.metric,
            dimensions=row.dims,
            defaults=col.defaults,
            text_language=col.fulltext.language if col.fulltext is not None else "english",
            document_count=row.doc_count,
            generation=row.generation,
            created_at=row.created_at,
            token_storage=storage_info(row, col.tokens),
        )

    def with_pending_tokens(self) -> list[BackfillTarget]:
        """Collections that store token vectors their documents may still lack (the backfill's targets)."""
        return [
            BackfillTarget(c.row.name, c.row.id, c.tokens)
            for c in self._by_name.values()
            if c.tokens is not None
        ]

    def _token_plan(
        self, row: CollectionRow, runner: BiEncoderRunner, defaults: SearchSettings
    ) -> TokenPlan | None:
        """The collection's TokenPlan from its row and today's settings; None if it stores no token vectors
        or their model is not available here (late interaction then degrades, saying so)."""
        if row.token_format is None:
            return None
        name = token_model(defaults, self.defaults, row.embedding_model)
        try:
            manifest = runner.manifest if name == row.embedding_model else self._token_manifest(name)
        except FailedPrecondition as exc:
            log.warning("collection %r: no late interaction: %s", row.name, exc.message)
            return None
        return plan_from(row, name, manifest, zero_shot=name == row.embedding_model)

    def _token_manifest(self, name: str) -> BundleManifest:
        validation.model_name(name, "late_interaction_model")
        try:
            return self._models.manifest(name, TOKEN_VECTORS)
        except ModelKindError as exc:
            raise FailedPrecondition(str(exc)) from None
        except BundleError as exc:
            raise FailedPrecondition(
                f"late_interaction model {name!r} is not available ({exc}); export one with `sieve models "
                f"export colbert --source CHECKPOINT_DIR --out {self._settings.models_dir}/NAME`"
            ) from None

    # -- the API -----------------------------------------------------------------------------------
    async def create(self, spec: CollectionSpec) -> CollectionInfo:
        name = validation.collection_name(spec.name)
        metric = validation.metric(spec.metric, self._settings)
        defaults = validation.search_settings(spec.defaults, self._settings, "defaults")
        model = validation.model_name(
            spec.embedding_model or self._settings.default_embedding_model, "embedding_model"
        )
        language = validation.text_language(spec.text_language)
        return await self._run.write(
            self._create, name, model, metric, defaults, spec.token_storage, language
        )

    def _create(
        self,
        name: str,
        model: str,
        metric: str,
        defaults: SearchSettings,
        token_storage: TokenStorageSpec | None,
        language: str = "english",
    ) -> CollectionInfo:
        if name in self._by_name:
            raise AlreadyExists(f"collection {name!r} already exists")
        if len(self._by_name) >= self._settings.max_collections:
            raise FailedPrecondition(
                f"this server already holds the maximum of {self._settings.max_collections} collections"
            )
        runner = self.embedding_runner(model)
        fmt_json, token_model_id = None, None
        if token_storage is not None or defaults.late_interaction.enabled:
            tokens_by = token_model(defaults, self.defaults, model)
            manifest = runner.manifest if tokens_by == model else self._token_manifest(tokens_by)
            fmt = format_at_creation(token_storage, defaults, manifest.dims)
            if fmt is not None:
                fmt_json, token_model_id = json.dumps(fmt.to_json(), sort_keys=True), manifest.model_id
        row = self._store.create_collection(
            name,
            model,
            runner.model_id,
            metric,
            runner.dims,
            _settings_to_json(defaults),
            fmt_json,
            token_model_id,
            text_language=language,
        )
        directory = self._directory(row)
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of an earlier collection with this row id
        col = Collection(row, self._new_index(row), runner, defaults, directory)
        col.fulltext = self._open_fulltext(row, language)
        col.tokens = self._token_plan(row, runner, defaults)
        self._by_name[name] = col
        return self.info(col)

    async def describe(self, name: str) -> CollectionInfo:
        col = self.get(name)
        return await self._run.read(self.info, col)

    async def list_infos(self) -> list[CollectionInfo]:
        return await self._run.read(self._infos, list(self._by_name.values()))

    def _infos(self, cols: list[Collection]) -> list[CollectionInfo]:
        out = []
        for col in cols:
            try:
                out.append(self.info(col))
            except NotFound:  # deleted since the list was taken: not an error of the listing
                continue
        return out

    async def delete(self, name: str) -> None:
        self.get(name)
        await self._run.write(self._delete, name)

    def _delete(self, name: str) -> None:
        col = self.find(name)
        self._store.delete_collection(name)  # first: if the disk refuses, the collection stays as it was
        del self._by_name[name]
        if col.fulltext is not None:
            col.fulltext.close()
        shutil.rmtree(col.directory, ignore_errors=True)

    # -- loading (writer thread, at start) ---------------------------------------------------------
    def open(self) -> None:
        """Load the default model and every collection's index (caught up from the store). Blocking."""
        try:
            self.embedding_runner(self._settings.default_embedding_model)
        except FailedPrecondition:
            log.warning("default embedding model %r is not available", self._settings.default_embedding_model)
        for row in self._store.list_collections():
            self._by_name[row.name] = self._load(row)

    def _directory(self, row: CollectionRow) -> Path:
        return self._settings.data_dir / "collections" / str(row.id)

    def _load(self, row: CollectionRow) -> Collection:
        runner = self.embedding_runner(row.embedding_model)
        directory = self._directory(row)
        started = time.monotonic()
        loaded = VectorIndex.load_latest(
            directory,
            row.dims,
            row.metric,
            ef_search=self._settings.default_ef_search,
            storage=self._settings.index_storage,
        )
        index, snap_gen = loaded if loaded is not None else (self._new_index(row), 0)
        applied = 0
        for change in self._store.changes_since(row.id, snap_gen, row.dims):
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
            for change in self._store.changes_since(row.id, 0, row.dims):
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
        defaults = _settings_from_json(row.defaults_json)
        col = Collection(row, index, runner, defaults, directory, snap_gen)
        col.fulltext = self._open_fulltext(row, self._store.text_language(row.id))
        col.visible_generation = row.generation
        col.unsnapshotted_writes = applied
        col.tokens = self._load_tokens(row, runner, defaults)
        return col

    def _open_fulltext(self, row: CollectionRow, language: str) -> FullTextIndex:
        """The collection's full-text index at the store's generation: caught up, or rebuilt from the store."""
        return open_fulltext(
            self._directory(row) / "fulltext",
            language,
            lambda generation: self._store.text_changes_since(row.id, generation),
            row.generation,
            row.doc_count,
            row.name,
        )

    def close(self) -> None:
        """Commit and release the full-text indexes (at shutdown, on the writer thread)."""
        for col in self._by_name.values():
            if col.fulltext is not None:
                col.fulltext.close()

    def _load_tokens(
        self, row: CollectionRow, runner: BiEncoderRunner, defaults: SearchSettings
    ) -> TokenPlan | None:
        """The collection's token plan at start. A collection from before token storage whose defaults ask
        for late interaction gets the default format; one whose token model changed since (e.g. a new
        SIEVE_LATE_INTERACTION_MODEL) drops the old vectors. Either way its documents become pending and
        the backfill computes them: never the query path."""
        if row.token_format is None and defaults.late_interaction.enabled:
            self._store.set_token_storage(
                row.id, json.dumps(DEFAULT_TOKEN_FORMAT.to_json(), sort_keys=True), None
            )
            row = self._store.get_collection(row.name)
        plan = self._token_plan(row, runner, defaults)
        if plan is not None and row.token_model_id is None:  # from before token storage: nothing to drop
            self._store.set_token_storage(row.id, row.token_format, plan.model_id)
            log.info(
                "collection %r: stores %s token vectors (%s) from now on; its %d documents are pending until "
                "the backfill computes them",
                row.name,
                plan.model_id,
                plan.fmt.describe(),
                row.doc_count,
            )
        elif plan is not None and plan.model_id != row.token_model_id:
            dropped = self._store.set_token_storage(row.id, row.token_format, plan.model_id)
            log.warning(
                "collection %r: its token vectors are now %s's (were %s's): %d dropped, all %d documents "
                "pending until the workers compute them",
                row.name,
                plan.model_id,
                row.token_model_id or "none",
                dropped,
                row.doc_count,
            )
        return plan

    def _new_index(self, row: CollectionRow) -> VectorIndex:
        return VectorIndex(
            row.dims,
            row.metric,
            connectivity=self._settings.hnsw_connectivity,
            ef_construction=self._settings.hnsw_ef_construction,
            ef_search=self._settings.default_ef_search,
            storage=self._settings.index_storage,
        )

    # -- snapshots (writer thread) -----------------------------------------------------------------
    def published(self, col: Collection, changed: int, generation: int) -> None:
        """The index now shows `generation`: make that visible to searches; snapshot it if one is due."""
        col.visible_generation = generation
        col.unsnapshotted_writes += changed
        due = (
            col.unsnapshotted_writes >= self._settings.snapshot_every_writes
            or time.monotonic() - col.last_snapshot >= self._settings.snapshot_interval_s
        )
        if due and time.monotonic() >= col.snapshot_retry_at:
            self._snapshot(col, generation)

    def snapshot_all(self) -> None:
        for col in self._by_name.values():
            if col.visible_generation != col.snapshot_generation:
                self._snapshot(col, col.visible_generation)

    def _snapshot(self, col: Collection, generation: int) -> None:
        try:
            if col.fulltext is not None:
                # Tombstones up to the snapshot are pruned below: the full-text index must have them first.
                col.fulltext.flush()
            col.index.save(col.directory, generation)
        except Exception as exc:
            # A snapshot only shortens the next start (the store holds every write): a full or read-only
            # disk must fail neither the write that made it due nor a shutdown. Keep the previous one.
            col.snapshot_retry_at = time.monotonic() + min(self._settings.snapshot_interval_s, 30.0)
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
            self._store.prune_tombstones(col.row.id, generation)
        except (OSError, sqlite3.Error) as exc:  # harmless: the next snapshot prunes them
            log.warning("collection %r: tombstones not pruned: %s", col.row.name, exc)
