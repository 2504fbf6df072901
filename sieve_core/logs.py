"""Logging shared by the server and the workers: text or JSON lines, each carrying the request id.

The server's interceptor sets `request_id` for every call (the client's `x-request-id` metadata, or a new
one); work that call sends to a Celery worker carries it in the task's headers, and the worker sets it
again around the task, so one id follows a request through both processes' logs.
"""

from __future__ import annotations

import json
import logging
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID_METADATA = "x-request-id"
REQUEST_ID_HEADER = "sieve_request_id"  # the Celery task header that carries it to a worker
MAX_REQUEST_ID_CHARS = 128

request_id: ContextVar[str] = ContextVar("sieve_request_id", default="-")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def clean_request_id(value: str | None) -> str:
    """A client-sent id, kept if printable and short; otherwise a new one (ids end up in log lines)."""
    if value and len(value) <= MAX_REQUEST_ID_CHARS and value.isprintable() and value.isascii():
        return value
    return new_request_id()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, plus any `extra=` fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id.get()),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str = "text", filename: str | None = None) -> None:
    """Set up the root logger of this process (server or worker) in the given format, on stderr or
    appended to `filename` (a worker's `--logfile`)."""
    handler = logging.StreamHandler() if filename is None else logging.FileHandler(filename)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class _QuietCelery(logging.Filter):
    """Celery's log records, made short where they are noise, on the loggers themselves (so every handler,
    pytest's too, gets the short form):

    - `Task ...[id] succeeded in 0.31s: <result>`: the result is a base64 vector payload of kilobytes per
      task; its length is logged instead.
    - `Connection to Redis lost: Retry (0/1)` and `... The Celery application must be restarted.` from the
      result backend of a client that waits for results: handled, not fatal. The server's dispatcher
      reports the stage degraded and builds a fresh Celery client for the next task (server/dispatch), so
      these become one WARNING line each, without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name == "celery.app.trace"
            and isinstance(record.args, dict)
            and "return_value" in record.args
        ):
            size = len(str(record.args["return_value"]))
            record.args = {**record.args, "return_value": f"<result of {size} characters, not logged>"}
            if isinstance(getattr(record, "data", None), dict):  # Celery's extra=, which JSON logs print
                record.data = record.args
        elif record.name in ("celery.backends.redis", "celery.backends.asynchronous") and (
            "Connection to Redis lost" in str(record.msg) or "must be restarted" in str(record.msg)
        ):
            lost = "Connection to Redis lost" in str(record.msg)
            record.msg = (
                "the Celery result store lost its Redis connection; retrying"
                if lost
                else "the Celery result store could not reconnect to Redis; the next task gets a fresh client"
            )
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_QUIET = _QuietCelery()


def quiet_celery_logs() -> None:
    """Install the filter above on Celery's loggers (idempotent; called wherever a Celery app is built)."""
    for name in ("celery.app.trace", "celery.backends.redis", "celery.backends.asynchronous"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
