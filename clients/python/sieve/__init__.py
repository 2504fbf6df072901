"""Sieve: Python client for the sieve.v1 gRPC search API.

`SieveClient` (blocking) and `AsyncSieveClient` (asyncio) are a small facade over the generated stubs in
`sieve.v1`: one method per RPC with typed arguments, a deadline on every call, retries where safe
(`sieve.retry`), and a `SieveError` subclass per status code (`sieve.errors`). Results are the generated
messages, re-exported here with the enums.
"""

__version__ = "0.2.0"

from sieve._channel import API_KEY_HEADER, Timeouts
from sieve.aio import AsyncSieveClient
from sieve.client import SieveClient
from sieve.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SieveError,
    Unauthenticated,
    Unavailable,
)
from sieve.retry import RetryPolicy
from sieve.v1.collections_pb2 import Collection
from sieve.v1.common_pb2 import Filter, Metric, SearchSettings, SearchTier, Stage, StageMode
from sieve.v1.documents_pb2 import Document
from sieve.v1.jobs_pb2 import Job, JobState, SourceFormat
from sieve.v1.search_pb2 import (
    Hit,
    SearchResponse,
    SearchStreamResponse,
    Span,
    StageReport,
    StageScore,
    StageStatus,
)

FINAL_JOB_STATES = frozenset(
    {JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED}
)

__all__ = [
    "API_KEY_HEADER",
    "FINAL_JOB_STATES",
    "AlreadyExists",
    "AsyncSieveClient",
    "Collection",
    "DeadlineExceeded",
    "Document",
    "FailedPrecondition",
    "Filter",
    "Hit",
    "Internal",
    "InvalidArgument",
    "Job",
    "JobState",
    "Metric",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SearchResponse",
    "SearchSettings",
    "SearchStreamResponse",
    "SearchTier",
    "SieveClient",
    "SieveError",
    "SourceFormat",
    "Span",
    "Stage",
    "StageMode",
    "StageReport",
    "StageScore",
    "StageStatus",
    "Timeouts",
    "Unauthenticated",
    "Unavailable",
]
