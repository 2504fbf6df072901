"""AsyncSieveClient: the asyncio client, with the same methods, deadlines, retries and errors as
`SieveClient` (see `sieve.client`), as coroutines; `watch_job` is an async iterator.

    async with AsyncSieveClient("127.0.0.1:50051") as client:
        response = await client.search("notes", "a cat")
        async for job in client.watch_job(job_id):
            print(job.done, job.total)

Create it inside the running event loop that uses it (grpc.aio channels belong to one loop).
"""

# `timeout=` is the gRPC deadline, sent to the server with the call (grpc-timeout) so that the server
# bounds its own work by it; asyncio.timeout() would only stop waiting here.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from sieve import _build, _channel
from sieve._build import (
    DocumentArg,
    FilterArg,
    FormatArg,
    MetricArg,
    SettingsArg,
    StageModeArg,
    TierArg,
    UploadSource,
)
from sieve._channel import DEFAULT_ADDRESS, Timeouts
from sieve.client import P, retry_wait
from sieve.errors import from_rpc_error
from sieve.retry import RetryPolicy
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


class AsyncSieveClient:
    """The asyncio client; arguments as `SieveClient` (channel: a `grpc.aio.Channel`)."""

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
        channel: grpc.aio.Channel | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.address = address
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self._metadata = _channel.metadata(api_key)
        self._owns_channel = channel is None
        self.tls: bool | None = None
        if channel is None:
            creds = _channel.credentials(tls, root_certificates, private_key, certificate_chain)
            opts = _channel.options(options)
            channel = (
                grpc.aio.insecure_channel(address, options=opts)
                if creds is None
                else grpc.aio.secure_channel(address, creds, options=opts)
            )
            self.tls = creds is not None
        self.channel = channel
        self._collections = collections_pb2_grpc.CollectionServiceStub(channel)
        self._documents = documents_pb2_grpc.DocumentServiceStub(channel)
        self._search = search_pb2_grpc.SearchServiceStub(channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(channel)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> AsyncSieveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(
        self, method: str, call: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> T:
        deadline = time.monotonic() + (self.timeouts.default if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(
                    request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, P + method, attempt)
                wait = retry_wait(self.retry, error, attempt, deadline)
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                await asyncio.sleep(wait)

    # -- collections ------------------------------------------------------------------------------
    async def create_collection(
        self,
        name: str,
        *,
        embedding_model: str = "",
        metric: MetricArg = None,
        defaults: SettingsArg = None,
        timeout: float | None = None,
    ) -> collections_pb2.Collection:
        request = _build.create_collection(name, embedding_model, metric, defaults)
        response = await self._unary(
            "CollectionService/CreateCollection", self._collections.CreateCollection, request, timeout
        )
        return response.collection

    async def get_collection(self, name: str, *, timeout: float | None = None) -> collections_pb2.Collection:
        request = collections_pb2.GetCollectionRequest(name=name)
        response = await self._unary(
            "CollectionService/GetCollection", self._collections.GetCollection, request, timeout
        )
        return response.collection

    async def list_collections(self, *, timeout: float | None = None) -> list[collections_pb2.Collection]:
        request = collections_pb2.ListCollectionsRequest()
        response = await self._unary(
            "CollectionService/ListCollections", self._collections.ListCollections, request, timeout
        )
        return list(response.collections)

    async def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        request = collections_pb2.DeleteCollectionRequest(name=name)
        await self._unary(
            "CollectionService/DeleteCollection", self._collections.DeleteCollection, request, timeout
        )

    # -- documents --------------------------------------------------------------------------------
    async def upsert_documents(
        self, collection: str, documents: Iterable[DocumentArg], *, timeout: float | None = None
    ) -> documents_pb2.UpsertDocumentsResponse:
        request = _build.upsert(collection, documents)
        return await self._unary(
            "DocumentService/UpsertDocuments",
            self._documents.UpsertDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )

    async def get_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.GetDocumentsResponse:
        request = documents_pb2.GetDocumentsRequest(collection=collection, ids=list(ids))
        return await self._unary(
            "DocumentService/GetDocuments", self._documents.GetDocuments, request, timeout
        )

    async def delete_documents(
        self, collection: str, ids: Iterable[str], *, timeout: float | None = None
    ) -> documents_pb2.DeleteDocumentsResponse:
        request = documents_pb2.DeleteDocumentsRequest(collection=collection, ids=list(ids))
        return await self._unary(
            "DocumentService/DeleteDocuments",
            self._documents.DeleteDocuments,
            request,
            self.timeouts.write if timeout is None else timeout,
        )

    # -- search -----------------------------------------------------------------------------------
    async def search(
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
        omit_documents: bool = False,
        min_generation: int = 0,
        timeout: float | None = None,
    ) -> search_pb2.SearchResponse:
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
            ),
            omit_documents=omit_documents,
            min_generation=min_generation,
        )
        return await self._unary("SearchService/Search", self._search.Search, request, timeout)

    async def search_stream(
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
        omit_documents: bool = False,
        min_generation: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[search_pb2.SearchStreamResponse]:
        """As `SieveClient.search_stream`: an async iterator of the stages' rankings, the last final."""
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
            ),
            omit_documents=omit_documents,
            min_generation=min_generation,
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
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, P + method, attempt)
                wait = None if received else retry_wait(self.retry, error, attempt, deadline)
                if wait is None:
                    raise error from exc
                log.info("retrying %s in %.2fs (attempt %d): %s", method, wait, attempt + 1, error)
                await asyncio.sleep(wait)
            finally:
                call.cancel()

    # -- jobs -------------------------------------------------------------------------------------
    async def start_index_job(
        self,
        collection: str,
        path: str | Path,
        *,
        format: FormatArg = "auto",
        batch_size: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.Job:
        request = jobs_pb2.StartIndexJobRequest(
            collection=collection,
            path=str(path),
            format=_build.source_format(format),  # type: ignore[arg-type]
            batch_size=batch_size,
        )
        response = await self._unary("JobService/StartIndexJob", self._jobs.StartIndexJob, request, timeout)
        return response.job

    async def upload_index_job(
        self,
        collection: str,
        source: UploadSource,
        *,
        format: FormatArg = "auto",
        batch_size: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.Job:
        """As `SieveClient.upload_index_job`; the file is read in this thread between sends."""
        requests = _build.upload_messages(collection, source, format=format, batch_size=batch_size)
        try:
            response = await self._jobs.UploadIndexJob(
                requests,
                timeout=self.timeouts.stream if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, P + "JobService/UploadIndexJob") from exc
        return response.job

    async def get_job(
        self,
        job_id: str,
        *,
        max_errors: int = 0,
        errors_after_line: int = 0,
        timeout: float | None = None,
    ) -> jobs_pb2.GetJobResponse:
        request = jobs_pb2.GetJobRequest(
            id=job_id, max_errors=max_errors, errors_after_line=errors_after_line
        )
        return await self._unary("JobService/GetJob", self._jobs.GetJob, request, timeout)

    async def watch_job(
        self, job_id: str, *, min_interval_ms: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jobs_pb2.Job]:
        """Yield the job now and whenever it changes, until it ends; reconnects as `SieveClient.watch_job`."""
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
                async for message in call:
                    attempt = 0
                    yield message.job
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, P + method, max(attempt, 1))
                wait = retry_wait(self.retry, error, max(attempt, 1), deadline)
                if wait is None:
                    raise error from exc
                log.info("reconnecting %s in %.2fs: %s", method, wait, error)
                await asyncio.sleep(wait)
            finally:
                call.cancel()

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> jobs_pb2.Job:
        request = jobs_pb2.CancelJobRequest(id=job_id)
        return (await self._unary("JobService/CancelJob", self._jobs.CancelJob, request, timeout)).job

    async def list_jobs(
        self, *, collection: str = "", limit: int = 0, timeout: float | None = None
    ) -> list[jobs_pb2.Job]:
        request = jobs_pb2.ListJobsRequest(collection=collection, limit=limit)
        response = await self._unary("JobService/ListJobs", self._jobs.ListJobs, request, timeout)
        return list(response.jobs)
