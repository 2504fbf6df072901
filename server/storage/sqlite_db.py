"""The store's SQLite file: schema, migrations, connections, transactions and space.

Every write is one transaction (BEGIN IMMEDIATE under one write lock) committed with synchronous=FULL
before it is acknowledged, so an acknowledged write survives `kill -9` (and a power cut, as far as the
disk's fsync is honest). A write the disk refuses (full, or remounted read-only after an error) is rolled
back as a whole. A read-only data directory at start is refused.

Space: new stores use `auto_vacuum=INCREMENTAL`, and `compact()` returns the pages freed by deleted
or replaced token rows to the file system (`PRAGMA incremental_vacuum`). A store created before that
(auto_vacuum NONE) reuses freed pages but never shrinks; the log says so once, and a one-off `VACUUM`
with the server stopped converts it.

One writer (the server's write thread) and any number of reader threads, each with its own connection.
The store's logic on top is shared with the PostgreSQL backend (server/storage/database.py).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from server.storage.database import Database, Transaction
from sieve_core.errors import FailedPrecondition, is_read_only

log = logging.getLogger(__name__)

# Pages (4 KB) that may sit free before `compact()` bothers: ~4 MB, a few hundred SciFact documents'
# token vectors; below it the next writes reuse them anyway.
COMPACT_MIN_FREE_PAGES = 1024
MMAP_BYTES = 8 << 30  # PRAGMA mmap_size of each connection (see _conn)

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

# Columns added after the first release: (name, declaration) for ALTER TABLE on an older store.
_ADDED_COLUMNS = (
    ("token_format", "TEXT"),
    ("token_model_id", "TEXT"),
    ("token_count", "INTEGER NOT NULL DEFAULT 0"),
)


class SqliteDatabase(Database):
    """One SQLite file in WAL mode: a connection per thread, one writer at a time."""

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
            # Reads through a memory map: a late-interaction search reads ~100 token blobs of ~23 KB, each
            # spread over overflow pages (with this and MaxSim's chunked unpacking its stage went from 5.5
            # to 4.6 ms: bench/late_overhead.py --baseline at dde2c40). SQLite caps the size at its
            # compile-time maximum; beyond the mapped part it reads as before.
            conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
            self._local.conn = conn
        return conn

    def _transaction(self, collection_id: int | None = None) -> Transaction:
        return SqliteTransaction(self._conn(), self._write_lock)  # the file has one writer at a time anyway

    def _batches(self, sql: str, params: Sequence[object], size: int) -> Iterator[list[Any]]:
        cursor = self._conn().execute(sql, params)
        while rows := cursor.fetchmany(size):
            yield rows

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

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


class SqliteTransaction(Transaction):
    """BEGIN IMMEDIATE: SQLite takes its write lock at once, not at the first write."""

    conn: sqlite3.Connection

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def rollback(self) -> None:
        # After SQLITE_FULL or an I/O error SQLite may already have rolled the transaction back itself;
        # a second ROLLBACK would fail and hide the error that matters.
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
