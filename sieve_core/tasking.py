"""The task contract between the server and the workers: queue and task names, time limits, and the
Celery configuration (Redis broker and result backend, one queue per model kind).

Shared by both sides: the server sends tasks by name through `client_app(settings)` (no task code is
imported into the server process), and workers/celery_app.py builds the worker app from the same
configuration and registers the task functions on it.

Queues: `embed` (bi-encoder, bulk indexing, and a ColBERT bundle's document token vectors), `colbert`
(a ColBERT bundle's query encoding, on the query path), `cross_encoder` (cross-encoder re-rank). A machine can run one worker per
queue or one worker on several (`-Q embed,colbert`).

Delivery: tasks are acknowledged after they finish (`acks_late`), each pool process reserves one
message at a time (prefetch 1), and a task whose pool process dies (OOM kill, segfault) runs again on
the next free process: it is re-sent at once with its retry count raised (`task_retry_on_worker_lost`),
and after MAX_WORKER_LOST_RETRIES such losses it fails with WorkerLostError instead of killing process
after process (a "poison" payload). Should the re-send itself fail, the message is put back on its queue
(`task_reject_on_worker_lost`). If a whole worker host disappears, Redis redelivers its unacknowledged
messages after the visibility timeout. Tasks must therefore be idempotent, which ours are: they compute
and return values; only the server writes.

Redis: the broker and the result backend connect through sieve_core.redis_conn, so a password in
SIEVE_REDIS_URL, TLS (`rediss://`, SIEVE_REDIS_TLS_*) and Sentinel (SIEVE_REDIS_SENTINELS) apply to them
as to every other client.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from sieve_core import redis_conn
from sieve_core.config import Settings, load_settings
from sieve_core.logs import quiet_celery_logs

QUEUE_EMBED = "embed"
QUEUE_COLBERT = "colbert"
QUEUE_CROSS_ENCODER = "cross_encoder"
QUEUES = (QUEUE_EMBED, QUEUE_COLBERT, QUEUE_CROSS_ENCODER)

TASK_EMBED = "sieve.embed"
TASK_DOCUMENT_TOKENS = "sieve.document_tokens"
TASK_QUERY_TOKENS = "sieve.query_tokens"
TASK_CROSS_ENCODER = "sieve.cross_encoder"

# (soft, hard) time limits per task, seconds. The soft limit raises SoftTimeLimitExceeded in the task;
# the hard one kills the pool process. A re-rank answers a search, whose deadline the server enforces
# itself (and sends as `expires`); the limits here only stop runaway work. An embed or document-tokens
# task is bulk work of up to 1000 texts; a query-tokens task encodes one query.
TIME_LIMITS: dict[str, tuple[int, int]] = {
    TASK_EMBED: (240, 300),
    TASK_DOCUMENT_TOKENS: (240, 300),
    TASK_QUERY_TOKENS: (30, 60),
    TASK_CROSS_ENCODER: (90, 120),
}
# Document work (embedding, a ColBERT bundle's document token vectors) is bulk work on `embed`; a
# ColBERT bundle's query encoding answers a search and gets its own queue, not stuck behind bulk work.
ROUTES = {
    TASK_EMBED: {"queue": QUEUE_EMBED},
    TASK_DOCUMENT_TOKENS: {"queue": QUEUE_EMBED},
    TASK_QUERY_TOKENS: {"queue": QUEUE_COLBERT},
    TASK_CROSS_ENCODER: {"queue": QUEUE_CROSS_ENCODER},
}
# An unacknowledged message is redelivered after this long. It must exceed the longest time a task can
# hold its message (the hard limit, as prefetch is 1), or a slow but healthy task would run twice.
MAX_WORKER_LOST_RETRIES = 2
VISIBILITY_TIMEOUT_S = max(hard for _, hard in TIME_LIMITS.values()) + 60
RESULT_EXPIRES_S = 3600


class SieveCelery(Celery):
    """A Celery app that keeps the Settings it was built from (workers read models_dir etc. there)."""

    settings: Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    if settings.redis_url is None:
        raise RuntimeError(
            "SIEVE_REDIS_URL is not set: the workers need the Redis that the server uses as its Celery "
            "broker (`sieve run` prints it; e.g. SIEVE_REDIS_URL=redis://127.0.0.1:6390/0)"
        )
    # The broker and the result backend: TLS (rediss://) and Sentinel as for every other client.
    connection = redis_conn.celery_connection(settings)
    visibility = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return {
        **connection,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # One direct exchange per queue: queues declared without one would all share the default
        # exchange and routing key, and a message for one queue would be copied into the others.
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "task_default_queue": QUEUE_EMBED,
        "task_default_exchange": QUEUE_EMBED,
        "task_default_routing_key": QUEUE_EMBED,
        "task_routes": ROUTES,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # STARTED (with the pool process id) is stored when a task begins: the caller can tell queued
        # from running, e.g. to report "no workers" rather than "too slow".
        "task_track_started": True,
        # Tasks declare their limits (TIME_LIMITS); these defaults catch any task that does not.
        "task_soft_time_limit": 60,
        "task_time_limit": 90,
        "result_expires": RESULT_EXPIRES_S,
        "broker_transport_options": {**connection.get("broker_transport_options", {}), **visibility},
        "result_backend_transport_options": {
            **connection.get("result_backend_transport_options", {}),
            **visibility,
        },
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": False,
        "timezone": "UTC",
    }


def client_app(settings: Settings | None = None) -> SieveCelery:
    """An app that sends tasks by name (the server's side): configured, no task functions registered."""
    settings = settings or load_settings()
    quiet_celery_logs()  # no task results at INFO, no tracebacks for handled Redis outages
    app = SieveCelery("sieve", set_as_current=False)
    app.config_from_object(celery_config(settings))
    app.settings = settings
    return app
