"""What index jobs (server/jobs) may ask of the core: this narrow interface, and nothing else of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sieve_core.types import CollectionInfo, Document, WriteResult


@dataclass(frozen=True)
class IndexTarget:
    """The collection a job writes to, as its embedding needs it."""

    info: CollectionInfo
    # The collection re-ranks by late interaction: the embedding workers also cache the texts' token
    # vectors, from `token_model` (its late-interaction bundle) or, with None, the bi-encoder's own.
    want_tokens: bool
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

    def embed(self, model: str, texts: list[str]) -> np.ndarray:
        """Blocking: the texts' vectors from the server's own runner of `model` (no Redis, no workers)."""
        ...

    async def upsert_embedded(
        self, name: str, docs: list[Document], vectors: dict[str, np.ndarray]
    ) -> WriteResult: ...
