"""Per-process state of a worker: settings, ONNX runners and the scores cache, built once per process.

The worker's parent process records its settings and concurrency at `worker_init`, then forks its pool;
each pool process builds its runners at `worker_process_init`, so no ONNX session and no Redis socket is
ever created before a fork and shared by several processes. Each session gets
`intra_op_threads = max(1, cores // concurrency)` (or SIEVE_ONNX_THREADS when set), so that `-c N`
processes together use the machine's cores instead of N times them.

With a pool that does not fork (`-P solo`, `-P threads`) there is no worker_process_init; runners are
then built on the first task instead, which logs that it did.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery.signals import worker_init, worker_process_init

from sieve_core.cache import ResultCache
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument
from sieve_core.models.registry import ModelKindError, ModelRegistry

if TYPE_CHECKING:
    from sieve_core.models.base import Runner
    from sieve_core.models.bi_encoder import BiEncoderRunner
    from sieve_core.models.colbert import ColbertRunner
    from sieve_core.models.cross_encoder import CrossEncoderRunner

log = logging.getLogger("sieve.worker")
R = TypeVar("R")

_settings: Settings | None = None
_concurrency = 1
_queues: set[str] = set()  # the queues this worker consumes (from -Q), empty if unknown
_models: ModelRegistry | None = None  # this process's, built after the fork
_scores: ResultCache | None = None
_lock = threading.Lock()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def intra_op_threads(settings: Settings, concurrency: int) -> int:
    if settings.onnx_threads > 0:
        return settings.onnx_threads
    return max(1, available_cores() // max(1, concurrency))


@worker_init.connect
def _record_worker(sender: Any = None, **_: Any) -> None:
    """In the worker's parent process, before the pool forks."""
    global _settings, _concurrency, _queues
    app = getattr(sender, "app", None)
    _settings = getattr(app, "settings", None)
    _concurrency = int(getattr(sender, "concurrency", 1) or 1)
    # `-Q` has been applied by now (setup_queues runs before worker_init): load only what those use.
    queues = getattr(getattr(app, "amqp", None), "queues", None)
    _queues = set(queues.consume_from) if queues is not None else set()


@worker_process_init.connect
def _load_in_pool_process(**_: Any) -> None:
    """In each pool process, right after the fork: build and warm the runners this worker's queues use."""
    settings = _require_settings()
    for model in _models_for(settings, _queues):
        try:
            runner(model)
        except Exception:
            # The process stays up; every task will then fail with this error rather than hang.
            log.exception("pid %d: loading %s failed", os.getpid(), model)


def _models_for(settings: Settings, queues: set[str]) -> list[str]:
    """The bundles a worker on these queues needs at hand (all of them when the queues are unknown)."""
    wanted: list[str] = []
    if not queues or queues & {"embed", "colbert"}:
        wanted.append(settings.default_embedding_model)
        if settings.late_interaction_model:
            wanted.append(settings.late_interaction_model)
    if (not queues or "cross_encoder" in queues) and settings.cross_encoder_model:
        wanted.append(settings.cross_encoder_model)
    return list(dict.fromkeys(wanted))


def configure(settings: Settings, concurrency: int = 1) -> None:
    """For pools without worker_init (and tests): the settings to build runners from."""
    global _settings, _concurrency, _models
    _settings, _concurrency, _models = settings, concurrency, None


def _require_settings() -> Settings:
    global _settings
    if _settings is None:
        from celery import current_app

        _settings = getattr(current_app, "settings", None)
    if _settings is None:
        raise RuntimeError("worker runtime has no settings: start it through workers.celery_app")
    return _settings


def models() -> ModelRegistry:
    """This process's model registry (sieve_core.models.registry), with sessions sized for the pool."""
    global _models
    with _lock:
        if _models is None:
            settings = _require_settings()
            threads = intra_op_threads(settings, _concurrency)
            log.info(
                "pid %d: ONNX sessions get %d intra-op threads (%d cores, concurrency %d)",
                os.getpid(),
                threads,
                available_cores(),
                _concurrency,
            )
            _models = ModelRegistry(settings.models_dir, intra_op_threads=threads, spin=settings.onnx_spin)
        return _models


def runner(model: str) -> Runner:
    """This process's runner for a bundle name (of any kind), built and warmed on first use."""
    return models().get(model)


def _of_kind(get: Callable[[str], R], model: str) -> R:
    # A task naming a bundle of the wrong kind is a bad request: InvalidArgument crosses the result
    # backend as itself (a SieveError), with the registry's message.
    try:
        return get(model)
    except ModelKindError as exc:
        raise InvalidArgument(str(exc)) from None


def bi_encoder(model: str) -> BiEncoderRunner:
    return _of_kind(models().bi_encoder, model)


def token_runner(model: str) -> BiEncoderRunner | ColbertRunner:
    return _of_kind(models().token_runner, model)


def cross_encoder(model: str) -> CrossEncoderRunner:
    return _of_kind(models().cross_encoder, model)


def scores_cache() -> ResultCache:
    """This process's cache of cross-encoder pair scores (same Redis)."""
    global _scores
    with _lock:
        if _scores is None:
            _scores = ResultCache.from_settings(_require_settings(), timeout_s=2.0)
        return _scores


def embed_batch_size() -> int:
    return _require_settings().embed_batch_size


def cross_encoder_batch_size() -> int:
    # A pair is a query plus a whole document: half the embedding batch keeps padding waste similar.
    return max(1, _require_settings().embed_batch_size // 2)
