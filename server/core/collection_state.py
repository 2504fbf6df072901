"""A collection's in-memory state (index, full text, runner, defaults, token plan) and how it is made:
new at creation, or at start from its latest index snapshot caught up from the store's change log."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.core import validation
from server.core.tokens import TokenPlan, plan_from
from server.storage.fulltext import FullTextIndex, open_fulltext
from server.storage.index import VectorIndex
from server.storage.records import CollectionRow
from server.storage.store import Store
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.models.bundle import BundleError, BundleManifest
from sieve_core.models.registry import TOKEN_VECTORS, ModelKindError, ModelRegistry
from sieve_core.token_format import DEFAULT_TOKEN_FORMAT, compress_many
from sieve_core.types import FusionMethod, RetrievalMode, SearchSettings, SearchTier, StageMode

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
    snapshot_took_s: float = 0.0  # how long the last snapshot took: paces the next (Collections.published)
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


def settings_to_json(s: SearchSettings) -> str:
    # Enums as their ints; dense_weight stays a float.
    return json.dumps(
        {k: v if v is None or isinstance(v, str | float) else int(v) for k, v in asdict(s).items()}
    )


def settings_from_json(text: str) -> SearchSettings:
    raw = json.loads(text)
    for mode in ("late_interaction", "cross_encoder"):
        raw[mode] = StageMode(raw.get(mode, 0))
    raw["tier"] = SearchTier(raw.get("tier", 0))  # collections made before tiers have none
    raw["retrieval"] = RetrievalMode(raw.get("retrieval", 0))  # absent in collections made before hybrid
    raw["fusion"] = FusionMethod(raw.get("fusion", 0))
    return SearchSettings(**raw)


class CollectionFactory:
    """Makes the Collection objects: resolves their runners and token plans, loads and catches up their
    indexes. The one place that knows where a collection's files are."""

    def __init__(self, settings: Settings, store: Store, models: ModelRegistry) -> None:
        self._settings = settings
        self._store = store
        self._models = models
        self.defaults = server_defaults(settings)

    def new(
        self, row: CollectionRow, runner: BiEncoderRunner, defaults: SearchSettings, language: str
    ) -> Collection:
        """The in-memory state of a collection just created in the store (empty index and full text)."""
        directory = self.directory(row)
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of an earlier collection with this row id
        col = Collection(row, self.new_index(row), runner, defaults, directory)
        col.fulltext = self.open_text_index(row, language)
        col.tokens = self.token_plan(row, runner, defaults)
        return col

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

    def token_plan(
        self, row: CollectionRow, runner: BiEncoderRunner, defaults: SearchSettings
    ) -> TokenPlan | None:
        """The collection's TokenPlan from its row and today's settings; None if it stores no token vectors
        or their model is not available here (late interaction then degrades, saying so)."""
        if row.token_format is None:
            return None
        name = token_model(defaults, self.defaults, row.embedding_model)
        try:
            manifest = runner.manifest if name == row.embedding_model else self.token_manifest(name)
        except FailedPrecondition as exc:
            log.warning("collection %r: no late interaction: %s", row.name, exc.message)
            return None
        return plan_from(row, name, manifest, zero_shot=name == row.embedding_model)

    def token_manifest(self, name: str) -> BundleManifest:
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

    def directory(self, row: CollectionRow) -> Path:
        return self._settings.data_dir / "collections" / str(row.id)

    def load(self, row: CollectionRow) -> Collection:
        runner = self.embedding_runner(row.embedding_model)
        directory = self.directory(row)
        started = time.monotonic()
        loaded = VectorIndex.load_latest(
            directory,
            row.dims,
            row.metric,
            ef_search=self._settings.default_ef_search,
            storage=self._settings.index_storage,
        )
        index, snap_gen = loaded if loaded is not None else (self.new_index(row), 0)
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
            index, snap_gen = self.new_index(row), 0
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
        defaults = settings_from_json(row.defaults_json)
        col = Collection(row, index, runner, defaults, directory, snap_gen)
        col.fulltext = self.open_text_index(row, self._store.text_language(row.id))
        col.visible_generation = row.generation
        col.unsnapshotted_writes = applied
        col.tokens = self._load_tokens(row, runner, defaults)
        return col

    def catch_up(self, col: Collection, since: int, row: CollectionRow) -> int:
        """Applies the store's changes after generation `since` to the collection's indexes (writes another
        server committed), up to `row` (read before the changes: later ones may come too, and come again at
        the next catch-up, which applies them harmlessly twice). Returns the keys applied."""
        applied = 0
        for change in self._store.changes_since(row.id, since, row.dims):
            col.index.remove(change.removed_keys)
            col.index.add(change.added_keys, change.added_vectors)
            applied += len(change.removed_keys) + len(change.added_keys)
        if col.fulltext is not None:  # staged like a local write's: the next lexical search commits them
            for text in self._store.text_changes_since(row.id, since):
                col.fulltext.apply(text.added, text.removed, row.generation)
        col.row = row
        return applied

    def open_text_index(self, row: CollectionRow, language: str) -> FullTextIndex:
        """The collection's full-text index at the store's generation: caught up, or rebuilt from the store."""
        return open_fulltext(
            self.directory(row) / "fulltext",
            language,
            lambda generation: self._store.text_changes_since(row.id, generation),
            row.generation,
            row.doc_count,
            row.name,
        )

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
        plan = self.token_plan(row, runner, defaults)
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

    def new_index(self, row: CollectionRow) -> VectorIndex:
        return VectorIndex(
            row.dims,
            row.metric,
            connectivity=self._settings.hnsw_connectivity,
            ef_construction=self._settings.hnsw_ef_construction,
            ef_search=self._settings.default_ef_search,
            storage=self._settings.index_storage,
        )
