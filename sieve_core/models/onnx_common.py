"""What every ONNX runner shares: the session options, the tokenizer set-up, the feed names, batching
by token length and padding.

Used by the bi-encoder, ColBERT and cross-encoder runners; torch-free like them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from sieve_core.models.bundle import BundleError

# Values the exporter may declare; each maps to one field of a tokenizers Encoding.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def make_session(model_path: Path, intra_op_threads: int, spin: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # A BERT graph is one chain of ops: inter-op parallelism buys nothing and costs threads.
    options.inter_op_num_threads = 1
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    if not spin:
        # Idle pool threads otherwise busy-wait after each run, taking cores from the gRPC loop,
        # SQLite and other processes on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def make_tokenizer(tokenizer_path: Path, max_length: int) -> tuple[Tokenizer, int]:
    """Tokenizer with the bundle's truncation and no padding; also returns the pad id.

    The tokenizer.json of a Hugging Face checkpoint carries whatever truncation/padding it was saved
    with (all-MiniLM-L6-v2's says 128 and fixed padding to 128), not the max_seq_length the model was
    trained and is served with, so both are set here from the manifest, once, for index and query alike.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
    tokenizer.no_padding()
    # max_length counts the special tokens ([CLS] ... [SEP]), as in transformers' truncation.
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer, pad_id


def check_feedable(bundle: Path, input_names: Sequence[str]) -> None:
    """The graph's inputs must be fields of a tokenizers Encoding, or the runner could not feed them."""
    unknown = sorted(set(input_names) - set(ENCODING_FIELDS))
    if unknown:
        raise BundleError(f"model bundle {bundle}: cannot feed inputs {unknown}")


def length_batches(encodings: Sequence[Encoding], batch_size: int) -> Iterator[list[int]]:
    """Positions of `encodings` in batches of `batch_size`, grouped by token length.

    Sorting by length means each batch pads to a length close to all of its members, which matters with
    BERT's quadratic attention and a mix of short queries and long abstracts. Callers put each result
    back at its position, so the caller's order is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_length = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
    for start in range(0, len(by_length), batch_size):
        yield by_length[start : start + batch_size]


def pad_encodings(
    encodings: Sequence[Encoding], fields: dict[str, str], pad_id: int
) -> dict[str, np.ndarray]:
    """int64 (batch, longest) arrays of the Encoding `fields` (feed name -> attribute), right-padded:
    input_ids with `pad_id`, every other field with 0."""
    width = max(len(e.ids) for e in encodings)
    arrays = {name: np.zeros((len(encodings), width), dtype=np.int64) for name in fields}
    arrays["input_ids"].fill(pad_id)
    for row, encoding in enumerate(encodings):
        for name, attr in fields.items():
            values = getattr(encoding, attr)
            arrays[name][row, : len(values)] = values
    return arrays
