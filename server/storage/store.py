"""The durable document store, the source of truth for a server's collections: an SQLite file in WAL mode
(the default) or a PostgreSQL database (SIEVE_STORE_URL), the same logic on either (backends.py
`open_store` picks one).

Ids, texts, metadata and vectors live here; the vector index is derived from it. Every write is one
transaction committed before it is acknowledged (server/storage/sqlite_db.py, postgres_db.py); a write the
disk refuses is rolled back as a whole and the engine turns the error into the client's status with
sieve_core.errors.storage_error.

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

This module holds the collections and the writes; store_reads.py and store_tokens.py the reads and the token
rows, all in SQL both backends accept (server/storage/database.py); sqlite_db.py and postgres_db.py the
backends: schema, connections, transactions, space.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np

from server.storage.database import Connection, chunks
from server.storage.records import CollectionRow, UpsertOutcome
from server.storage.sqlite_db import SqliteDatabase
from server.storage.store_reads import DocumentReads
from server.storage.store_tokens import TokenRows
from sieve_core.contracts import content_hash
from sieve_core.errors import AlreadyExists, NotFound
from sieve_core.types import Document

# A new document, or a new version (new key, text and vector) of one: SQL both backends accept.
_PUT_DOCUMENT = (
    "INSERT INTO documents (collection_id, doc_id, key, text, metadata_json, content_hash, vector, generation)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection_id, doc_id) DO UPDATE SET key = excluded.key,"
    " text = excluded.text, metadata_json = excluded.metadata_json, content_hash = excluded.content_hash,"
    " vector = excluded.vector, generation = excluded.generation"
)
_COLLECTION_COLUMNS = (
    "id, name, embedding_model, embedding_model_id, metric, dims, defaults_json, generation, doc_count,"
    " created_at, token_format, token_model_id, token_count"
)


class Store(TokenRows, DocumentReads):
    """The durable document store (see the module docstring), on a backend: SqliteStore or PostgresStore."""

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
            created = conn.execute(
                "INSERT INTO collections (name, embedding_model, embedding_model_id, metric, dims,"
                " defaults_json, created_at, token_format, token_model_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING RETURNING id",
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
            ).fetchone()
            if created is None:
                raise AlreadyExists(f"collection {name!r} already exists")
            conn.execute(
                "INSERT INTO collection_text (collection_id, language) VALUES (?, ?)"
                " ON CONFLICT (collection_id) DO UPDATE SET language = excluded.language",
                (created[0], text_language),
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
            conn.lock_collection(cid)  # a write to it in progress on another server commits first
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
        with self._transaction(collection_id) as conn:
            existing = self._existing(conn, collection_id, [d.id for d in docs])
            missing = [
                d.id
                for d in docs
                if d.id not in vectors and (d.id not in existing or existing[d.id][1] != content_hash(d.text))
            ]
            if missing:
                conn.rollback_on_exit = True
                return UpsertOutcome(0, [], [], missing)
            generation, next_key = _counters(conn, collection_id)
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
                            "INSERT INTO tokens (collection_id, key, blob) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            (collection_id, key, tokens[doc.id]),
                        ).rowcount
                else:
                    key = next_key
                    next_key += 1
                    vec = np.ascontiguousarray(vectors[doc.id], dtype=np.float32)
                    conn.execute(
                        _PUT_DOCUMENT,
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
        with self._transaction(collection_id) as conn:
            existing = self._existing(conn, collection_id, ids)
            generation = _counters(conn, collection_id)[0] + 1
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
            for chunk in chunks(keys, 500):
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
        with self._transaction(collection_id) as conn:
            conn.execute(
                "DELETE FROM tombstones WHERE collection_id = ? AND generation <= ?",
                (collection_id, up_to_generation),
            )


def _counters(conn: Connection, collection_id: int) -> tuple[int, int]:
    """The collection's (generation, next_key), read in the write's transaction; NOT_FOUND if another server
    sharing the store deleted the collection since this one looked it up."""
    row = conn.execute(
        "SELECT generation, next_key FROM collections WHERE id = ?", (collection_id,)
    ).fetchone()
    if row is None:
        raise NotFound("the collection was deleted (through another server)")
    return int(row[0]), int(row[1])


class SqliteStore(Store, SqliteDatabase):
    """The default store: one SQLite file in the server's data directory (server/storage/sqlite_db.py)."""
