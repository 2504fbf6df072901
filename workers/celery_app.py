"""The Celery app of the Sieve workers: the shared task contract (sieve_core.tasking) plus the task code.

Start a worker (SIEVE_REDIS_URL and SIEVE_MODELS_DIR set, from the repository root):

    celery -A workers.celery_app worker -Q embed,colbert -c 1 --loglevel INFO

Each pool process loads its ONNX sessions once, at start (see workers/runtime.py), with intra-op
threads = cores // concurrency. Queues, task names, time limits and the Celery configuration are the
contract in sieve_core/tasking.py, which the server uses to send tasks without importing this package.

Logging: the worker takes over Celery's logging set-up (sieve_core.logs, SIEVE_LOG_FORMAT text or JSON);
log lines about a task carry the request id the server sent with it (see workers/tasks.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import setup_logging

from sieve_core.config import Settings, load_settings
from sieve_core.logs import configure_logging
from sieve_core.tasking import SieveCelery, client_app
from workers import tasks


def create_app(settings: Settings | None = None) -> SieveCelery:
    """The worker's app: the shared configuration with the task functions registered."""
    app = client_app(settings)
    tasks.register(app)
    return app


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, logfile: str | None = None, **_: Any) -> None:
    """The worker logs like the server (sieve_core.logs: SIEVE_LOG_FORMAT text or JSON, each line with the
    request id of the task it is about). A receiver of this signal replaces Celery's own logging set-up.

    Level: SIEVE_LOG_LEVEL, or celery's `--loglevel` when that is more verbose. `--logfile` is honoured."""
    settings = getattr(globals().get("app"), "settings", None) or load_settings()
    level = logging.getLevelName(settings.log_level)
    if isinstance(loglevel, str):
        loglevel = logging.getLevelName(loglevel.upper())
    if isinstance(loglevel, int) and loglevel:
        level = min(level, loglevel)
    configure_logging(logging.getLevelName(level), settings.log_format, filename=logfile or None)


def __getattr__(name: str) -> SieveCelery:
    # `celery -A workers.celery_app` looks up `app` (then `celery`); building it on first access keeps
    # settings from being read at import time, e.g. by a test that imports QUEUES.
    if name in ("app", "celery"):
        app = create_app()
        globals().update(app=app, celery=app)
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
