"""Export Hugging Face checkpoints to Sieve model bundles (needs the `export` extra: torch, transformers).

    python -m sieve_core.models.export bi-encoder --source DIR --out DIR [--name NAME]
    python -m sieve_core.models.export cross-encoder --source DIR --out DIR [...]
    python -m sieve_core.models.export colbert --source DIR --out DIR [...]
    python -m sieve_core.models.export check --bundle DIR

`bi-encoder` reads a sentence-transformers folder (Transformer -> Pooling -> optional Normalize), exports
the transformer's last_hidden_state to ONNX, and leaves pooling and normalisation to the runner, as
the manifest describes. `cross-encoder` and `colbert` live in export_cross_encoder.py and
export_colbert.py; each module offers `add_arguments(parser)` and `run(args)`, and this module is their
one command line. Every bundle is built in a temporary directory beside --out (`staging_dir`), checked
in a fresh process (the serving path, without torch), and only then renamed into place: a crash or a
failed check never leaves a half bundle where a server would load it.

torch and transformers are imported inside functions so `check` (and importing this module) stays
torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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

DEFAULT_OPSET = 17
# Export subcommands implemented in their own modules (each has add_arguments(parser) and run(args)).
KIND_MODULES = {
    "cross-encoder": "sieve_core.models.export_cross_encoder",
    "colbert": "sieve_core.models.export_colbert",
}
# `check` dispatches on the manifest's kind to the module whose check_bundle(path) serves it.
CHECKERS = {
    "bi_encoder": "sieve_core.models.export",
    "cross_encoder": "sieve_core.models.cross_encoder",
    "colbert": "sieve_core.models.colbert",
}
OUTPUT_NAME = "last_hidden_state"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHECK_TEXTS = [
    "Sieve finds candidates with a bi-encoder.",
    "",
    "Grüße aus Köln — naïve café, 東京, ∑ αβγ 🙂",
    "a much longer text that repeats itself " * 80,
]


@dataclass(frozen=True)
class SentenceTransformerLayout:
    """What the sentence-transformers folder says about how the model is meant to be used."""

    transformer_dir: Path
    max_length: int
    pooling: str
    normalize: bool
    dims: int | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc


def read_layout(source: Path) -> SentenceTransformerLayout:
    modules = _read_json(source / "modules.json")
    by_type = {str(m["type"]).rsplit(".", 1)[-1]: m for m in modules}
    if "Transformer" not in by_type or "Pooling" not in by_type:
        raise BundleError(
            f"{source}: modules.json needs a Transformer and a Pooling module, has {sorted(by_type)}"
        )
    transformer_dir = source / by_type["Transformer"].get("path", "")
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    pooling_config = _read_json(source / by_type["Pooling"]["path"] / "config.json")
    modes = sorted(
        k.removeprefix("pooling_mode_")
        for k, v in pooling_config.items()
        if k.startswith("pooling_mode_") and v
    )
    if modes != ["mean_tokens"]:
        raise BundleError(f"{source}: only mean pooling is supported for bi-encoders, found {modes}")
    return SentenceTransformerLayout(
        transformer_dir=transformer_dir,
        max_length=int(st_config["max_seq_length"]),
        pooling="mean",
        normalize="Normalize" in by_type,
        dims=pooling_config.get("word_embedding_dimension"),
    )


def add_bundle_arguments(parser: argparse.ArgumentParser, source_help: str) -> None:
    """The arguments every export subcommand takes: where from, where to, what to call it, which opset."""
    parser.add_argument("--source", type=Path, required=True, help=source_help)
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create or replace")
    parser.add_argument("--name", help="model name in the manifest (default: the --out folder name)")
    parser.add_argument("--source-label", help="where the checkpoint came from, recorded in the manifest")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)


def trace_to_onnx(
    module: Any,
    inputs: dict[str, Any],
    onnx_path: Path,
    opset: int,
    output_name: str,
    output_axes: dict[int, str],
) -> dict[str, Any]:
    """`torch.onnx.export` the way every bundle is exported (dynamic batch and sequence axes on the inputs,
    constant folding, the TorchScript exporter); returns the versions to record in the manifest."""
    import torch
    import transformers

    names = list(inputs)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(onnx_path),
            input_names=names,
            output_names=[output_name],
            dynamic_axes={**{n: axes for n in names}, output_name: output_axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=False)",
    }


def trace_transformer(
    model: Any,
    output: str,
    dummy: dict[str, Any],
    onnx_path: Path,
    opset: int,
    output_name: str,
    output_axes: dict[int, str],
) -> tuple[list[str], dict[str, Any]]:
    """Trace a transformers model (in eval mode) to ONNX with trace_to_onnx: its graph takes those of
    input_ids / attention_mask / token_type_ids its forward accepts (fed from `dummy`) and returns the
    `output` field of its result. Returns (input names, versions used)."""
    import inspect

    import torch

    model.eval()
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            result = self.inner(**dict(zip(names, inputs, strict=True)), return_dict=True)
            return getattr(result, output)

    inputs = {n: dummy[n] for n in names}
    return names, trace_to_onnx(Traced(), inputs, onnx_path, opset, output_name, output_axes)


def _export_onnx(model_dir: Path, onnx_path: Path, opset: int) -> tuple[list[str], int, dict[str, Any]]:
    """Trace the transformer to ONNX; returns (input names, hidden size, versions used)."""
    import torch
    import transformers

    # Eager attention traces to plain matmuls + an additive mask; SDPA paths trace less predictably.
    model = transformers.AutoModel.from_pretrained(
        model_dir, attn_implementation="eager", local_files_only=True
    )
    # Batch 2 with unequal lengths so the traced graph cannot specialise on "no padding".
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]], dtype=torch.long)
    dummy = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    axes = {0: "batch", 1: "sequence"}
    names, versions = trace_transformer(
        model, "last_hidden_state", dummy, onnx_path, opset, OUTPUT_NAME, axes
    )
    return names, int(model.config.hidden_size), versions


def check_any_bundle(bundle: Path) -> None:
    """Check a bundle of any kind with the checker of its kind (raises BundleError on failure)."""
    kind = load_bundle_manifest(bundle).kind
    checker = importlib.import_module(CHECKERS[kind]).check_bundle
    checker(bundle)
    if "torch" in sys.modules:
        raise BundleError("check: the serving path imported torch")


def check_bundle(bundle: Path) -> None:
    """Load a bi-encoder bundle the way serving does and sanity-check its embeddings; raises on failure."""
    import numpy as np

    from sieve_core.models.bi_encoder import BiEncoderRunner

    runner = BiEncoderRunner(bundle)
    vectors = runner.embed(_CHECK_TEXTS, batch_size=2)
    norms = np.linalg.norm(vectors, axis=1)
    if vectors.shape != (len(_CHECK_TEXTS), runner.dims) or vectors.dtype != np.float32:
        raise BundleError(
            f"check: got {vectors.shape} {vectors.dtype}, "
            f"expected ({len(_CHECK_TEXTS)}, {runner.dims}) float32"
        )
    if not np.isfinite(vectors).all():
        raise BundleError("check: embeddings are not finite")
    if runner.manifest.normalize and not np.allclose(norms, 1.0, atol=1e-4):
        raise BundleError(f"check: embeddings are not unit length: {norms}")
    if "torch" in sys.modules:
        raise BundleError("check: the serving path imported torch")
    print(
        f"check: {runner.model_id} embeds {vectors.shape[0]} texts -> {vectors.shape}, finite, "
        f"norms {norms.min():.5f}..{norms.max():.5f}, torch not imported"
    )


def subprocess_env() -> dict[str, str]:
    """Environment for a child `python -m sieve_core...`: finds this package installed or not, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def check_in_fresh_process(bundle: Path) -> None:
    # A fresh interpreter: no torch state from the export can leak into what we verify.
    cmd = [sys.executable, "-m", "sieve_core.models.export", "check", "--bundle", str(bundle)]
    if subprocess.run(cmd, env=subprocess_env()).returncode != 0:
        raise BundleError("the exported bundle failed its check (see above); --out was left unchanged")


