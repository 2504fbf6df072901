"""What index jobs (server/jobs) may ask of the core: this narrow interface, and nothing else of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sieve_core.token_format import TokenFormat
from sieve_core.types import CollectionInfo, Document, WriteResult


@dataclass(frozen=True)
class IndexTarget:
    """The collection a job writes to, as its embedding needs it."""

    info: CollectionInfo
    # The collection stores token vectors in this format (None: it stores none): the embedding workers
    # return them with the vectors, from `token_model` (its ColBERT bundle) or, with None, the bi-encoder's
    # own from the same encoder pass.
    token_format: TokenFormat | None
    token_model: str | None


class IndexingEngine(Protocol):
    async def get_collection(self, name: str) -> CollectionInfo:
        """The collection's info; NotFound if there is none (e.g. deleted meanwhile)."""
        ...

    async def index_target(self, name: str) -> IndexTarget: ...

    def unchanged_ids(self, collection: str, docs: list[Document]) -> set[str]:
        """Blocking (call it from a thread): the ids whose stored text is already the document's, so that
        a replayed batch needs no vectors for them."""
        ...

    def embed(self, collection: str, texts: list[str]) -> tuple[np.ndarray, list[bytes] | None]:
        """Blocking: the texts' vectors from the server's own runner of the collection's model (no Redis,
        no workers), and the compressed token vectors of the same run when the collection stores the
        bi-encoder's own (zero-shot; else None)."""
        ...

    async def upsert_embedded(
        self,
        name: str,
        docs: list[Document],
        vectors: dict[str, np.ndarray],
        tokens: dict[str, bytes] | None = None,
    ) -> WriteResult: ...
