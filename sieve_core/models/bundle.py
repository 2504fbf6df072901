"""Model bundles: a directory holding `model.onnx`, `tokenizer.json` and `manifest.json`.

The manifest is everything a runner needs to serve the model without the training framework, plus
where the weights came from (`source`, `revision`) so that cache keys can name the exact model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Each kind has its runner module: bi_encoder.py, colbert.py, cross_encoder.py.
KNOWN_KINDS = frozenset({"bi_encoder", "colbert", "cross_encoder"})
KNOWN_POOLING = frozenset({"mean", "cls", "none"})
# Checked in this order: safetensors is what current checkpoints ship; the .bin is the legacy layout.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REVISION_CHARS = 16


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, or has a manifest this code cannot serve."""


@dataclass(frozen=True)
class BundleManifest:
    kind: str
    name: str
    max_length: int
    dims: int
    input_names: list[str]
    output_name: str
    source: str
    revision: str
    pooling: str = "mean"
    normalize: bool = True
    exported_with: dict[str, Any] = field(default_factory=dict)
    # Kind-specific serving settings (ColBERT markers and query length, a cross-encoder's activation...),
    # validated by that kind's runner; a bi-encoder has none.
    options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def model_id(self) -> str:
        """Stable identity for cache keys: the name alone would survive a change of weights."""
        return f"{self.name}@{self.revision}"

    @property
    def cache_id(self) -> str:
        """Identity for cached model outputs: the weights (`revision`) and every serving setting that
        changes an output (max length, pooling, normalisation, kind options), as `name@revision.<hash>`."""
        serving = {k: v for k, v in self.to_json().items() if k not in ("exported_with", "source", "name")}
        digest = hashlib.sha256(json.dumps(serving, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model_id}.{digest}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fail(path: Path, problem: str) -> BundleError:
    return BundleError(f"model bundle {path}: {problem}")


def _check_types(data: dict[str, Any], path: Path) -> None:
    expected: dict[str, type | tuple[type, ...]] = {
        "format_version": int,
        "kind": str,
        "name": str,
        "max_length": int,
        "dims": int,
        "input_names": list,
        "output_name": str,
        "source": str,
        "revision": str,
        "pooling": str,
        "normalize": bool,
        "exported_with": dict,
        "options": dict,
    }
    for key, typ in expected.items():
        # bool is an int subclass; a `true` where a count belongs is still a broken manifest.
        value = data.get(key)
        if key in data and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
            expected_name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise _fail(path, f"manifest field {key!r} should be {expected_name}, got {value!r}")
    if not all(isinstance(n, str) for n in data.get("input_names", [])):
        raise _fail(path, "manifest field 'input_names' should be a list of strings")


def _validate(data: Any, path: Path) -> BundleManifest:
    if not isinstance(data, dict):
        raise _fail(path, "manifest.json is not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"unsupported format_version {data.get('format_version')!r} "
            f"(this code reads {FORMAT_VERSION}); re-export the bundle",
        )
    names = {f.name for f in dataclasses.fields(BundleManifest)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _fail(path, f"unknown manifest fields {unknown}")
    required = {
        f.name
        for f in dataclasses.fields(BundleManifest)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise _fail(path, f"manifest is missing fields {missing}")
    _check_types(data, path)
    manifest = BundleManifest(**data)
    if manifest.kind not in KNOWN_KINDS:
        raise _fail(path, f"unknown kind {manifest.kind!r}; expected one of {sorted(KNOWN_KINDS)}")
    if manifest.pooling not in KNOWN_POOLING:
        raise _fail(path, f"unknown pooling {manifest.pooling!r}; expected one of {sorted(KNOWN_POOLING)}")
    if manifest.max_length < 2 or manifest.dims < 1 or not manifest.input_names:
        raise _fail(path, "max_length, dims and input_names must be positive / non-empty")
    return manifest


def load_bundle_manifest(path: str | os.PathLike[str]) -> BundleManifest:
    """Read and validate `<path>/manifest.json`; also checks the model and tokenizer files exist."""
    bundle = Path(path)
    if not bundle.is_dir():
        raise _fail(bundle, "directory not found")
    for required in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (bundle / required).is_file():
            raise _fail(bundle, f"{required} is missing; the bundle is incomplete, re-export it")
    try:
        data = json.loads((bundle / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(bundle, f"cannot read manifest.json: {exc}") from exc
    return _validate(data, bundle)


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: BundleManifest) -> Path:
    """Write `manifest.json` into `bundle_dir` (atomically, so a reader never sees half a file)."""
    target = Path(bundle_dir) / MANIFEST_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def find_weights_file(source_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint's weights file, whose hash is the bundle's revision."""
    for name in WEIGHT_FILES:
        candidate = Path(source_dir) / name
        if candidate.is_file():
            return candidate
    raise BundleError(f"no weights file ({', '.join(WEIGHT_FILES)}) in {source_dir}")


def weights_revision(source_dir: str | os.PathLike[str]) -> str:
    """Short sha256 of the source weights: changes exactly when the exported model would change."""
    with find_weights_file(source_dir).open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return digest[:REVISION_CHARS]
