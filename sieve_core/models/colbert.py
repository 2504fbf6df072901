"""Serving a ColBERT bundle (colbert-ir layout): query and document token vectors for MaxSim.

The encoding follows colbert-ai (`QueryTokenizer`/`DocTokenizer`, `ColBERT.query`/`ColBERT.doc`), which
PyLate reproduces for checkpoints of this layout:

- query:    `[CLS] [Q] tokens... [SEP]`, truncated to `query_max_length` and, with query expansion,
            filled up to exactly `query_max_length` with `[MASK]` (the expansion). The `[MASK]` positions
            are not attended to unless the checkpoint says `attend_to_mask_tokens`, but their output
            vectors are kept: every one of the `query_max_length` rows takes part in MaxSim.
- document: `[CLS] [D] tokens... [SEP]`, truncated to `max_length`; padding and the skip-list tokens
            (punctuation) are dropped from the output, `[CLS]`, `[D]` and `[SEP]` are kept.

`[Q]`/`[D]` are the marker tokens (`[unused0]`/`[unused1]` in colbertv2.0), inserted right after `[CLS]`.

The projection (hidden -> dims, no bias) and the L2 normalisation are inside the ONNX graph, so the graph
outputs the final token vectors: ORT fuses the projection into the encoder's last MatMul chain, the
output tensor is dims wide instead of hidden wide (128 vs 768 floats per token for colbertv2.0), and a
bundle cannot be served with the projection forgotten. Selecting rows stays here, in numpy.

Like BiEncoderRunner: free of torch, one session and two tokenizers (query and document truncation)
built once and never mutated, so concurrent calls from several threads are safe.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from sieve_core.models.base import OnnxRunner
from sieve_core.models.bundle import TOKENIZER_FILE, BundleError, BundleManifest
from sieve_core.models.onnx_common import length_batches, make_tokenizer

KIND = "colbert"
INPUT_NAMES = ("input_ids", "attention_mask")
# [CLS] + marker + [SEP]: the shortest sequence either side can produce.
_SPECIAL_TOKENS = 3
_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ColbertOptions:
    """The manifest's `options` for kind "colbert" (written by export_colbert.py, validated here)."""

    query_max_length: int
    query_marker: str
    query_marker_id: int
    document_marker: str
    document_marker_id: int
    mask_token_id: int
    # Pad queries with [MASK] up to query_max_length and keep those rows (colbert-ai always does;
    # PyLate's do_query_expansion=False keeps only the query's own tokens).
    query_expansion: bool
    # colbert-ai's attend_to_mask_tokens / PyLate's attend_to_expansion_tokens.
    attend_to_expansion: bool
    # Token ids dropped from documents (colbert-ai's mask_punctuation: string.punctuation); empty = none.
    skiplist_ids: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skiplist_ids"] = list(self.skiplist_ids)
        return data

    @classmethod
    def from_manifest(cls, manifest: BundleManifest, bundle: Path) -> ColbertOptions:
        options = dict(manifest.options)
        unknown = sorted(set(options) - set(_OPTION_TYPES))
        missing = sorted(set(_OPTION_TYPES) - set(options))
        if unknown or missing:
            raise BundleError(
                f"model bundle {bundle}: colbert options: unknown {unknown}, missing {missing}; re-export it"
            )
        for name, typ in _OPTION_TYPES.items():
            if not _has_type(options[name], typ):
                raise BundleError(
                    f"model bundle {bundle}: colbert option {name!r} has a bad value {options[name]!r}"
                )
        parsed = cls(**{**options, "skiplist_ids": tuple(options["skiplist_ids"])})
        if parsed.query_max_length < _SPECIAL_TOKENS or manifest.max_length < _SPECIAL_TOKENS:
            raise BundleError(
                f"model bundle {bundle}: query_max_length {parsed.query_max_length} and max_length "
                f"{manifest.max_length} must leave room for [CLS], the marker and [SEP]"
            )
        return parsed


# The JSON type of each option (skiplist_ids: a list of ints).
_OPTION_TYPES: dict[str, type] = {
    "query_max_length": int,
    "query_marker": str,
    "query_marker_id": int,
    "document_marker": str,
    "document_marker_id": int,
    "mask_token_id": int,
    "query_expansion": bool,
    "attend_to_expansion": bool,
    "skiplist_ids": list,
}


def _has_type(value: Any, typ: type) -> bool:
    if typ is list:
        return isinstance(value, list) and all(_is_int(v) for v in value)
    return _is_int(value) if typ is int else isinstance(value, typ)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Side:
    """How one side (query or document) is tokenized, padded and reduced to its output rows."""

    tokenizer: Tokenizer
    marker_id: int
    fill_id: int  # what stands in the padded positions
    width: int | None  # pad every sequence to this many tokens, or None: to the batch's longest
    attend_fill: bool  # whether the padded positions are attended to
    keep_fill: bool  # whether the padded positions are output rows
    skip_ids: np.ndarray  # token ids never output


