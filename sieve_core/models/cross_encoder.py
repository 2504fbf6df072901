"""Serving a cross-encoder bundle: tokenizers (query, document) pairs -> onnxruntime logits -> activation.

A cross-encoder reads `[CLS] query [SEP] document [SEP]` (token_type_ids 0 then 1) through one model
with full cross-attention and a classification head with one output; the bundle's graph returns those
logits, shape (batch, 1). The activation that turns a logit into the model's score is recorded by the
exporter in `manifest.options["activation"]`, because the checkpoint alone does not say it:
sentence-transformers' CrossEncoder applies Sigmoid to single-label models unless its config names
another activation, and a bundle must score exactly as CrossEncoder.predict does.

Like the bi-encoder runner, free of torch; one session and one tokenizer, configured once in __init__ and
never mutated afterwards, so concurrent calls from several threads are safe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sieve_core.models.base import OnnxRunner
from sieve_core.models.bundle import TOKENIZER_FILE, BundleError, BundleManifest
from sieve_core.models.onnx_common import (
    ENCODING_FIELDS,
    check_feedable,
    length_batches,
    make_tokenizer,
    pad_encodings,
)

KIND = "cross_encoder"
ACTIVATIONS = frozenset({"sigmoid", "identity"})
# max_batch_size: set to 1 for dynamically quantized graphs, whose activation scales are computed over
# the whole input tensor: a pair's score would otherwise depend on the other pairs in its batch.
KNOWN_OPTIONS = frozenset({"activation", "max_batch_size"})
DEFAULT_BATCH_SIZE = 16

Pair = tuple[str, str]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp(-log(1 + e^-x)) in float64: no overflow warning for large negative logits, and exact to
    # float32 rounding, so scores match torch.sigmoid to the last bit or so.
    return np.exp(-np.logaddexp(0.0, -logits.astype(np.float64)))


def _check_kind(bundle: Path, manifest: BundleManifest) -> None:
    if manifest.kind != KIND or manifest.pooling != "none" or manifest.dims != 1:
        raise BundleError(
            f"model bundle {bundle}: CrossEncoderRunner serves kind {KIND!r} with pooling 'none' and one "
            f"logit per pair (dims 1), got {manifest.kind!r} / {manifest.pooling!r} / dims {manifest.dims}"
        )


def _read_options(bundle: Path, options: dict[str, object]) -> tuple[str, int | None]:
    """(activation, max_batch_size or None) from the manifest's options."""
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        # An option this code does not know could change the scores; serving it anyway would be silent.
        raise BundleError(f"model bundle {bundle}: unknown cross-encoder options {unknown}")
    activation = options.get("activation")
    if activation not in ACTIVATIONS:
        raise BundleError(
            f"model bundle {bundle}: options.activation must be one of {sorted(ACTIVATIONS)}, "
            f"got {activation!r}; re-export the bundle"
        )
    max_batch = options.get("max_batch_size")
    if max_batch is not None and (
        not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1
    ):
        raise BundleError(
            f"model bundle {bundle}: options.max_batch_size must be a positive int, got {max_batch!r}"
        )
    return str(activation), max_batch


