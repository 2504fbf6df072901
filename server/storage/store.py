"""The durable document store: SQLite in WAL mode, the source of truth for a server's collections.

Ids, texts, metadata and vectors live here; the vector index is derived from it. Every write is one
transaction committed with synchronous=FULL before it is acknowledged, so an acknowledged write
survives `kill -9` (and a power cut, as far as the disk's fsync is honest). A write the disk refuses
(full, or remounted read-only after an error) is rolled back as a whole; the engine turns the error into
the client's status with sieve_core.errors.storage_error. A read-only data directory at start is refused.

Each stored version of a document gets a fresh integer `key` (the vector index's label), and a
replaced or deleted key is recorded as a tombstone with the generation that retired it. An index
snapshot taken at generation G is caught up by adding documents written after G and removing
tombstones after G; see server/storage/index.py.

Token vectors (late interaction) live in the `tokens` table of the same file: one blob per document key
(sieve_core/token_format.py's compressed format, self-describing), written in the same transaction as the
document row when the caller has them (zero-shot: the encoder pass that made the vector made them), so
an acknowledged write has its token vectors, and a replaced or deleted key loses its row in the same
transaction. A document of a collection that stores token vectors but has no row yet is *pending*
(a separate ColBERT bundle computes them on the workers, after the write): `token_count` on the
collection row counts the rows, so pending = doc_count - token_count costs nothing to report, and
`pending_tokens` lists them. The collection's token format and the model that made its vectors are
recorded on its row (`token_format`, JSON; NULL = the collection stores none).

Space: new stores use `auto_vacuum=INCREMENTAL`, and `compact()` returns the pages freed by deleted
or replaced token rows to the file system (`PRAGMA incremental_vacuum`). A store created before that
(auto_vacuum NONE) reuses freed pages but never shrinks; the log says so once, and a one-off `VACUUM`
with the server stopped converts it.

One writer (the server's write thread) and any number of reader threads, each with its own connection.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sieve_core.contracts import content_hash
from sieve_core.errors import AlreadyExists, FailedPrecondition, NotFound, is_read_only
from sieve_core.types import Condition, Document

log = logging.getLogger(__name__)

# Pages (4 KB) that may sit free before `compact()` bothers: ~4 MB, a few hundred SciFact documents'
# token vectors; below it the next writes reuse them anyway.
COMPACT_MIN_FREE_PAGES = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    embedding_model TEXT NOT NULL,
    embedding_model_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    dims INTEGER NOT NULL,
    defaults_json TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    doc_count INTEGER NOT NULL DEFAULT 0,
    next_key INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    token_format TEXT,
    token_model_id TEXT,
    token_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    collection_id INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    key INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    content_hash BLOB NOT NULL,
    vector BLOB NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (collection_id, doc_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS documents_by_key ON documents (collection_id, key);
CREATE INDEX IF NOT EXISTS documents_by_generation ON documents (collection_id, generation);
CREATE TABLE IF NOT EXISTS doc_meta (
    collection_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    key INTEGER NOT NULL,
    PRIMARY KEY (collection_id, name, value, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS doc_meta_by_key ON doc_meta (collection_id, key);
-- Blobs of ~10-90 KB: a rowid table (WITHOUT ROWID suits small rows only), found by (collection, key).
CREATE TABLE IF NOT EXISTS tokens (
    collection_id INTEGER NOT NULL,
    key INTEGER NOT NULL,
    blob BLOB NOT NULL,
    UNIQUE (collection_id, key)
);
-- The full-text index's analyzer language per collection (a table of its own: older stores gain it as is).
CREATE TABLE IF NOT EXISTS collection_text (
    collection_id INTEGER PRIMARY KEY,
    language TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
    collection_id INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    key INTEGER NOT NULL,
    PRIMARY KEY (collection_id, generation, key)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class CollectionRow:
    id: int
    name: str
    embedding_model: str
    embedding_model_id: str
    metric: str
    dims: int
    defaults_json: str
    generation: int
    doc_count: int
    created_at: float
    token_format: str | None = None  # JSON of sieve_core.token_format.TokenFormat; None: no token vectors
    token_model_id: str | None = None  # name@revision of the model whose token vectors are stored
    token_count: int = 0  # documents that have their token vectors (the rest are pending)

    @property
    def tokens_pending(self) -> int:
        return self.doc_count - self.token_count if self.token_format is not None else 0


@dataclass(frozen=True)
class StoredDocument:
    doc_id: str
    key: int
    text: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class IndexChanges:
    """What an index snapshot at some generation must apply to reach the store's state."""

    added_keys: np.ndarray  # uint64
    added_vectors: np.ndarray  # float32 (n, dims)
    removed_keys: np.ndarray  # uint64


