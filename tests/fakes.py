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

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                slot = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                out[row, slot % self.dims] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
