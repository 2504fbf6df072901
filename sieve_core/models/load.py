"""Build the runner a bundle's manifest asks for: bi_encoder, colbert or cross_encoder."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from sieve_core.models.bundle import load_bundle_manifest

RUNNERS = {
    "bi_encoder": ("sieve_core.models.bi_encoder", "BiEncoderRunner"),
    "colbert": ("sieve_core.models.colbert", "ColbertRunner"),
    "cross_encoder": ("sieve_core.models.cross_encoder", "CrossEncoderRunner"),
}


def load_runner(bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False) -> Any:
    """The runner for the bundle's kind (raises BundleError for a missing or broken bundle)."""
    kind = load_bundle_manifest(Path(bundle_dir)).kind
    module, name = RUNNERS[kind]
    runner_class = getattr(importlib.import_module(module), name)
    return runner_class(bundle_dir, intra_op_threads=intra_op_threads, spin=spin)
