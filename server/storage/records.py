"""The store's row types: what the store hands the engine and the derived indexes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


@dataclass(frozen=True)
class PendingDocument:
    """A document whose token vectors are not stored yet."""

    key: int
    doc_id: str
    text: str


@dataclass(frozen=True)
class TextChanges:
    """What a full-text index at some generation must apply to reach the store's state (a batch of it)."""

    added: list[tuple[int, str]]  # (key, text)
    removed: list[int]