class CrossEncoderRunner(OnnxRunner):
    """Scores (query, document) pairs with a `cross_encoder` bundle (see bundle.py for the layout)."""

    KIND = KIND

    def __init__(
        self, bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False
    ) -> None:
        super().__init__(bundle_dir, intra_op_threads=intra_op_threads, spin=spin)
        # The bi-encoder's tokenizer set-up is the one wanted here: truncation to max_length with the
        # tokenizers default strategy, 'longest_first', which is what transformers (and so
        # sentence-transformers) applies to a pair: it trims the longer side first.
        tokenizer_path = Path(bundle_dir) / TOKENIZER_FILE
        self._tokenizer, self._pad_id = make_tokenizer(tokenizer_path, self.manifest.max_length)

    def _check_manifest(self, bundle: Path) -> None:
        _check_kind(bundle, self.manifest)
        self.activation, self._max_batch = _read_options(bundle, self.manifest.options)
        check_feedable(bundle, self.manifest.input_names)

    def _check_graph(self, bundle: Path) -> None:
        super()._check_graph(bundle)
        output = next(o for o in self._session.get_outputs() if o.name == self.manifest.output_name)
        if len(output.shape) != 2 or output.shape[1] not in (1, "1"):
            raise BundleError(
                f"model bundle {bundle}: output {output.name!r} has shape {output.shape}, not (batch, 1)"
            )

    # -- public API -----------------------------------------------------------------------------------

    def score(self, query: str, documents: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """One float32 score per document for `query`, in the caller's order; higher is more relevant."""
        return self.score_pairs([(query, document) for document in documents], batch_size)

    def score_pairs(self, pairs: Sequence[Pair], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Scores of (query, document) pairs, float32 shape (len(pairs),), in the caller's order.

        The same numbers as sentence-transformers' CrossEncoder.predict on the source checkpoint:
        logits through the bundle's activation (sigmoid unless the checkpoint said otherwise).
        """
        logits = self.logits(pairs, batch_size)
        scores = _sigmoid(logits) if self.activation == "sigmoid" else logits
        return scores.astype(np.float32)

    def logits(self, pairs: Sequence[Pair], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """The head's raw outputs, before the activation: float32 shape (len(pairs),)."""
        out = np.empty(len(pairs), dtype=np.float32)
        for order, feeds in self._batches(pairs, batch_size):
            inputs = {name: feeds[name] for name in self.manifest.input_names}
            (logits,) = self._session.run([self.manifest.output_name], inputs)
            out[order] = np.asarray(logits, dtype=np.float32).reshape(len(order))
        return out

    def warmup(self) -> None:
        """Run the graph once so the first real request does not pay ORT's lazy allocations."""
        scores = self.score("warm up the re-ranker", ["a short document", "a second, longer document " * 4])
        if scores.shape != (2,) or not np.isfinite(scores).all():
            raise BundleError(f"{self.model_id}: warm-up produced {scores!r}, expected 2 finite scores")

    # -- internals ------------------------------------------------------------------------------------

    def _batches(
        self, pairs: Sequence[Pair], batch_size: int
    ) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """Yields (positions in the caller's list, padded feeds), pairs grouped by token length (a re-rank
        mixes short snippets with long abstracts: little padding, little wasted attention)."""
        batch_size = min(batch_size, self._max_batch or batch_size)
        # Tuples, not lists: tokenizers reads a 2-tuple as a (sequence, pair) input.
        encodings = self._tokenizer.encode_batch([(q, d) for q, d in pairs]) if pairs else []
        for order in length_batches(encodings, batch_size):
            yield order, pad_encodings([encodings[i] for i in order], ENCODING_FIELDS, self._pad_id)


_CHECK_QUERY = "does a cross-encoder read query and document together?"
_CHECK_DOCUMENTS = [
    "A cross-encoder scores a query and a document in one pass with full cross-attention.",
    "",
    "Grüße aus Köln — naïve café, 東京, ∑ αβγ 🙂",
    "a much longer document that repeats itself " * 120,
]


def check_bundle(path: str | os.PathLike[str]) -> None:
    """Load a cross-encoder bundle the way serving does and sanity-check its scores; raises on failure."""
    runner = CrossEncoderRunner(path)
    scores = runner.score(_CHECK_QUERY, _CHECK_DOCUMENTS, batch_size=4)
    if scores.shape != (len(_CHECK_DOCUMENTS),) or scores.dtype != np.float32:
        raise BundleError(
            f"check: got {scores.shape} {scores.dtype}, expected ({len(_CHECK_DOCUMENTS)},) float32"
        )
    if not np.isfinite(scores).all():
        raise BundleError(f"check: scores are not finite: {scores}")
    if runner.activation == "sigmoid" and not ((scores >= 0) & (scores <= 1)).all():
        raise BundleError(f"check: sigmoid scores outside [0, 1]: {scores}")
    # Padding next to the long document must not change a short pair's score.
    alone = np.array([runner.score(_CHECK_QUERY, [d])[0] for d in _CHECK_DOCUMENTS], dtype=np.float32)
    drift = float(np.abs(alone - scores).max())
    if drift > 1e-4:
        raise BundleError(f"check: scores depend on the batch (max difference {drift:.2e})")
    if "torch" in sys.modules:
        raise BundleError("check: the serving path imported torch")
    print(
        f"check: {runner.model_id} scores {len(scores)} pairs ({runner.activation}, max_length "
        f"{runner.manifest.max_length}) -> {scores.min():.5f}..{scores.max():.5f}, finite, batch-invariant "
        f"(max diff {drift:.1e}), torch not imported"
    )
