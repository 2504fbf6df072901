"""Reading the store: documents by id or key, metadata filters, and the changes the derived indexes
(vectors, full text) apply to catch up from a snapshot's generation."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from server.storage.database import Connection, Database, chunks
from server.storage.records import IndexChanges, StoredDocument, TextChanges
from sieve_core.contracts import content_hash
from sieve_core.types import Condition, Document


class DocumentReads(Database):
    @staticmethod
    def _existing(conn: Connection, collection_id: int, ids: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        out: dict[str, tuple[int, bytes]] = {}
        for chunk in chunks(list(dict.fromkeys(ids)), 500):
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
        for chunk in chunks(list(dict.fromkeys(ids)), 500):
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
        for chunk in chunks([int(k) for k in keys], 500):
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
        for rows in self._batches(
            "SELECT key, vector FROM documents WHERE collection_id = ? AND generation > ? ORDER BY key",
            (collection_id, generation),
            batch,
        ):
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
        for rows in self._batches(
            "SELECT key, text FROM documents WHERE collection_id = ? AND generation > ? ORDER BY key",
            (collection_id, generation),
            batch,
        ):
            yield TextChanges([(int(k), t) for k, t in rows], [])