class ColbertRunner(OnnxRunner):
    """Query and document token vectors from a `colbert` bundle (see bundle.py for the directory layout)."""

    KIND = KIND

    def __init__(
        self, bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False
    ) -> None:
        super().__init__(bundle_dir, intra_op_threads=intra_op_threads, spin=spin)
        bundle = Path(bundle_dir)
        opts = self.options
        # Each side truncates to its length minus one: the marker is inserted after tokenization,
        # exactly as both reference libraries do (max_length - 1, then insert after [CLS]).
        query_tok, _ = make_tokenizer(bundle / TOKENIZER_FILE, opts.query_max_length - 1)
        doc_tok, pad_id = make_tokenizer(bundle / TOKENIZER_FILE, self.manifest.max_length - 1)
        self._check_tokenizer(bundle, doc_tok)
        expand = opts.query_expansion
        self._query = _Side(
            tokenizer=query_tok,
            marker_id=opts.query_marker_id,
            fill_id=opts.mask_token_id if expand else pad_id,
            width=opts.query_max_length if expand else None,
            attend_fill=expand and opts.attend_to_expansion,
            keep_fill=expand,
            skip_ids=np.empty(0, dtype=np.int64),
        )
        self._document = _Side(
            tokenizer=doc_tok,
            marker_id=opts.document_marker_id,
            fill_id=pad_id,
            width=None,
            attend_fill=False,
            keep_fill=False,
            skip_ids=np.array(sorted(opts.skiplist_ids), dtype=np.int64),
        )

    def _check_manifest(self, bundle: Path) -> None:
        if self.manifest.kind != KIND or not self.manifest.normalize:
            raise BundleError(
                f"model bundle {bundle}: ColbertRunner serves kind {KIND!r} with normalised vectors, "
                f"got {self.manifest.kind!r} (normalize={self.manifest.normalize})"
            )
        self.options = ColbertOptions.from_manifest(self.manifest, bundle)

    def _check_graph(self, bundle: Path) -> None:
        graph_inputs = {i.name for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        output = outputs.get(self.manifest.output_name)
        if graph_inputs != set(INPUT_NAMES) or set(self.manifest.input_names) != set(INPUT_NAMES):
            raise BundleError(
                f"model bundle {bundle}: a colbert graph takes {list(INPUT_NAMES)}; the manifest says "
                f"{self.manifest.input_names}, the graph {sorted(graph_inputs)}"
            )
        if output is None or output.shape[-1] != self.dims:
            raise BundleError(
                f"model bundle {bundle}: output {self.manifest.output_name!r} of width {self.dims} not in "
                f"the graph's {[(o.name, o.shape) for o in outputs.values()]}"
            )

    def _check_tokenizer(self, bundle: Path, tokenizer: Tokenizer) -> None:
        # The markers go in after the first token, so the tokenizer must frame a text as
        # [CLS] ... [SEP]; and ids in the manifest must be this tokenizer's, not another vocabulary's.
        opts = self.options
        framed = tokenizer.encode("")
        problems = []
        if len(framed.ids) != 2 or sum(framed.special_tokens_mask) != 2:
            problems.append(f"an empty text encodes to {framed.tokens}, expected two special tokens")
        for token, token_id in (
            (opts.query_marker, opts.query_marker_id),
            (opts.document_marker, opts.document_marker_id),
        ):
            if tokenizer.token_to_id(token) != token_id:
                problems.append(
                    f"marker {token!r} is id {tokenizer.token_to_id(token)}, manifest says {token_id}"
                )
        vocab = tokenizer.get_vocab_size()
        ids = [opts.mask_token_id, *opts.skiplist_ids]
        if not all(0 <= i < vocab for i in ids):
            problems.append(f"mask or skip-list ids outside the vocabulary of {vocab}")
        if problems:
            raise BundleError(
                f"model bundle {bundle}: tokenizer does not fit the manifest: {'; '.join(problems)}"
            )

    # -- public API -----------------------------------------------------------------------------------

    @property
    def query_max_length(self) -> int:
        return self.options.query_max_length

    @property
    def document_max_length(self) -> int:
        return self.manifest.max_length

    def query_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """Per query, its (tokens, dims) float32 unit vectors: with query expansion exactly
        `query_max_length` rows ([CLS], [Q], the query's tokens, [SEP], then the [MASK] expansion)."""
        return self._encode(texts, batch_size, self._query)

    def document_token_vectors(self, texts: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """Per document, its (tokens, dims) float32 unit vectors: [CLS], [D], its tokens up to
        `max_length` in all, [SEP], without padding and skip-list (punctuation) tokens."""
        return self._encode(texts, batch_size, self._document)

    def document_token_offsets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per document, the (start, end) code-point offsets of the rows `document_token_vectors` returns,
        one per row ((0, 0) for [CLS], [D] and [SEP], which stand for no text)."""
        out = []
        for encoding in self._document.tokenizer.encode_batch(list(texts)):
            _, _, keep = self._feeds([encoding], self._document)
            # Row 0 is [CLS], row 1 the inserted marker, row p >= 2 the encoding's token p - 1.
            offsets = [(0, 0), (0, 0), *encoding.offsets[1:]]
            rows = [offsets[p] for p in np.flatnonzero(keep[0]) if p < len(offsets)]
            out.append(np.array(rows, dtype=np.int64).reshape(-1, 2))
        return out

    def warmup(self) -> None:
        """Run the graph once per side so the first real request does not pay ORT's lazy allocations."""
        query = self.query_token_vectors(["warm up the query encoder"])[0]
        docs = self.document_token_vectors(["warm up", "a second, somewhat longer warm-up document."])
        if query.shape[1] != self.dims or any(d.shape[1] != self.dims for d in docs):
            raise BundleError(f"{self.model_id}: warm-up produced vectors of the wrong width")

    # -- internals ------------------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], batch_size: int, side: _Side) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty((0, self.dims), dtype=np.float32)] * len(texts)
        encodings = side.tokenizer.encode_batch(list(texts)) if texts else []
        # Grouped by length (queries with expansion all have the same width anyway).
        for order in length_batches(encodings, batch_size):
            ids, attention, keep = self._feeds([encodings[i] for i in order], side)
            (vectors,) = self._session.run(
                [self.manifest.output_name], {"input_ids": ids, "attention_mask": attention}
            )
            vectors = np.asarray(vectors, dtype=np.float32)
            for row, index in enumerate(order):
                out[index] = np.ascontiguousarray(vectors[row][keep[row]])
        return out

    def _feeds(self, encodings: list[Encoding], side: _Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, attention_mask and the output-row mask for one batch, marker inserted after [CLS]."""
        lengths = [len(e.ids) + 1 for e in encodings]
        width = side.width or max(lengths)
        ids = np.full((len(encodings), width), side.fill_id, dtype=np.int64)
        real = np.zeros((len(encodings), width), dtype=bool)
        for row, (encoding, length) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, 0] = encoding.ids[0]
            ids[row, 1] = side.marker_id
            ids[row, 2:length] = encoding.ids[1:]
            real[row, :length] = True
        attention = np.ones_like(ids) if side.attend_fill else real.astype(np.int64)
        keep = np.ones_like(real) if side.keep_fill else real
        if side.skip_ids.size:
            keep = keep & ~np.isin(ids, side.skip_ids)
        return ids, attention, keep


_CHECK_TEXTS = [
    "What does late interaction cost at query time?",
    "",
    "Grüße aus Köln — naïve café, 東京, ∑ αβγ 🙂",
    "!!! ... ??? (((;;;))) --- ,,, ''' \"\"\"",
    "a much longer text that repeats itself, with commas. " * 80,
]


def check_bundle(path: str | os.PathLike[str]) -> None:
    """Load a colbert bundle the way serving does and sanity-check both sides; raises BundleError."""
    from sieve_core.late_interaction import maxsim

    runner = ColbertRunner(path)
    queries = runner.query_token_vectors(_CHECK_TEXTS, batch_size=2)
    docs = runner.document_token_vectors(_CHECK_TEXTS, batch_size=2)
    for side, rows, limit in (
        ("query", queries, runner.query_max_length),
        ("document", docs, runner.document_max_length),
    ):
        for text, matrix in zip(_CHECK_TEXTS, rows, strict=True):
            if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != runner.dims:
                raise BundleError(
                    f"check: {side} vectors {matrix.shape} {matrix.dtype}, expected (n, {runner.dims}) float32"
                )
            if not 0 < len(matrix) <= limit or not np.isfinite(matrix).all():
                raise BundleError(
                    f"check: {side} {text[:30]!r} gave {len(matrix)} rows (limit {limit}) or non-finite values"
                )
            norms = np.linalg.norm(matrix, axis=1)
            if not np.allclose(norms, 1.0, atol=_NORM_TOLERANCE):
                raise BundleError(f"check: {side} vectors are not unit length: {norms.min()}..{norms.max()}")
    if runner.options.query_expansion and {len(q) for q in queries} != {runner.query_max_length}:
        raise BundleError(f"check: expanded queries should all have {runner.query_max_length} rows")
    if len(docs[3]) != _SPECIAL_TOKENS and runner.options.skiplist_ids:
        raise BundleError(
            f"check: a punctuation-only document kept {len(docs[3])} rows, expected [CLS] [D] [SEP]"
        )
    scores = maxsim(queries[0], docs)
    if not np.isfinite(scores).all():
        raise BundleError("check: MaxSim scores are not finite")
    if "torch" in sys.modules:
        raise BundleError("check: the serving path imported torch")
    print(
        f"check: {runner.model_id} queries -> {queries[0].shape}, documents -> "
        f"{[len(d) for d in docs]} x {runner.dims} rows, unit norm, MaxSim finite, torch not imported"
    )
