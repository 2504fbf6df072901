"""The one runner interface, and the base every ONNX runner is built on.

A runner is built once per process from a bundle folder (load: manifest, session, tokenizer), warmed up
once, then shared by the process's threads: nothing in it changes after __init__. The registry
(registry.py) is what builds, warms and hands them out; callers never construct one per request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Protocol

from sieve_core.models.bundle import MODEL_FILE, BundleError, BundleManifest, load_bundle_manifest
from sieve_core.models.onnx_common import make_session


class Runner(Protocol):
    """What every runner is, whatever it computes (sentence vectors, token vectors, pair scores)."""

    manifest: BundleManifest  # the bundle's manifest.json: kind, model identity, serving settings
    model_id: str  # name@revision: what a response and a cache key name

    def warmup(self) -> None:
        """Run the model once, so the first real request does not pay ONNX Runtime's lazy set-up; raises
        BundleError if the outputs are not what the manifest promises."""
        ...


class OnnxRunner:
    """Reads and checks a bundle's manifest, opens its ONNX session and checks the graph against it.

    Subclasses name their KIND, check their kind-specific manifest fields in `_check_manifest` (called
    before the session is built, so a wrong bundle fails fast) and may refine `_check_graph`.
    """

    KIND: ClassVar[str]

    def __init__(
        self, bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False
    ) -> None:
        bundle = Path(bundle_dir)
        self.manifest = load_bundle_manifest(bundle)
        self._check_manifest(bundle)
        self.model_id = self.manifest.model_id
        self.dims = self.manifest.dims
        self._session = make_session(bundle / MODEL_FILE, intra_op_threads, spin)
        self._check_graph(bundle)

    def _check_manifest(self, bundle: Path) -> None:
        if self.manifest.kind != self.KIND:
            raise BundleError(
                f"model bundle {bundle}: {type(self).__name__} serves kind {self.KIND!r}, "
                f"got {self.manifest.kind!r}"
            )

    def _check_graph(self, bundle: Path) -> None:
        # A manifest that disagrees with its graph would fail on the first request; fail at load instead.
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        if graph_inputs != set(self.manifest.input_names) or self.manifest.output_name not in graph_outputs:
            raise BundleError(
                f"model bundle {bundle}: manifest inputs/output {self.manifest.input_names}/"
                f"{self.manifest.output_name!r} do not match the graph's "
                f"{sorted(graph_inputs)}/{sorted(graph_outputs)}"
            )

    def warmup(self) -> None:
        raise NotImplementedError
