"""Collections: the collections by name, the API on them, and their indexes kept in step with the store.

On start every collection's index is loaded from its latest snapshot and caught up from the store's
change log (server/core/collection_state.py); afterwards the writer thread updates the index after each
committed write and snapshots it now and then (a snapshot only shortens the next start: the store holds
every write).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time

from server.core import validation
from server.core.collection_state import Collection, CollectionFactory, settings_to_json, token_model
from server.core.executors import Executors
from server.core.tokens import BackfillTarget, format_at_creation, storage_info
from server.storage.records import CollectionRow
from server.storage.store import Store
from sieve_core.config import Settings
from sieve_core.errors import AlreadyExists, FailedPrecondition, NotFound, SieveError
from sieve_core.models.registry import ModelRegistry
from sieve_core.types import CollectionInfo, CollectionSpec, SearchSettings, TokenStorageSpec

log = logging.getLogger(__name__)

# A snapshot writes the whole index and holds up the writer thread meanwhile (about 1 s per 100k vectors here),
# so at a fixed SIEVE_SNAPSHOT_EVERY_WRITES its cost per write would grow with the index (quadratic for a bulk
# load: about 20 minutes of snapshots in a 1M load). So one is due after that many changed documents or
# SIEVE_SNAPSHOT_GROWTH of the index, whichever is more, and after SIEVE_SNAPSHOT_INTERVAL_S or SNAPSHOT_PACE
# times the last snapshot's duration, whichever is longer: snapshots stay a bounded share of the writer's time
# however large the index grows, and a restart catches up at most about a tenth of the index (or that long's
# writes) from the store.
SNAPSHOT_PACE = 9.0


class Collections:
    """The collections by name; create, list and delete them; load, update and snapshot their indexes."""

    def __init__(self, settings: Settings, store: Store, models: ModelRegistry, run: Executors) -> None:
        self._settings = settings
        self._store = store
        self._run = run
        self._by_name: dict[str, Collection] = {}
        # Other servers' collections this one cannot take in, and why (warned once per collection and reason).
        self._refused: dict[tuple[str, int], str] = {}
        self.factory = CollectionFactory(settings, store, models)
        self.defaults = self.factory.defaults

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
        runner = self.factory.embedding_runner(model)
        fmt_json, token_model_id = None, None
        if token_storage is not None or defaults.late_interaction.enabled:
            tokens_by = token_model(defaults, self.defaults, model)
            manifest = runner.manifest if tokens_by == model else self.factory.token_manifest(tokens_by)
            fmt = format_at_creation(token_storage, defaults, manifest.dims)
            if fmt is not None:
                fmt_json, token_model_id = json.dumps(fmt.to_json(), sort_keys=True), manifest.model_id
        row = self._store.create_collection(
            name,
            model,
            runner.model_id,
            metric,
            runner.dims,
            settings_to_json(defaults),
            fmt_json,
            token_model_id,
            text_language=language,
        )
        col = self.factory.new(row, runner, defaults, language)
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
        self.find(name)
        self._store.delete_collection(name)  # first: if the disk refuses, the collection stays as it was
        self._forget(name)

    def _forget(self, name: str) -> None:
        col = self._by_name.pop(name)
        if col.fulltext is not None:
            col.fulltext.close()
        shutil.rmtree(col.directory, ignore_errors=True)

    # -- loading (writer thread, at start) ---------------------------------------------------------
    def open(self) -> None:
        """Load the default model and every collection's index (caught up from the store). Blocking."""
        try:
            self.factory.embedding_runner(self._settings.default_embedding_model)
        except FailedPrecondition:
            log.warning("default embedding model %r is not available", self._settings.default_embedding_model)
        for row in self._store.list_collections():
            self._by_name[row.name] = self.factory.load(row)

    def close(self) -> None:
        """Commit and release the full-text indexes (at shutdown, on the writer thread)."""
        for col in self._by_name.values():
            if col.fulltext is not None:
                col.fulltext.close()

    # -- other servers' writes (writer thread; server/core/follower.py) ---------------------------
    def sync(self, rows: list[CollectionRow]) -> None:
        """Take in what other servers sharing the store committed: the collections they created or deleted,
        and their writes (each index caught up to its row's generation)."""
        current = {row.name: row for row in rows}
        for name, col in list(self._by_name.items()):
            if name not in current or current[name].id != col.row.id:
                self._forget(name)
        for row in rows:
            known = self._by_name.get(row.name)
            try:
                if known is None:
                    self._by_name[row.name] = self.factory.load(row)
                elif row.generation > known.visible_generation:
                    applied = self.factory.catch_up(known, known.visible_generation, row)
                    known.visible_generation = row.generation
                    self.published(known, applied, row.generation)
            except SieveError as exc:  # e.g. its model is not on this server: the others still catch up
                if self._refused.get((row.name, row.id)) != exc.message:  # not again at every poll
                    log.warning(
                        "collection %r written by another server: not taken in: %s (tried again at each "
                        "change; said again only if the reason changes)",
                        row.name,
                        exc.message,
                    )
                self._refused[(row.name, row.id)] = exc.message
            else:
                self._refused.pop((row.name, row.id), None)
        self._refused = {key: why for key, why in self._refused.items() if key[0] in current}

    # -- snapshots (writer thread) -----------------------------------------------------------------
    def published(self, col: Collection, changed: int, generation: int) -> None:
        """The index now shows `generation`: make that visible to searches; snapshot it if one is due (enough
        changed documents, or time, since the last one: see SNAPSHOT_PACE)."""
        if generation > col.visible_generation + 1:
            # Another server wrote to the collection since this index was last caught up (a shared store):
            # its writes go in too before `generation` is shown (this write is applied again, harmlessly).
            changed += self.factory.catch_up(
                col, col.visible_generation, self._store.get_collection(col.row.name)
            )
        col.visible_generation = max(generation, col.visible_generation)
        col.unsnapshotted_writes += changed
        elapsed = time.monotonic() - col.last_snapshot
        due = col.unsnapshotted_writes >= max(
            self._settings.snapshot_every_writes, self._settings.snapshot_growth * len(col.index)
        ) or elapsed >= max(self._settings.snapshot_interval_s, SNAPSHOT_PACE * col.snapshot_took_s)
        if due and time.monotonic() >= col.snapshot_retry_at:
            self._snapshot(col, generation)

    def snapshot_all(self) -> None:
        for col in self._by_name.values():
            if col.visible_generation != col.snapshot_generation:
                self._snapshot(col, col.visible_generation)

    def _snapshot(self, col: Collection, generation: int) -> None:
        started = time.monotonic()
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
        col.snapshot_took_s = col.last_snapshot - started
        if col.snapshot_took_s >= 1.0:
            log.info(
                "collection %r: index snapshot at generation %d (%d vectors) took %.1f s",
                col.row.name,
                generation,
                len(col.index),
                col.snapshot_took_s,
            )
        try:
            self._store.prune_tombstones(col.row.id, generation)
        except (OSError, sqlite3.Error) as exc:  # harmless: the next snapshot prunes them
            log.warning("collection %r: tombstones not pruned: %s", col.row.name, exc)
