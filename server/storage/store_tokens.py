"""Token vectors (late interaction) in the store's `tokens` table: one blob per document key.

The blob is sieve_core/token_format.py's compressed, self-describing format. Blobs that come with a write
are stored in the write's transaction (server/storage/store.py); these methods store the ones computed
after the write (pending documents of a ColBERT bundle), record a collection's token format, and read
blobs by key for MaxSim.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.storage.database import Database, chunks
from server.storage.records import PendingDocument
from sieve_core.errors import NotFound


class TokenRows(Database):
    def put_tokens(self, collection_id: int, blobs: dict[int, bytes]) -> int:
        """Stores token blobs computed after the write (pending documents), in one transaction.

        A key is one version of one text, never reused, so a blob computed from the text of key k is right
        for k whenever it arrives; a key deleted or replaced meanwhile is skipped. Returns rows written.
        """
        written = 0
        with self._transaction(collection_id) as conn:
            for key, blob in blobs.items():
                written += conn.execute(
                    "INSERT INTO tokens (collection_id, key, blob) SELECT ?, ?, ?"
                    " WHERE EXISTS (SELECT 1 FROM documents INDEXED BY documents_by_key"
                    " WHERE collection_id = ? AND key = ?) ON CONFLICT DO NOTHING",
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
        with self._transaction(collection_id) as conn:
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
        for chunk in chunks([int(k) for k in keys], 500):
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
