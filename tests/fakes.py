"""A fake bi-encoder for unit tests: the runner interface (sieve_core.models.base.Runner) without ONNX.

Texts are embedded as hashed bags of words, so texts sharing words are near each other and a search
finds the document that shares the query's words: deterministic, instant, no model files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from sieve_core.models.bundle import BundleManifest

DIMS = 32


class FakeBiEncoder:
    def __init__(self, name: str = "fake", dims: int = DIMS) -> None:
        self.manifest = BundleManifest(
            kind="bi_encoder",
            name=name,
            max_length=64,
            dims=dims,
            input_names=["input_ids", "attention_mask"],
            output_name="last_hidden_state",
            source="tests/fakes.py",
            revision="fake1",
        )
        self.model_id = self.manifest.model_id
        self.dims = dims
        self.calls = 0  # embed calls: a test can tell a cached query vector from a computed one
        self.warmed = False

    def warmup(self) -> None:
        self.warmed = True

    def _word(self, word: str) -> np.ndarray:
        """A word's unit vector: one hashed slot."""
        row = np.zeros(self.dims, dtype=np.float32)
        slot = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
        row[slot % self.dims] = 1.0
        return row

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Sentence vectors (the normalised sum of the word vectors) and, with `tokens`, each text's word
        vectors as its token vectors: one "encoder pass", like BiEncoderRunner.encode."""
        self.calls += 1
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        rows: list[np.ndarray] = []
        for row, text in enumerate(texts):
            words = text.lower().split()
            matrix = (
                np.stack([self._word(w) for w in words]) if words else np.zeros((0, self.dims), np.float32)
            )
            out[row] = matrix.sum(axis=0)
            rows.append(matrix)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12), rows if tokens else None

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.encode(texts, batch_size)[0]

    def document_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        rows = self.encode(texts, batch_size, tokens=True)[1]
        assert rows is not None
        return rows

    query_token_vectors = document_token_vectors
