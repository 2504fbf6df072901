"""SieveClient: the blocking client. One channel per client, reused by every call; close it when done.

    from sieve import SieveClient

    with SieveClient("127.0.0.1:50051") as client:
        client.create_collection("notes")
        client.upsert_documents("notes", [{"id": "1", "text": "The cat sat on the mat."}])
        for hit in client.search("notes", "a cat", late_interaction="best_effort").hits:
            print(hit.id, hit.score)

Every call has a deadline (`Timeouts`: 10 s by default, 120 s for writes, 24 h for streams; `timeout=`
per call), is retried on UNAVAILABLE / RESOURCE_EXHAUSTED where that is safe (see `sieve.retry`), and
raises a `sieve.SieveError` subclass on failure. Results are the generated sieve.v1 messages.

The asyncio twin with the same methods is `sieve.AsyncSieveClient` (sieve/aio.py), generated from this
class by scripts/gen_async_client.py, so the two cannot drift: edit this file, then run that script
(`--check`, run by the tests, fails when aio.py is stale). Write the class so the generator's plain rules
apply: bind the result of `self._unary(...)` to a name before using it (it becomes `await self._unary`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc

from sieve import _build, _channel
from sieve._build import (
    DocumentArg,
    FilterArg,
    FormatArg,
    FusionArg,
    MetricArg,
    RetrievalArg,
    SettingsArg,
    StageModeArg,
    TierArg,
    UploadSource,
    VectorArg,
)
from sieve._channel import DEFAULT_ADDRESS, Timeouts
from sieve.errors import SieveError, from_rpc_error
from sieve.retry import RetryPolicy, is_retryable, next_wait
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

log = logging.getLogger("sieve.client")
T = TypeVar("T")

P = "/sieve.v1."  # method names as gRPC spells them, for retry decisions and error messages


def retry_wait(policy: RetryPolicy, error: SieveError, attempt: int, deadline: float) -> float | None:
    """Seconds to wait before trying `error.method` again, or None to raise `error` now."""
    if not is_retryable(error.method, error.code, error.message, error.retry_delay):
        return None
    return next_wait(policy, attempt, error.retry_delay, deadline - time.monotonic())


class SieveClient:
    """A blocking client for a Sieve server.

    address: "host:port". tls: use TLS (implied by root_certificates / certificate_chain); certificates
    are PEM bytes or file paths, none means the system trust store. api_key: sent as
    `authorization: Bearer <key>` with every call. timeouts / retry: default deadlines and retry policy.
    channel: use this channel instead of making one (the client then does not close it). options: extra
    grpc channel options.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        api_key: str | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.address = address
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._metadata = _channel.metadata(api_key)
        self._owns_channel = channel is None
        self.tls: bool | None = None  # unknown for a channel passed in
        if channel is None:
            creds = _channel.credentials(tls, root_certificates, private_key, certificate_chain)
            opts = _channel.options(options)
            channel = (
                grpc.insecure_channel(address, options=opts)
                if creds is None
                else grpc.secure_channel(address, creds, options=opts)
            )
            self.tls = creds is not None
        self.channel = channel
        self._collections = collections_pb2_grpc.CollectionServiceStub(channel)
        self._documents = documents_pb2_grpc.DocumentServiceStub(channel)
        self._search = search_pb2_grpc.SearchServiceStub(channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(channel)

    # -- plumbing -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> SieveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, call: Callable[..., T], request: Any, timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeouts.default if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, P + method, attempt)
                wait = retry_wait(self.retry, error, attempt, deadline)
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                time.sleep(wait)

    # -- collections ------------------------------------------------------------------------------
    def create_collection(
        self,
        name: str,
        *,
        embedding_model: str = "",
        metric: MetricArg = None,
        defaults: SettingsArg = None,
        token_storage: Mapping[str, int] | None = None,
        timeout: float | None = None,
    ) -> collections_pb2.Collection:
        """Create a collection (ALREADY_EXISTS -> `AlreadyExists`). `defaults`: the collection's default
        search settings, e.g. {"late_interaction": "best_effort", "retrieve_candidates": 100}.
        `token_storage`: store late-interaction token vectors in this format, e.g. {"pool_factor": 4}
        or {"pool_factor": 2, "projection_dims": 128} ({} for the server's default format)."""
        request = _build.create_collection(name, embedding_model, metric, defaults, token_storage)
        response = self._unary(
            "CollectionService/CreateCollection", self._collections.CreateCollection, request, timeout
        )
        return response.collection

    def get_collection(self, name: str, *, timeout: float | None = None) -> collections_pb2.Collection:
        request = collections_pb2.GetCollectionRequest(name=name)
        response = self._unary(
            "CollectionService/GetCollection", self._collections.GetCollection, request, timeout
        )
        return response.collection

    def list_collections(self, *, timeout: float | None = None) -> list[collections_pb2.Collection]:
        request = collections_pb2.ListCollectionsRequest()
        response = self._unary(
            "CollectionService/ListCollections", self._collections.ListCollections, request, timeout
        )
        return list(response.collections)

    def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        request = collections_pb2.DeleteCollectionRequest(name=name)
        self._unary(
            "CollectionService/DeleteCollection", self._collections.DeleteCollection, request, timeout
        )

    # -- documents --------------------------------------------------------------------------------
    def upsert_documents(
        self,
        collection: str,
        documents: Iterable[DocumentArg],
        *,
        embedding_model: str = "",
        timeout: float | None = None,
    ) -> documents_pb2.UpsertDocumentsResponse:
        """Insert or replace documents (messages or {"id", "text", "metadata"} dicts) as one atomic batch.
        The response's `generation` can be passed to `search(min_generation=...)` to read this write.
        Documents may carry their own vectors ({"vector": [...]}, a list or a numpy array), stored instead
        of embedding the text; `embedding_model` must then name the collection's model (name or
        name@revision), so that they are comparable with its queries."""
        request = _build.upsert(collection, documents, embedding_model)
        return self._unary(
            "DocumentService/UpsertDocuments",
            self._documents.UpsertDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )

    def get_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.GetDocumentsResponse:
        request = documents_pb2.GetDocumentsRequest(collection=collection, ids=list(ids))
        return self._unary("DocumentService/GetDocuments", self._documents.GetDocuments, request, timeout)

    def delete_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.DeleteDocumentsResponse:
        request = documents_pb2.DeleteDocumentsRequest(collection=collection, ids=list(ids))
        return self._unary(
            "DocumentService/DeleteDocuments",
            self._documents.DeleteDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )

    # -- search -----------------------------------------------------------------------------------
    def search(
        self,
        collection: str,
        query: str,
        *,
        top_k: int = 0,
        filter: FilterArg = None,
        settings: SettingsArg = None,
        retrieve_candidates: int | None = None,
        ef_search: int | None = None,
        late_interaction: StageModeArg = None,
        late_interaction_keep: int | None = None,
        cross_encoder: StageModeArg = None,
        cross_encoder_keep: int | None = None,
        latency_budget_ms: int | None = None,
        tier: TierArg = None,
        retrieval: RetrievalArg = None,
        fusion: FusionArg = None,
        rrf_k: int | None = None,
        dense_weight: float | None = None,
        query_vector: VectorArg | None = None,
        omit_documents: bool = False,
        min_generation: int = 0,
        timeout: float | None = None,
    ) -> search_pb2.SearchResponse:
        """Search a collection. `filter`: {"key": "value", ...} (all must hold) or a `Filter`. Stage modes
        are "off", "best_effort" or "required" (None: the collection default). The response has `hits`
        (each with `stage_scores`, and with late interaction `evidence`: the spans of `hit.text` that
        matched, in code points, so `hit.text[span.start:span.end]` in Python) and one `StageReport` per
        stage in `stages`: a best-effort stage that could not run is reported DEGRADED with a `reason`; a
        required one raises `Unavailable` (no worker) or `FailedPrecondition` (no model).
        `latency_budget_ms` / `tier` ("fast", "balanced", "best"): the server plans the stages to fit and
        says what it cut or skipped in each report's `plan` and `reason`. `retrieval`: "dense", "lexical"
        (BM25) or "hybrid" (both, fused by `fusion`: "rrf" with `rrf_k`, or "weighted" with `dense_weight`).
        `query_vector`: search by this vector (of the collection's model) instead of the query's
        embedding; `query` may then be "" unless lexical retrieval or a re-ranker needs the text."""
        request = _build.search(
            collection,
            query,
            top_k=top_k,
            filter=filter,
            settings=_build.search_settings(
                settings,
                retrieve_candidates=retrieve_candidates,
                ef_search=ef_search,
                late_interaction=late_interaction,
                late_interaction_keep=late_interaction_keep,
                cross_encoder=cross_encoder,
                cross_encoder_keep=cross_encoder_keep,
                latency_budget_ms=latency_budget_ms,
                tier=tier,
                retrieval=retrieval,
                fusion=fusion,
                rrf_k=rrf_k,
                dense_weight=dense_weight,
            ),
            omit_documents=omit_documents,
            min_generation=min_generation,
            query_vector=query_vector,
        )
        return self._unary("SearchService/Search", self._search.Search, request, timeout)

    def search_stream(
        self,
        collection: str,
        query: str,
        *,
        top_k: int = 0,
        filter: FilterArg = None,
        settings: SettingsArg = None,
        retrieve_candidates: int | None = None,
        ef_search: int | None = None,
        late_interaction: StageModeArg = None,
        late_interaction_keep: int | None = None,
        cross_encoder: StageModeArg = None,
        cross_encoder_keep: int | None = None,
        latency_budget_ms: int | None = None,
        tier: TierArg = None,
        retrieval: RetrievalArg = None,
        fusion: FusionArg = None,
        rrf_k: int | None = None,
        dense_weight: float | None = None,
        query_vector: VectorArg | None = None,
        omit_documents: bool = False,
        min_generation: int = 0,
        timeout: float | None = None,
    ) -> Iterator[search_pb2.SearchStreamResponse]:
        """The same search as `search`, as it improves: yields the first stage's ranking as soon as it
        exists, then each later stage's (`message.stage`, `message.result`), the last with `final` set;
        its `result` is what `search` returns. `deadline_reached` on the final message: time ran out and
        the last ranking stands. Not retried once a message has arrived (a search is cheap to ask again)."""
        request = _build.search(
            collection,
            query,
            top_k=top_k,
            filter=filter,
            settings=_build.search_settings(
                settings,
                retrieve_candidates=retrieve_candidates,
                ef_search=ef_search,
                late_interaction=late_interaction,
                late_interaction_keep=late_interaction_keep,
                cross_encoder=cross_encoder,
                cross_encoder_keep=cross_encoder_keep,
                latency_budget_ms=latency_budget_ms,
                tier=tier,
                retrieval=retrieval,
                fusion=fusion,
                rrf_k=rrf_k,
                dense_weight=dense_weight,
            ),
            omit_documents=omit_documents,
            min_generation=min_generation,
            query_vector=query_vector,
        )
        method = "SearchService/SearchStream"
        deadline = time.monotonic() + (self.timeouts.default if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            received = False
            call = self._search.SearchStream(
                request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
            )
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, P + method, attempt)
                wait = None if received else retry_wait(self.retry, error, attempt, deadline)
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                time.sleep(wait)
            finally:
                call.cancel()

    # -- jobs -------------------------------------------------------------------------------------
    def start_index_job(
        self,
        collection: str,
        path: str | Path,
        *,
        format: FormatArg = "auto",
        batch_size: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.Job:
        """Index a JSONL file that the *server* can read (absolute path) in the background; returns the job
        at once. Follow it with `watch_job`. For a file on this machine use `upload_index_job`."""
        request = jobs_pb2.StartIndexJobRequest(
            collection=collection,
            path=str(path),
            format=_build.source_format(format),  # type: ignore[arg-type]
            batch_size=batch_size,
        )
        response = self._unary("JobService/StartIndexJob", self._jobs.StartIndexJob, request, timeout)
        return response.job

    def upload_index_job(
        self,
        collection: str,
        source: UploadSource,
        *,
        format: FormatArg = "auto",
        batch_size: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.Job:
        """Send a local JSONL file (a path, or its bytes as an iterable of chunks) or documents to the
        server, which stores them durably and indexes them as a job; returns the job once the upload is on
        the server's disk. Not retried."""
        requests = _build.upload_messages(collection, source, format=format, batch_size=batch_size)
        method = "JobService/UploadIndexJob"
        try:
            response = self._jobs.UploadIndexJob(
                requests,
                timeout=self.timeouts.stream if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, P + method) from exc
        return response.job

    def get_job(
        self,
        job_id: str,
        *,
        max_errors: int = 0,
        errors_after_line: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.GetJobResponse:
        """The job and a page of its bad lines (`errors`; `next_errors_after_line` for the next page)."""
        request = jobs_pb2.GetJobRequest(
            id=job_id, max_errors=max_errors, errors_after_line=errors_after_line
        )
        return self._unary("JobService/GetJob", self._jobs.GetJob, request, timeout)

    def watch_job(
        self, job_id: str, *, min_interval_ms: int = 0, timeout: float | None = None
    ) -> Iterator[jobs_pb2.Job]:
        """Yield the job now and whenever it changes, until it ends (the last one has a final state).

        Reconnects when the stream breaks with UNAVAILABLE (e.g. a server restart), with the retry
        policy's backoff; the attempt count starts again after every message received."""
        request = jobs_pb2.WatchJobRequest(id=job_id, min_interval_ms=min_interval_ms)
        method = "JobService/WatchJob"
        deadline = time.monotonic() + (self.timeouts.stream if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self._jobs.WatchJob(
                request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
            )
            try:
                for message in call:
                    attempt = 0
                    yield message.job
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, P + method, max(attempt, 1))
                wait = retry_wait(self.retry, error, max(attempt, 1), deadline)
                if wait is None:
                    raise error from exc
                log.info("reconnecting %s in %.2fs: %s", method, wait, error)
                time.sleep(wait)
            finally:
                call.cancel()

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> jobs_pb2.Job:
        request = jobs_pb2.CancelJobRequest(id=job_id)
        response = self._unary("JobService/CancelJob", self._jobs.CancelJob, request, timeout)
        return response.job

    def list_jobs(
        self, *, collection: str = "", limit: int = 0, timeout: float | None = None
    ) -> list[jobs_pb2.Job]:
        request = jobs_pb2.ListJobsRequest(collection=collection, limit=limit)
        response = self._unary("JobService/ListJobs", self._jobs.ListJobs, request, timeout)
        return list(response.jobs)
