"""Reference ColBERT token vectors and MaxSim scores from colbert-ai or PyLate, for the parity tests.

    python tests/reference/colbert_embed.py CHECKPOINT TEXTS.json OUT.npz [--library colbert-ai|pylate]

TEXTS.json is {"queries": [...], "documents": [...]}. OUT.npz gets q0, q1, ... and d0, d1, ... (each a
(tokens, dims) float32 matrix: the rows the library scores with). Prints one JSON object on stdout:
library and version, the settings it read, shapes, and the queries x documents MaxSim scores computed
by the library's own scoring function (colbert-ai: `colbert_score` over padded documents and their
mask; PyLate: `scores.colbert_scores`, one document at a time), so the scores are not derived from our MaxSim.

Runs in its own process on purpose: the test process stays torch-free, and no torch state from an
export can touch the reference (see DESIGN.md, "Export in a separate process").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _let_colbert_ai_load_on_transformers_5() -> None:
    """colbert-ai 0.2.22's HF_ColBERT calls `init_weights()` where transformers 5 models must call
    `post_init()` (which sets up the tied-weights bookkeeping and then calls `init_weights()`), so
    loading fails with "no attribute 'all_tied_weights_keys'". This routes that one call through
    post_init. It touches model construction only; tokenization, masking, projection, normalisation and
    scoring stay colbert-ai's own code, and `colbert_ai` below checks the loaded weights against the file.
    """
    import transformers

    original = transformers.PreTrainedModel.init_weights

    def init_weights(self: Any) -> None:
        if hasattr(self, "all_tied_weights_keys"):
            original(self)
        else:
            self.post_init()

    transformers.PreTrainedModel.init_weights = init_weights


def _check_loaded_weights(checkpoint: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    stored = load_file(str(checkpoint / "model.safetensors"))
    compared = [k for k in stored if k in state]
    differing = [k for k in compared if not bool((state[k] == stored[k]).all())]
    if "linear.weight" not in compared or len(compared) < len(state) or differing:
        raise SystemExit(f"reference did not load the checkpoint as stored: differing {differing[:5]}")


def colbert_ai(checkpoint: Path, queries: list[str], documents: list[str], bsize: int) -> dict[str, Any]:
    _let_colbert_ai_load_on_transformers_5()
    from colbert.modeling.colbert import ColBERT, colbert_score

    # Only colbert_score_packed needs the C++ segmented-MaxSim extension, and compiling it takes a
    # minute; the paths used here never call it.
    ColBERT.loaded_extensions = True
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    model = Checkpoint(str(checkpoint), colbert_config=ColBERTConfig(), verbose=0)
    _check_loaded_weights(checkpoint, model.model.state_dict())
    config = model.colbert_config
    q = model.queryFromText(queries, bsize=bsize, to_cpu=True).float()
    d_rows, *_ = model.docFromText(documents, bsize=bsize, keep_dims=False)
    # Scores the way colbert-ai re-ranks: padded documents, their mask (padding and skip-list false).
    ids, mask = model.doc_tokenizer.tensorize(documents)
    d_padded, d_mask = model.doc(ids, mask, keep_dims="return_mask")
    scores = [colbert_score(q[i : i + 1], d_padded, d_mask, config=config).tolist() for i in range(len(q))]
    settings = {
        k: getattr(config, k)
        for k in (
            "query_maxlen",
            "doc_maxlen",
            "dim",
            "query_token_id",
            "doc_token_id",
            "attend_to_mask_tokens",
        )
    }
    return {
        "library": f"colbert-ai {importlib.metadata.version('colbert-ai')}",
        "settings": settings,
        "queries": [row.numpy() for row in q],
        "documents": [row.float().numpy() for row in d_rows],
        "scores": scores,
    }


def pylate(checkpoint: Path, queries: list[str], documents: list[str], bsize: int) -> dict[str, Any]:
    import torch
    from pylate import models, scores

    model = models.ColBERT(model_name_or_path=str(checkpoint), device="cpu", local_files_only=True)
    q = model.encode(queries, batch_size=bsize, is_query=True, show_progress_bar=False)
    d = model.encode(documents, batch_size=bsize, is_query=False, show_progress_bar=False)
    # One document at a time: colbert_scores would score a batch's zero padding as similarity 0.
    queries_tensor = torch.from_numpy(np.stack(q))
    table = torch.cat([scores.colbert_scores(queries_tensor, torch.from_numpy(x)[None]) for x in d], dim=1)
    settings = {
        "query_length": model.query_length,
        "document_length": model.document_length,
        "query_prefix": model.query_prefix,
        "document_prefix": model.document_prefix,
        "attend_to_expansion_tokens": model.attend_to_expansion_tokens,
    }
    return {
        "library": f"pylate {importlib.metadata.version('pylate')}",
        "settings": settings,
        "queries": list(q),
        "documents": list(d),
        "scores": table.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("checkpoint", type=Path, help="colbert-ir checkpoint folder")
    parser.add_argument("texts", type=Path, help='JSON {"queries": [...], "documents": [...]}')
    parser.add_argument("out", type=Path, help=".npz of token vectors q0.. and d0..")
    parser.add_argument("--library", choices=("colbert-ai", "pylate"), default="colbert-ai")
    parser.add_argument("--bsize", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the imports: only the local folder may be read

    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    queries, documents = texts["queries"], texts["documents"]
    run = colbert_ai if args.library == "colbert-ai" else pylate
    result = run(args.checkpoint, queries, documents, args.bsize)
    arrays = {f"q{i}": np.asarray(m, dtype=np.float32) for i, m in enumerate(result["queries"])}
    arrays |= {f"d{i}": np.asarray(m, dtype=np.float32) for i, m in enumerate(result["documents"])}
    np.savez(args.out, **arrays)
    summary = {
        "library": result["library"],
        "settings": result["settings"],
        "query_shapes": [list(arrays[f"q{i}"].shape) for i in range(len(queries))],
        "document_shapes": [list(arrays[f"d{i}"].shape) for i in range(len(documents))],
        "scores": result["scores"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
