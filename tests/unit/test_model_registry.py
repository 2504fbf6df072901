"""The model registry: the one kind check, manifests read once, names that cannot leave the models folder.

Bundles here are manifests next to files that are not models: anything that built an ONNX session from
them would fail with an ONNX error, so a ModelKindError proves the kind was refused before any loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sieve_core.models.bundle import FORMAT_VERSION, BundleError
from sieve_core.models.registry import (
    EMBEDDING,
    PAIR_SCORES,
    TOKEN_VECTORS,
    ModelKindError,
    ModelRegistry,
    Use,
)


def fake_bundle(models: Path, name: str, kind: str, revision: str = "r1") -> Path:
    bundle = models / name
    bundle.mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"not a model")
    (bundle / "tokenizer.json").write_text("{}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "max_length": 32,
        "dims": 1 if kind == "cross_encoder" else 8,
        "input_names": ["input_ids", "attention_mask"],
        "output_name": "out",
        "source": "test",
        "revision": revision,
        "pooling": "none" if kind != "bi_encoder" else "mean",
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    for name, kind in (("bi", "bi_encoder"), ("col", "colbert"), ("ce", "cross_encoder")):
        fake_bundle(tmp_path, name, kind)
    return ModelRegistry(tmp_path)


@pytest.mark.parametrize(
    ("name", "use", "fits"),
    [
        ("bi", EMBEDDING, True),
        ("col", EMBEDDING, False),
        ("ce", EMBEDDING, False),
        ("bi", TOKEN_VECTORS, True),
        ("col", TOKEN_VECTORS, True),
        ("ce", TOKEN_VECTORS, False),
        ("ce", PAIR_SCORES, True),
        ("bi", PAIR_SCORES, False),
    ],
)
def test_kind_is_checked_against_the_use(registry: ModelRegistry, name: str, use: Use, fits: bool) -> None:
    if fits:
        assert registry.manifest(name, use).kind in use.kinds
        return
    with pytest.raises(ModelKindError) as err:
        registry.manifest(name, use)
    kind = registry.manifest(name).kind
    assert f"model {name!r} is a {kind!r} bundle; {use.what} needs a" in str(err.value)


@pytest.mark.parametrize("get", ["bi_encoder", "token_runner", "cross_encoder"])
def test_a_wrong_kind_is_refused_before_any_session_is_built(registry: ModelRegistry, get: str) -> None:
    wrong = {"bi_encoder": "ce", "token_runner": "ce", "cross_encoder": "col"}[get]
    with pytest.raises(ModelKindError):
        getattr(registry, get)(wrong)
    # The same bundle with a fitting use does try to build its session, and the fake graph fails there.
    with pytest.raises(Exception) as err:
        registry.get(wrong)
    assert not isinstance(err.value, ModelKindError)


def test_manifests_are_read_once(registry: ModelRegistry, tmp_path: Path) -> None:
    first = registry.manifest("bi")
    (tmp_path / "bi" / "manifest.json").write_text("{ broken")
    assert registry.manifest("bi") is first
    with pytest.raises(BundleError):  # a second registry (another process) reads the disk afresh
        ModelRegistry(tmp_path).manifest("bi")


@pytest.mark.parametrize("name", ["../bi", "a/b", ".hidden", "", "x" * 200])
def test_names_stay_inside_the_models_folder(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(BundleError, match="is not a bundle name"):
        registry.manifest(name)


def test_a_missing_bundle_is_a_bundle_error(registry: ModelRegistry) -> None:
    with pytest.raises(BundleError, match="directory not found"):
        registry.bi_encoder("nope")
