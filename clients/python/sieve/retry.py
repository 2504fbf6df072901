"""When the client retries a call, and how long it waits in between (shared by the sync and async clients).

Retried codes: UNAVAILABLE and RESOURCE_EXHAUSTED, the two ways a server says "not now".

Which calls:

- Idempotent calls are retried on both codes, whatever the server had done: Search and every Get/List
  (they change nothing), UpsertDocuments (idempotent by id: writing the same batch twice leaves the same
  documents; only the generation moves on), DeleteDocuments (by id; a repeat counts the ids as not found),
  CancelJob (cancelling a cancelled job is a no-op) and WatchJob (a new stream starts with the job's current
  state, so a reconnect repeats at most one snapshot).
- CreateCollection, DeleteCollection and StartIndexJob are not idempotent (a repeat after a lost reply
  answers ALREADY_EXISTS / NOT_FOUND, or starts a second job), so they are retried only when the server
  provably did nothing: the refusal carries `google.rpc.RetryInfo` (the server's word that it refused the
  call before doing work), the connection was never made (the request was not sent), or the server
  answered with its start-up refusal ("server is starting", sent before any handler runs; until the
  server attaches RetryInfo to it, it is recognised by that text).
- UploadIndexJob is never retried: its request stream comes from an iterator that cannot be replayed.

RESOURCE_EXHAUSTED for a message over the size limit is never retried (it would fail the same way).

The wait: the server's `RetryInfo.retry_delay` when it sends one; otherwise exponential backoff with full
jitter (`initial_backoff * multiplier**n`, capped at `max_backoff`, a uniform draw below that). Retries
never outlast the call's deadline: the deadline covers all attempts, and a wait that would pass it ends
the call with the last error instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

# Full method names (service/method) of the calls that are safe to repeat whatever the server did.
IDEMPOTENT = frozenset(
    {
        "CollectionService/GetCollection",
        "CollectionService/ListCollections",
        "DocumentService/UpsertDocuments",
        "DocumentService/GetDocuments",
        "DocumentService/DeleteDocuments",
        "SearchService/Search",
        "SearchService/SearchStream",  # a read; retried only before its first message
        "JobService/GetJob",
        "JobService/WatchJob",
        "JobService/CancelJob",
        "JobService/ListJobs",
    }
)
NEVER_RETRIED = frozenset({"JobService/UploadIndexJob"})

# Refusals recognised from the status text alone: grpc-core's for a connection never made (pick_first's
# words, and round_robin's when no server is connected), the Sieve server's start-up gate (server/app.py),
# and grpc-core's for a message over the size limit.
_REFUSED_BEFORE_WORK = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "server is starting",
)
_TOO_LARGE = "message larger than max"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry. `RetryPolicy(max_attempts=1)` turns retries off."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # The longest RetryInfo delay honoured; a server asking for more ends the call with its error.
    max_retry_delay: float = 30.0

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based) when the server named no delay."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return (rng or random).uniform(0, cap)


def _short(method: str) -> str:
    return method.removeprefix("/sieve.v1.")


def is_retryable(method: str, code: grpc.StatusCode, message: str, retry_delay: float | None) -> bool:
    """Whether a failed attempt of `method` ("/sieve.v1.Service/Method") may be sent again."""
    name = _short(method)
    if code not in RETRYABLE_CODES or name in NEVER_RETRIED:
        return False
    text = message.lower()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in text and retry_delay is None:
        return False
    if name in IDEMPOTENT:
        return True
    if retry_delay is not None:
        return True
    return code == grpc.StatusCode.UNAVAILABLE and any(marker in text for marker in _REFUSED_BEFORE_WORK)


def next_wait(
    policy: RetryPolicy, attempt: int, retry_delay: float | None, remaining: float | None
) -> float | None:
    """Seconds to sleep before attempt `attempt + 1`, or None to give up (attempts used up, the server's
    delay too long, or the wait would pass the deadline `remaining` seconds away)."""
    if attempt >= policy.max_attempts:
        return None
    if retry_delay is not None:
        if retry_delay > policy.max_retry_delay:
            return None
        wait = retry_delay
    else:
        wait = policy.backoff(attempt)
    if remaining is not None and wait >= remaining:
        return None
    return wait
