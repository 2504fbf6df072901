"""Thin Celery tasks: a contract's JSON in, a shared service call, the result's JSON out.

The logic lives in sieve_core.late_interaction_service, so the server can run it in-process as well.
Every task is idempotent (it computes and returns values; only the cross-encoder writes content-addressed
cache entries; the server stores the rest), as redelivery requires.

Request ids: the server puts the id of the call a task serves into the task's `sieve_request_id` header
(an index job's batches carry `job-<job id>`). For the task's duration the worker sets
sieve_core.logs.request_id from it (task_prerun / task_postrun), so every log line about the task,
Celery's own included, carries it; each task ends with one INFO line: task, state, items, ms.
"""

from __future__ import annotations

import logging
import time
from contextvars import Token
from typing import Any, TypeVar

from celery import Celery, Task
from celery.signals import task_postrun, task_prerun
from pydantic import ValidationError

from sieve_core import late_interaction_service as service
from sieve_core.contracts import (
    Contract,
    CrossEncoderRequest,
    DocumentTokensRequest,
    EmbedRequest,
    QueryTokensRequest,
)
from sieve_core.cross_encoder_service import cross_encoder as score_pairs
from sieve_core.errors import InvalidArgument
from sieve_core.logs import REQUEST_ID_HEADER, clean_request_id, request_id
from sieve_core.tasking import (
    MAX_WORKER_LOST_RETRIES,
    TASK_CROSS_ENCODER,
    TASK_DOCUMENT_TOKENS,
    TASK_EMBED,
    TASK_QUERY_TOKENS,
    TIME_LIMITS,
)
from workers import runtime

C = TypeVar("C", bound=Contract)
log = logging.getLogger("sieve.worker.tasks")

# task id -> (the request id's reset token, start time); a pool process runs one task at a time, but
# keying by id keeps this right for thread pools too.
_running: dict[str, tuple[Token[str], float]] = {}


@task_prerun.connect
def _enter_task(task_id: str = "", task: Task | None = None, **_: Any) -> None:
    sent = task.request.get(REQUEST_ID_HEADER) if task is not None else None
    # A task sent without the header (e.g. by hand) is logged under its Celery task id.
    rid = clean_request_id(sent) if sent else task_id
    _running[task_id] = (request_id.set(rid), time.perf_counter())


@task_postrun.connect
def _leave_task(
    task_id: str = "",
    task: Task | None = None,
    args: tuple[Any, ...] | None = None,
    state: str | None = None,
    **_: Any,
) -> None:
    entered = _running.pop(task_id, None)
    if entered is None:
        return
    token, started = entered
    try:
        ms = (time.perf_counter() - started) * 1000
        name = getattr(task, "name", "?")
        items = _items(args)
        log.info(
            "task %s %s: %d items in %.1f ms",
            name,
            state or "?",
            items,
            ms,
            extra={"task": name, "task_id": task_id, "state": state, "items": items, "ms": round(ms, 1)},
        )
    finally:
        request_id.reset(token)


def _items(args: tuple[Any, ...] | None) -> int:
    """How many texts (embed, document tokens) or candidates (re-rank) the task's payload held; 1 for a
    query's token vectors."""
    payload = args[0] if args else None
    if not isinstance(payload, dict):
        return 0
    for key in ("texts", "candidates"):
        if isinstance(payload.get(key), list):
            return len(payload[key])
    return 1 if isinstance(payload.get("query"), str) else 0  # a query-encoding task


def _parse(contract: type[C], payload: dict[str, Any]) -> C:
    # A plain SieveError crosses the result backend as JSON and is rebuilt by the caller; a pydantic
    # ValidationError would not be.
    try:
        return contract.from_json(payload)
    except ValidationError as exc:
        raise InvalidArgument(f"bad {contract.__name__}: {exc}") from None


def embed(payload: dict[str, Any]) -> dict[str, Any]:
    """EmbedRequest -> EmbedResult: vectors, and with a token format the texts' compressed token vectors
    (the bi-encoder's own from the same encoder run, or a ColBERT bundle's)."""
    request = _parse(EmbedRequest, payload)
    token_runner = runtime.token_runner(request.token_model) if request.token_model else None
    result = service.embed(
        runtime.bi_encoder(request.model),
        request,
        token_runner=token_runner,
        batch_size=runtime.embed_batch_size(),
    )
    return result.to_json()


def document_tokens(payload: dict[str, Any]) -> dict[str, Any]:
    """DocumentTokensRequest -> DocumentTokensResult: pending documents' token vectors, compressed."""
    request = _parse(DocumentTokensRequest, payload)
    result = service.document_tokens(
        runtime.token_runner(request.model), request, batch_size=runtime.embed_batch_size()
    )
    return result.to_json()


def query_tokens(payload: dict[str, Any]) -> dict[str, Any]:
    """QueryTokensRequest -> QueryTokensResult: one query's token vectors (the server runs MaxSim)."""
    request = _parse(QueryTokensRequest, payload)
    return service.query_tokens(runtime.token_runner(request.model), request).to_json()


def cross_encoder(payload: dict[str, Any]) -> dict[str, Any]:
    """CrossEncoderRequest -> CrossEncoderResult: one score per (query, candidate), cached per pair."""
    request = _parse(CrossEncoderRequest, payload)
    found = runtime.cross_encoder(request.model)
    result = score_pairs(
        found, runtime.scores_cache(), request, batch_size=runtime.cross_encoder_batch_size()
    )
    return result.to_json()


TASKS = {
    TASK_EMBED: embed,
    TASK_DOCUMENT_TOKENS: document_tokens,
    TASK_QUERY_TOKENS: query_tokens,
    TASK_CROSS_ENCODER: cross_encoder,
}


def register(app: Celery) -> None:
    """Registers the tasks on an app under their public names, each with its time limits."""
    for name, func in TASKS.items():
        soft, hard = TIME_LIMITS[name]
        app.task(
            name=name,
            soft_time_limit=soft,
            time_limit=hard,
            # Only a lost pool process retries (task_retry_on_worker_lost), at once, and a bounded number
            # of times; the tasks never call self.retry().
            max_retries=MAX_WORKER_LOST_RETRIES,
            default_retry_delay=0,
            shared=False,
        )(func)
