"""The one model registry of a process (the server's or a worker pool process's): runners by bundle name.

Each runner is built once, warmed up once, then shared by every thread and caller of the process; a
manifest can be read without building the runner (the server only needs the re-rankers' identities, the
workers run them). A bundle's kind is checked against what the caller wants it for here, and only here:
`bi_encoder(name)`, `token_runner(name)` and `cross_encoder(name)` either return a runner that can do the
job or raise ModelKindError saying what the bundle is and what was needed.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sieve_core.models.bundle import BundleError, BundleManifest, load_bundle_manifest

if TYPE_CHECKING:  # the runner modules import onnxruntime: loaded on first use, not with this module
    from sieve_core.models.base import Runner
    from sieve_core.models.bi_encoder import BiEncoderRunner
    from sieve_core.models.colbert import ColbertRunner
    from sieve_core.models.cross_encoder import CrossEncoderRunner

log = logging.getLogger(__name__)

# The runner class of each bundle kind (bundle.KNOWN_KINDS).
RUNNERS = {
    "bi_encoder": ("sieve_core.models.bi_encoder", "BiEncoderRunner"),
    "colbert": ("sieve_core.models.colbert", "ColbertRunner"),
    "cross_encoder": ("sieve_core.models.cross_encoder", "CrossEncoderRunner"),
}
# A folder directly in the models directory: no path separators, no "..".
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Use:
    """What a caller wants a model for, and the bundle kinds that can do it."""

    what: str
    kinds: tuple[str, ...]


EMBEDDING = Use("embedding", ("bi_encoder",))
# A bi-encoder encodes queries and documents alike: MaxSim over its token vectors is zero-shot late
# interaction; a colbert bundle is the trained kind.
TOKEN_VECTORS = Use("late interaction (token vectors)", ("colbert", "bi_encoder"))
PAIR_SCORES = Use("cross-encoder re-ranking", ("cross_encoder",))


class ModelKindError(BundleError):
    """The bundle exists and loads, but is of a kind that cannot do what it was asked for."""


def check_kind(name: str, manifest: BundleManifest, use: Use) -> None:
    if manifest.kind not in use.kinds:
        wanted = " or ".join(repr(k) for k in use.kinds)
        raise ModelKindError(
            f"model {name!r} is a {manifest.kind!r} bundle; {use.what} needs a {wanted} bundle"
        )


def build_runner(
    bundle_dir: str | os.PathLike[str], *, intra_op_threads: int = 0, spin: bool = False
) -> Runner:
    """A new runner of the bundle's kind (BundleError for a missing or broken bundle). Not warmed up; most
    callers want ModelRegistry.get instead, which builds each bundle's runner once."""
    module, name = RUNNERS[load_bundle_manifest(Path(bundle_dir)).kind]
    runner_class = getattr(importlib.import_module(module), name)
    return runner_class(bundle_dir, intra_op_threads=intra_op_threads, spin=spin)


class ModelRegistry:
    def __init__(self, models_dir: Path, *, intra_op_threads: int = 0, spin: bool = False) -> None:
        self.models_dir = models_dir
        self._threads = intra_op_threads
        self._spin = spin
        self._runners: dict[str, Runner] = {}
        self._manifests: dict[str, BundleManifest] = {}
        # Building a runner takes seconds: one lock for that, another (held only for dict access) for
        # manifests, which the server reads on its event loop.
        self._load_lock = threading.Lock()
        self._manifest_lock = threading.Lock()

    def path(self, name: str) -> Path:
        if not _BUNDLE_NAME.fullmatch(name):
            raise BundleError(f"{name!r} is not a bundle name (a folder directly in {self.models_dir})")
        return self.models_dir / name

    def manifest(self, name: str, use: Use | None = None) -> BundleManifest:
        """The bundle's manifest, read once (BundleError if missing or broken; ModelKindError if it is of
        the wrong kind for `use`). Cheap after the first call; builds no runner."""
        with self._manifest_lock:
            found = self._manifests.get(name)
        if found is None:
            found = load_bundle_manifest(self.path(name))
            with self._manifest_lock:
                found = self._manifests.setdefault(name, found)
        if use is not None:
            check_kind(name, found, use)
        return found

    def get(self, name: str, use: Use | None = None) -> Runner:
        """This process's runner of the bundle, built and warmed up on first use."""
        if use is not None:
            self.manifest(name, use)  # the kind first: refuse without building a session
        with self._load_lock:
            found = self._runners.get(name)
            if found is None:
                started = time.perf_counter()
                found = build_runner(self.path(name), intra_op_threads=self._threads, spin=self._spin)
                found.warmup()
                self._runners[name] = found
                with self._manifest_lock:
                    self._manifests[name] = found.manifest
                log.info(
                    "pid %d: loaded %s (%s) with %s intra-op threads, warm in %.2fs",
                    os.getpid(),
                    name,
                    found.model_id,
                    self._threads or "default",
                    time.perf_counter() - started,
                )
        return found

    def add(self, name: str, runner: Runner) -> None:
        """Serve a runner built elsewhere under `name` (a test's fake runner); warmed up here like any other."""
        runner.warmup()
        with self._load_lock, self._manifest_lock:
            self._runners[name] = runner
            self._manifests[name] = runner.manifest

    def bi_encoder(self, name: str) -> BiEncoderRunner:
        return self.get(name, EMBEDDING)  # type: ignore[return-value]

    def token_runner(self, name: str) -> BiEncoderRunner | ColbertRunner:
        return self.get(name, TOKEN_VECTORS)  # type: ignore[return-value]

    def cross_encoder(self, name: str) -> CrossEncoderRunner:
        return self.get(name, PAIR_SCORES)  # type: ignore[return-value]
