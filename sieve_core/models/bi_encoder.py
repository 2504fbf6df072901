"""Serving a bi-encoder bundle: tokenizers -> onnxruntime -> mean pooling -> L2 normalisation.

Deliberately free of torch: server and workers need only onnxruntime, tokenizers and numpy.
One runner holds one InferenceSession and one Tokenizer, both configured once in __init__ and never
mutated afterwards, so concurrent calls from several threads are safe.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sieve_core.models.base import OnnxRunner
from sieve_core.models.bundle import TOKENIZER_FILE, BundleError
from sieve_core.models.onnx_common import (
    ENCODING_FIELDS,
    check_feedable,
    length_batches,
    make_tokenizer,
    pad_encodings,
)

# Same epsilons as sentence-transformers' Pooling (clamp of the token count) and torch's F.normalize.
_MASK_EPS = 1e-9
_NORM_EPS = 1e-12

Batch = tuple[list[int], dict[str, np.ndarray]]


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, _NORM_EPS)


class BiEncoderRunner(OnnxRunner):
    """Embeds texts with a `bi_encoder` bundle (see bundle.py for the directory layout)."""

    KIND = "bi_encoder"

    def __init__(
        self, bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False
    ) -> None:
        super().__init__(bundle_dir, intra_op_threads=intra_op_threads, spin=spin)
        tokenizer_path = Path(bundle_dir) / TOKENIZER_FILE
        self._tokenizer, self._pad_id = make_tokenizer(tokenizer_path, self.manifest.max_length)

    def _check_manifest(self, bundle: Path) -> None:
        if self.manifest.kind != self.KIND or self.manifest.pooling != "mean":
            raise BundleError(
                f"model bundle {bundle}: BiEncoderRunner serves kind 'bi_encoder' with "
                f"mean pooling, got {self.manifest.kind!r} / {self.manifest.pooling!r}"
            )
        check_feedable(bundle, self.manifest.input_names)

    # -- public API -----------------------------------------------------------------------------------

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, *, tokens: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Sentence vectors and, with `tokens=True`, per-text token vectors, from ONE encoder run.

        Vectors: float32 (len(texts), dims) in the caller's order, mean-pooled over the attention mask
        (special tokens included, as sentence-transformers does) and L2-normalised when the bundle says so.
        Token vectors: per text, the L2-normalised last-hidden-state rows of its non-special tokens,
        (tokens, dims) float32 after truncation to max_length; [CLS], [SEP] and padding carry no term of
        the text for late interaction (MaxSim), so they are dropped.
        """
        vectors = np.empty((len(texts), self.dims), dtype=np.float32)
        token_rows: list[np.ndarray] | None = (
            [np.empty((0, self.dims), dtype=np.float32)] * len(texts) if tokens else None
        )
        for order, feeds in self._batches(texts, batch_size, keep_special_mask=tokens):
            hidden = self._run(feeds)
            mask = feeds["attention_mask"].astype(np.float32)[:, :, None]
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), _MASK_EPS)
            vectors[order] = _l2_normalize(pooled) if self.manifest.normalize else pooled
            if token_rows is not None:
                keep = (feeds["attention_mask"] == 1) & (feeds["special_tokens_mask"] == 0)
                for row, index in enumerate(order):
                    token_rows[index] = np.ascontiguousarray(
                        _l2_normalize(hidden[row][keep[row]]), dtype=np.float32
                    )
        return vectors, token_rows

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """One float32 vector per text, shape (len(texts), dims), in the caller's order."""
        return self.encode(texts, batch_size)[0]

    def token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """Per text, its L2-normalised token vectors (see `encode`)."""
        rows = self.encode(texts, batch_size, tokens=True)[1]
        assert rows is not None
        return rows

    def token_offsets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, the (start, end) offsets of the tokens `token_vectors` returns rows for, one per row:
        (tokens, 2) int64 in Unicode code points of the text (the tokenizers library gives a Python str's
        indices, not UTF-8 bytes). The same tokenizer and truncation as `encode`, so the rows line up; a
        second tokenization costs ~0.1 ms per abstract, no encoder pass."""
        out = []
        for encoding in self._tokenizer.encode_batch(list(texts)):
            keep = [
                i
                for i, (att, special) in enumerate(
                    zip(encoding.attention_mask, encoding.special_tokens_mask, strict=True)
                )
                if att == 1 and special == 0
            ]
            offsets = encoding.offsets
            out.append(np.array([offsets[i] for i in keep], dtype=np.int64).reshape(-1, 2))
        return out

    def document_token_offsets(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self.token_offsets(texts)

    # The late-interaction interface (ColbertRunner has the same two methods): a bi-encoder encodes
    # queries and documents alike, so MaxSim over its token vectors is zero-shot late interaction.
    def query_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        return self.token_vectors(texts, batch_size)

    def document_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        return self.token_vectors(texts, batch_size)

    def warmup(self) -> None:
        """Run the graph once so the first real request does not pay ORT's lazy allocations."""
        vectors = self.embed(["warm up the encoder", "a second, somewhat longer warm-up text for padding"])
        if vectors.shape != (2, self.dims) or not np.isfinite(vectors).all():
            raise BundleError(f"{self.model_id}: warm-up produced {vectors.shape}, expected (2, {self.dims})")

    # -- internals ------------------------------------------------------------------------------------

    def _batches(
        self, texts: Sequence[str], batch_size: int, *, keep_special_mask: bool = False
    ) -> Iterator[Batch]:
        """Yields (positions in the caller's list, padded feeds), texts grouped by token length."""
        encodings = self._tokenizer.encode_batch(list(texts)) if texts else []
        fields = dict(ENCODING_FIELDS)
        if keep_special_mask:
            fields["special_tokens_mask"] = "special_tokens_mask"
        for order in length_batches(encodings, batch_size):
            yield order, pad_encodings([encodings[i] for i in order], fields, self._pad_id)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {name: feeds[name] for name in self.manifest.input_names}
        (hidden,) = self._session.run([self.manifest.output_name], inputs)
        return np.asarray(hidden, dtype=np.float32)
