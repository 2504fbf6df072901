"""What every ONNX runner shares: the session options, the tokenizer set-up, the feed names.

Used by the bi-encoder, ColBERT and cross-encoder runners; torch-free like them.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

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
