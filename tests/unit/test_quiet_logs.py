"""Issue 16 item 8: Celery's noisy records, made short by sieve_core.logs.quiet_celery_logs, through
Celery's own loggers and message formats (the worker side is checked on a live stack in
tests/system/test_newcomer.py)."""

from __future__ import annotations

import logging

import pytest
from celery.app.trace import LOG_SUCCESS, info
from celery.backends import asynchronous, redis

from sieve_core.logs import quiet_celery_logs


def test_task_results_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    quiet_celery_logs()
    payload = "QUFB" * 600  # a base64 vector payload, as an embed task returns
    with caplog.at_level(logging.INFO):
        info(LOG_SUCCESS, {"id": "t1", "name": "sieve.embed", "return_value": repr(payload), "runtime": 0.3})
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith("Task sieve.embed[t1] succeeded in 0.3s: <result of")
    assert payload not in message and len(message) < 120
    assert payload not in str(record.data)  # type: ignore[attr-defined]


def test_a_redis_outage_in_the_result_backend_is_one_warning_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_celery_logs()
    with caplog.at_level(logging.INFO):
        redis.logger.error(redis.E_LOST.strip(), 0, 1, "now")
        try:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
        except ConnectionError:
            asynchronous.logger.critical(asynchronous.E_RETRY_LIMIT_EXCEEDED, exc_info=True)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in caplog.records)
    assert "must be restarted" not in caplog.text and "Traceback" not in caplog.text


def test_other_celery_records_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    quiet_celery_logs()
    with caplog.at_level(logging.INFO):
        redis.logger.error("Chord %r raised: %r", "g1", "boom")
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.getMessage() == "Chord 'g1' raised: 'boom'"
