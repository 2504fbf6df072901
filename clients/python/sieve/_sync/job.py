"""JobService calls: index jobs from a file the server reads or one uploaded, followed as they run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from sieve import _build
from sieve._build import FormatArg, UploadSource
from sieve._sync.base import ClientBase, P
from sieve.errors import from_rpc_error
from sieve.v1 import jobs_pb2


class JobCalls(ClientBase):
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
        limit = self.timeouts.stream if timeout is None else timeout
        for message in self._stream("JobService/WatchJob", self._jobs.WatchJob, request, limit, resume=True):
            yield message.job

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