def move_into_place(built: Path, out: Path) -> None:
    if not out.exists():
        os.rename(built, out)
        return
    # Two renames instead of rmtree-then-rename: the old bundle stays whole until the new one is in.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(built, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to build a bundle in; removed afterwards unless moved into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes it 0700; a bundle must stay readable by a server or worker running as another user.
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_bi_encoder(
    source: Path,
    out: Path,
    *,
    name: str | None = None,
    source_label: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> BundleManifest:
    layout = read_layout(source)
    revision = weights_revision(layout.transformer_dir)
    with staging_dir(out) as work:
        print(
            f"export: {source} (max_length {layout.max_length}, {layout.pooling} pooling, "
            f"normalize={layout.normalize}, revision {revision}) -> ONNX opset {opset}"
        )
        names, dims, versions = _export_onnx(layout.transformer_dir, work / MODEL_FILE, opset)
        if layout.dims is not None and layout.dims != dims:
            raise BundleError(f"{source}: pooling dims {layout.dims} != hidden size {dims}")
        shutil.copy2(layout.transformer_dir / TOKENIZER_FILE, work / TOKENIZER_FILE)
        manifest = BundleManifest(
            kind="bi_encoder",
            name=name or out.name,
            max_length=layout.max_length,
            dims=dims,
            input_names=names,
            output_name=OUTPUT_NAME,
            source=source_label or f"dir:{source.resolve()}",
            revision=revision,
            pooling=layout.pooling,
            normalize=layout.normalize,
            exported_with=versions,
        )
        write_manifest(work, manifest)
        check_in_fresh_process(work)
        move_into_place(work, out)
    print(f"export: wrote {out} ({manifest.model_id}, {(out / MODEL_FILE).stat().st_size / 1e6:.1f} MB)")
    return manifest


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sieve_core.models.export", description="Export checkpoints to Sieve model bundles."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bi = sub.add_parser("bi-encoder", help="export a sentence-transformers folder")
    add_bundle_arguments(bi, "sentence-transformers model folder")
    for command, module_name in KIND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a kind whose exporter is not part of this build
            if exc.name != module_name:
                raise
            continue
        module.add_arguments(sub.add_parser(command, help=f"export a {command} checkpoint ({module_name})"))
    check = sub.add_parser("check", help="load a bundle without torch and sanity-check it")
    check.add_argument("--bundle", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "check":
            check_any_bundle(args.bundle)
            return 0
        # Only local files exist here; never let transformers try a model hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if args.command in KIND_MODULES:
            importlib.import_module(KIND_MODULES[args.command]).run(args)
        else:
            export_bi_encoder(
                args.source, args.out, name=args.name, source_label=args.source_label, opset=args.opset
            )
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