@dataclass(frozen=True)
class UpsertOutcome:
    generation: int
    added: list[tuple[int, np.ndarray]]  # new (key, vector) pairs for the index
    removed: list[int]  # keys to drop from the index
    missing_vectors: list[str]  # ids whose text changed but no vector was supplied (retry with them)
    added_ids: list[str] = field(default_factory=list)  # the document id of each `added` pair, in order


_COLLECTION_COLUMNS = (
    "id, name, embedding_model, embedding_model_id, metric, dims, defaults_json, generation, doc_count,"
    " created_at, token_format, token_model_id, token_count"
)
# Columns added after the first release: (name, declaration) for ALTER TABLE on an older store.
_ADDED_COLUMNS = (
    ("token_format", "TEXT"),
    ("token_model_id", "TEXT"),
    ("token_count", "INTEGER NOT NULL DEFAULT 0"),
)


@dataclass(frozen=True)
class PendingDocument:
    """A document whose token vectors are not stored yet."""

    key: int
    doc_id: str
    text: str


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            read_only = is_read_only(path.parent)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            read_only = True
        if read_only:
            # SQLite would fail with "unable to open database file"; serving read-only is not offered.
            raise FailedPrecondition(
                f"data directory {path.parent} is on a read-only file system: the server keeps its document"
                " store there and needs to write it; mount it read-write or point SIEVE_DATA_DIR elsewhere"
            )
        self._local = threading.local()
        self._write_lock = threading.Lock()
        if not path.exists() or path.stat().st_size == 0:
            # auto_vacuum can only be chosen before the first page is written (switching to WAL writes
            # one), so a new store gets it on a plain connection first; later it takes a full VACUUM.
            first = sqlite3.connect(path, isolation_level=None)
            try:
                first.execute("PRAGMA auto_vacuum=INCREMENTAL")
                first.executescript(SCHEMA)
            finally:
                first.close()
        conn = self._conn()
        with conn:
            conn.executescript(SCHEMA)
        self._migrate(conn)
        self.incremental_vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        if not self.incremental_vacuum:
            log.warning(
                "store %s was created without incremental auto-vacuum: space freed by deleted documents and "
                "token vectors is reused but the file never shrinks; to convert it once, stop the server and "
                "run: sqlite3 %s 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'",
                path,
                path,
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Adds the columns a store from an earlier version lacks (their defaults: no token vectors)."""
        have = {row[1] for row in conn.execute("PRAGMA table_info(collections)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE collections ADD COLUMN {name} {declaration}")
                log.info("store %s: added column collections.%s", self.path, name)

    # -- connections -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn(), self._write_lock)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- collections ---------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        embedding_model: str,
        embedding_model_id: str,
        metric: str,
        dims: int,
        defaults_json: str,
        token_format: str | None = None,
        token_model_id: str | None = None,
        text_language: str = "english",
    ) -> CollectionRow:
        """`token_format` (JSON) given: the collection stores its documents' token vectors."""
        with self._transaction() as conn:
            try:
                cursor = conn.execute(
                    "INSERT INTO collections (name, embedding_model, embedding_model_id, metric, dims,"
                    " defaults_json, created_at, token_format, token_model_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        embedding_model,
                        embedding_model_id,
                        metric,
                        dims,
                        defaults_json,
                        time.time(),
                        token_format,
                        token_model_id,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"collection {name!r} already exists") from None
            conn.execute(
                "INSERT OR REPLACE INTO collection_text (collection_id, language) VALUES (?, ?)",
                (cursor.lastrowid, text_language),
            )
        return self.get_collection(name)

    def get_collection(self, name: str) -> CollectionRow:
        row = (
            self._conn()
            .execute(f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None:
            raise NotFound(f"collection {name!r} does not exist")
        return CollectionRow(*row)

    def text_language(self, collection_id: int) -> str:
        """The collection's full-text analyzer language (English for a collection made before there was one)."""
        row = (
            self._conn()
            .execute("SELECT language FROM collection_text WHERE collection_id = ?", (collection_id,))
            .fetchone()
        )
        return "english" if row is None else str(row[0])

    def list_collections(self) -> list[CollectionRow]:
        rows = self._conn().execute(f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY name").fetchall()
        return [CollectionRow(*row) for row in rows]

    def delete_collection(self, name: str) -> CollectionRow:
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"collection {name!r} does not exist")
            cid = row[0]
            for table in ("documents", "doc_meta", "tombstones", "tokens", "collection_text"):
                conn.execute(f"DELETE FROM {table} WHERE collection_id = ?", (cid,))
            conn.execute("DELETE FROM collections WHERE id = ?", (cid,))
        return CollectionRow(*row)

    # -- writes ----------------------------------------------------------------------------------
    def upsert(
        self,
        collection_id: int,
        docs: Sequence[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes] | None = None,
    ) -> UpsertOutcome:
        """Write a batch atomically. `vectors` holds a vector for every id whose text is new or changed.

        A document whose text is unchanged keeps its key and vector (only its metadata is replaced).
        If a text changed after the caller decided what to embed, nothing is written and the ids are
        returned in `missing_vectors` so the caller can embed them and call again.

        `tokens`: token-vector blobs by id, from the same encoder pass as `vectors`, stored under the
        document's key in the same transaction (an unchanged document without a row gets it too). A
        replaced document's old row goes with its old key.
        """
        tokens = tokens or {}
        with self._transaction() as conn:
            existing = self._existing(conn, collection_id, [d.id for d in docs])
            missing = [
                d.id
                for d in docs
                if d.id not in vectors and (d.id not in existing or existing[d.id][1] != content_hash(d.text))
            ]
            if missing:
                conn.rollback_on_exit = True
                return UpsertOutcome(0, [], [], missing)
            generation, next_key = conn.execute(
                "SELECT generation, next_key FROM collections WHERE id = ?", (collection_id,)
            ).fetchone()
            generation += 1
            added: list[tuple[int, np.ndarray]] = []
            added_ids: list[str] = []
            removed: list[int] = []
            new_docs = 0
            token_delta = 0
            for doc in docs:
                old = existing.get(doc.id)
                digest = content_hash(doc.text)
                meta_json = json.dumps(doc.metadata, sort_keys=True, ensure_ascii=False)
                if old is not None:
                    conn.execute(
                        "DELETE FROM doc_meta WHERE collection_id = ? AND key = ?", (collection_id, old[0])
                    )
                if old is not None and old[1] == digest:
                    key = old[0]  # same text: same vector, same key; metadata only
                    conn.execute(
                        "UPDATE documents SET metadata_json = ?, generation = ? WHERE collection_id = ? AND doc_id = ?",
                        (meta_json, generation, collection_id, doc.id),
                    )
                    if doc.id in tokens:  # fills a pending row; an existing one stays (same text)
                        token_delta += conn.execute(
                            "INSERT OR IGNORE INTO tokens (collection_id, key, blob) VALUES (?, ?, ?)",
                            (collection_id, key, tokens[doc.id]),
                        ).rowcount
                else:
                    key = next_key
                    next_key += 1
                    vec = np.ascontiguousarray(vectors[doc.id], dtype=np.float32)
                    conn.execute(
                        "INSERT OR REPLACE INTO documents (collection_id, doc_id, key, text, metadata_json,"
                        " content_hash, vector, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (collection_id, doc.id, key, doc.text, meta_json, digest, vec.tobytes(), generation),
                    )
                    added.append((key, vec))
                    added_ids.append(doc.id)
                    if doc.id in tokens:
                        conn.execute(
                            "INSERT INTO tokens (collection_id, key, blob) VALUES (?, ?, ?)",
                            (collection_id, key, tokens[doc.id]),
                        )
                        token_delta += 1
                    if old is None:
                        new_docs += 1
                    else:
                        removed.append(old[0])
                        token_delta -= conn.execute(
                            "DELETE FROM tokens WHERE collection_id = ? AND key = ?", (collection_id, old[0])
                        ).rowcount
                        conn.execute(
                            "INSERT INTO tombstones (collection_id, generation, key) VALUES (?, ?, ?)",
                            (collection_id, generation, old[0]),
                        )
                conn.executemany(
                    "INSERT INTO doc_meta (collection_id, name, value, key) VALUES (?, ?, ?, ?)",
                    [(collection_id, k, v, key) for k, v in doc.metadata.items()],
                )
            conn.execute(
                "UPDATE collections SET generation = ?, next_key = ?, doc_count = doc_count + ?,"
                " token_count = token_count + ? WHERE id = ?",
                (generation, next_key, new_docs, token_delta, collection_id),
            )
        return UpsertOutcome(generation, added, removed, [], added_ids)

    def delete(self, collection_id: int, ids: Sequence[str]) -> tuple[int, list[int]]:
        """Delete documents by id. Returns (generation, removed keys)."""
        with self._transaction() as conn:
            existing = self._existing(conn, collection_id, ids)
            generation = (
                conn.execute("SELECT generation FROM collections WHERE id = ?", (collection_id,)).fetchone()[
                    0
                ]
                + 1
            )
            keys = [existing[i][0] for i in dict.fromkeys(ids) if i in existing]
            for doc_id in existing:
                conn.execute(
                    "DELETE FROM documents WHERE collection_id = ? AND doc_id = ?", (collection_id, doc_id)
                )
            conn.executemany(
                "DELETE FROM doc_meta WHERE collection_id = ? AND key = ?", [(collection_id, k) for k in keys]
            )
            conn.executemany(
                "INSERT INTO tombstones (collection_id, generation, key) VALUES (?, ?, ?)",
                [(collection_id, generation, k) for k in keys],
            )
            dropped = 0
            for chunk in _chunks(keys, 500):
                marks = ",".join("?" * len(chunk))
                dropped += conn.execute(
                    f"DELETE FROM tokens WHERE collection_id = ? AND key IN ({marks})",
                    (collection_id, *chunk),
                ).rowcount
            conn.execute(
                "UPDATE collections SET generation = ?, doc_count = doc_count - ?, token_count = token_count - ?"
                " WHERE id = ?",
                (generation, len(keys), dropped, collection_id),
            )
        return generation, keys

    def prune_tombstones(self, collection_id: int, up_to_generation: int) -> None:
        """Tombstones at or below a snapshot's generation are no longer needed to catch it up."""
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM tombstones WHERE collection_id = ? AND generation <= ?",
                (collection_id, up_to_generation),
            )

    # -- token vectors ---------------------------------------------------------------------------
    def put_tokens(self, collection_id: int, blobs: dict[int, bytes]) -> int:
        """Stores token blobs computed after the write (pending documents), in one transaction.

        A key is one version of one text, never reused, so a blob computed from the text of key k is right
        for k whenever it arrives; a key deleted or replaced meanwhile is skipped. Returns rows written.
        """
        written = 0
        with self._transaction() as conn:
            for key, blob in blobs.items():
                written += conn.execute(
                    "INSERT OR IGNORE INTO tokens (collection_id, key, blob) SELECT ?, ?, ?"
                    " WHERE EXISTS (SELECT 1 FROM documents INDEXED BY documents_by_key"
                    " WHERE collection_id = ? AND key = ?)",
                    (collection_id, int(key), blob, collection_id, int(key)),
                ).rowcount
            conn.execute(
                "UPDATE collections SET token_count = token_count + ? WHERE id = ?", (written, collection_id)
            )
        return written

    def set_token_storage(
        self, collection_id: int, token_format: str | None, token_model_id: str | None
    ) -> int:
        """Records a collection's token format and model; if either changed, its stored token vectors no
        longer match and are dropped (every document becomes pending). Returns the rows dropped."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT token_format, token_model_id FROM collections WHERE id = ?", (collection_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"collection {collection_id} does not exist")
            if tuple(row) == (token_format, token_model_id):
                return 0
            dropped = conn.execute("DELETE FROM tokens WHERE collection_id = ?", (collection_id,)).rowcount
            conn.execute(
                "UPDATE collections SET token_format = ?, token_model_id = ?, token_count = 0 WHERE id = ?",
                (token_format, token_model_id, collection_id),
            )
        return dropped

    def token_blobs(self, collection_id: int, keys: Sequence[int]) -> dict[int, bytes]:
        """The stored token blobs of these keys (a key without one, pending or deleted, is absent)."""
        out: dict[int, bytes] = {}
        conn = self._conn()
        for chunk in _chunks([int(k) for k in keys], 500):
            marks = ",".join("?" * len(chunk))
            for key, blob in conn.execute(
                f"SELECT key, blob FROM tokens WHERE collection_id = ? AND key IN ({marks})",
                (collection_id, *chunk),
            ):
                out[key] = blob
        return out

    def pending_tokens(self, collection_id: int, limit: int, after_key: int = 0) -> list[PendingDocument]:
        """Up to `limit` documents without token vectors, by key from `after_key` (exclusive)."""
        rows = self._conn().execute(
            "SELECT d.key, d.doc_id, d.text FROM documents AS d INDEXED BY documents_by_key"
            " WHERE d.collection_id = ? AND d.key > ? AND NOT EXISTS"
            " (SELECT 1 FROM tokens AS t WHERE t.collection_id = d.collection_id AND t.key = d.key)"
            " ORDER BY d.key LIMIT ?",
            (collection_id, int(after_key), int(limit)),
        )
        return [PendingDocument(key, doc_id, text) for key, doc_id, text in rows]

    # -- space -----------------------------------------------------------------------------------
    def free_pages(self) -> int:
        return int(self._conn().execute("PRAGMA freelist_count").fetchone()[0])

    def size_bytes(self) -> int:
        """Bytes the database uses (pages x page size; the WAL and free space on disk aside)."""
        conn = self._conn()
        return int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(
            conn.execute("PRAGMA page_size").fetchone()[0]
        )

    def compact(self, min_free_pages: int = COMPACT_MIN_FREE_PAGES) -> int:
        """Returns free pages (e.g. of deleted token vectors) to the file system once at least
        `min_free_pages` are free. Returns the pages released (0 on a store without incremental vacuum).
        The file itself shrinks at the next WAL checkpoint."""
        if not self.incremental_vacuum or self.free_pages() < min_free_pages:
            return 0
        with self._write_lock:
            conn = self._conn()
            before = self.free_pages()
            # Through executescript, which steps the statement to the end: execute() frees one page per call.
            conn.executescript("PRAGMA incremental_vacuum")
            return before - self.free_pages()

    @staticmethod
    def _existing(
        conn: sqlite3.Connection | _Transaction, collection_id: int, ids: Iterable[str]
    ) -> dict[str, tuple[int, bytes]]:
        out: dict[str, tuple[int, bytes]] = {}
        for chunk in _chunks(list(dict.fromkeys(ids)), 500):
            marks = ",".join("?" * len(chunk))
            for doc_id, key, digest in conn.execute(
                f"SELECT doc_id, key, content_hash FROM documents WHERE collection_id = ? AND doc_id IN ({marks})",
                (collection_id, *chunk),
            ):
                out[doc_id] = (key, digest)
        return out

    # -- reads -----------------------------------------------------------------------------------
    def unchanged_ids(self, collection_id: int, docs: Sequence[Document]) -> set[str]:
        """Ids whose stored text equals the given text (their vectors can be reused)."""
        existing = self._existing(self._conn(), collection_id, [d.id for d in docs])
        return {d.id for d in docs if d.id in existing and existing[d.id][1] == content_hash(d.text)}

    def get_documents(self, collection_id: int, ids: Sequence[str]) -> dict[str, StoredDocument]:
        out: dict[str, StoredDocument] = {}
        for chunk in _chunks(list(dict.fromkeys(ids)), 500):
            marks = ",".join("?" * len(chunk))
            for doc_id, key, text, meta in self._conn().execute(
                f"SELECT doc_id, key, text, metadata_json FROM documents"
                f" WHERE collection_id = ? AND doc_id IN ({marks})",
                (collection_id, *chunk),
            ):
                out[doc_id] = StoredDocument(doc_id, key, text, json.loads(meta))
        return out

    def documents_by_keys(
        self, collection_id: int, keys: Sequence[int], with_text: bool = True
    ) -> dict[int, StoredDocument]:
        out: dict[int, StoredDocument] = {}
        columns = "doc_id, key, text, metadata_json" if with_text else "doc_id, key, '', '{}'"
        for chunk in _chunks([int(k) for k in keys], 500):
            marks = ",".join("?" * len(chunk))
            for doc_id, key, text, meta in self._conn().execute(
                # Without statistics SQLite scans the whole collection through the primary key here.
                f"SELECT {columns} FROM documents INDEXED BY documents_by_key"
                f" WHERE collection_id = ? AND key IN ({marks})",
                (collection_id, *chunk),
            ):
                out[key] = StoredDocument(doc_id, key, text, json.loads(meta))
        return out

    def filter_keys(self, collection_id: int, conditions: Sequence[Condition]) -> np.ndarray:
        """Keys of the documents that satisfy every condition (uint64, sorted)."""
        parts = " INTERSECT ".join(
            "SELECT key FROM doc_meta WHERE collection_id = ? AND name = ? AND value = ?" for _ in conditions
        )
        params: list[object] = []
        for cond in conditions:
            params += [collection_id, cond.key, cond.equals]
        rows = self._conn().execute(parts, params).fetchall()
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.uint64, count=len(rows)))

    def changes_since(
        self, collection_id: int, generation: int, dims: int, batch: int = 10_000
    ) -> Iterator[IndexChanges]:
        """What to apply to an index snapshot taken at `generation`, in batches (removals first)."""
        conn = self._conn()
        removed = np.fromiter(
            (
                r[0]
                for r in conn.execute(
                    "SELECT key FROM tombstones WHERE collection_id = ? AND generation > ?",
                    (collection_id, generation),
                )
            ),
            dtype=np.uint64,
        )
        empty = np.zeros((0, dims), dtype=np.float32)
        yield IndexChanges(np.zeros(0, dtype=np.uint64), empty, removed)
        cursor = conn.execute(
            "SELECT key, vector FROM documents WHERE collection_id = ? AND generation > ? ORDER BY key",
            (collection_id, generation),
        )
        while rows := cursor.fetchmany(batch):
            keys = np.array([r[0] for r in rows], dtype=np.uint64)
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dims)
            yield IndexChanges(keys, vectors, np.zeros(0, dtype=np.uint64))

    def text_changes_since(
        self, collection_id: int, generation: int, batch: int = 5_000
    ) -> Iterator[TextChanges]:
        """What to apply to a full-text index at `generation`, in batches (removals first)."""
        conn = self._conn()
        removed = [
            r[0]
            for r in conn.execute(
                "SELECT key FROM tombstones WHERE collection_id = ? AND generation > ?",
                (collection_id, generation),
            )
        ]
        yield TextChanges([], removed)
        cursor = conn.execute(
            "SELECT key, text FROM documents WHERE collection_id = ? AND generation > ? ORDER BY key",
            (collection_id, generation),
        )
        while rows := cursor.fetchmany(batch):
            yield TextChanges([(int(k), t) for k, t in rows], [])


@dataclass(frozen=True)
class TextChanges:
    """What a full-text index at some generation must apply to reach the store's state (a batch of it)."""

    added: list[tuple[int, str]]  # (key, text)
    removed: list[int]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's write lock; ROLLBACK on an exception."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock
        self.rollback_on_exit = False

    def __enter__(self) -> _Transaction:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, params)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.rollback_on_exit:
                try:
                    self.conn.execute("COMMIT")
                except BaseException:
                    self._rollback()  # e.g. the disk filled up or went read-only while committing
                    raise
            else:
                self._rollback()
        finally:
            self.lock.release()

    def _rollback(self) -> None:
        # After SQLITE_FULL or an I/O error SQLite may already have rolled the transaction back itself;
        # a second ROLLBACK would fail and hide the error that matters.
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
