"""Runs one index job: reads its source in batches, has them embedded, commits them in source order.

Up to SIEVE_JOB_MAX_INFLIGHT_BATCHES batches are with the embedders at once (backpressure: no more are
read); each batch is committed through the engine's `upsert_embedded` and then checkpointed in the job
store, so a restart resumes after the last committed batch. See server/jobs/manager.py for the whole story.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from server.core.indexing import IndexingEngine, IndexTarget
from server.jobs.embed import (
    Embedded,
    Embedder,
    EmbedFailed,
    InProcessEmbedder,
    Pending,
    Stopped,
)
from server.jobs.embed_workers import WorkerEmbedder
from server.jobs.job_store import CANCELLED, FAILED, RUNNING, SUCCEEDED, LineError, now
from server.jobs.live import LiveJob
from server.jobs.registry import JobRegistry, run_on
from server.jobs.source import Batch, SourceReader, count_lines, file_identity
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition, SieveError

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self, engine: IndexingEngine, settings: Settings, jobs: JobRegistry, files: ThreadPoolExecutor
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._jobs = jobs
        self._files = files

    async def _on_files(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._files, fn, *args)

    async def run(self, live: LiveJob) -> None:
        """Run the job to its end (or its pause at a shutdown), recording how it ended and why."""
        record = live.record
        try:
            await self._execute(live)
        except asyncio.CancelledError:
            raise  # shutdown: the job stays RUNNING on disk and resumes on restart
        except (SieveError, EmbedFailed, OSError) as exc:
            reason = exc.message if isinstance(exc, SieveError) else str(exc)
            if isinstance(exc, OSError):
                reason = f"cannot read the source: {exc}"
            await self._jobs.finish(live, FAILED, f"{reason}; committed through line {record.next_line - 1}")
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("job %s failed (incident %s)", record.id, incident)
            await self._jobs.finish(
                live,
                FAILED,
                f"internal error (incident {incident}); committed through line {record.next_line - 1}",
            )

    async def _execute(self, live: LiveJob) -> None:
        record, s = live.record, self._settings
        target = await self._engine.index_target(record.collection)  # NotFound: it was deleted
        source = Path(record.path)
        if not await self._on_files(source.is_file):
            raise FailedPrecondition(f"the source {record.source} no longer exists on the server")
        if await self._on_files(file_identity, source) != (record.file_size, record.file_mtime_ns):
            raise FailedPrecondition(f"the source {record.source} changed since the job started")
        # As UpsertDocuments does: a collection that stores token vectors gets them with its documents,
        # from the worker that embeds the batch (the same encoder pass, or its ColBERT bundle's own).
        embedder = self._embedder(target, record.id)
        record.state, record.embedder = RUNNING, embedder.name
        record.started_at = record.started_at or now()
        await self._jobs.save(record)
        if record.total is None:
            live.set_status("counting the source's lines", False)
            record.total = await self._on_files(count_lines, source, s.job_max_line_bytes)
            live.set_status("", False)
            await self._jobs.save(record)
        live.progressed()
        reader = await self._on_files(
            SourceReader, source, record.format, s, record.next_offset, record.next_line
        )
        in_flight: deque[tuple[Batch, Pending]] = deque()
        completed = False
        try:
            eof = False
            while True:
                # Keep up to max_inflight batches with the workers (backpressure: no more are read).
                while not eof and not live.stop_requested and len(in_flight) < s.job_max_inflight_batches:
                    batch = await self._on_files(reader.read_batch, record.batch_size)
                    if batch is None:
                        eof = True
                        break
                    in_flight.append((batch, await self._submit(embedder, record.collection, batch)))
                    live.in_flight = len(in_flight)
                if not in_flight:
                    completed = eof
                    break
                if live.stop_requested:
                    break
                batch, pending = in_flight[0]
                try:
                    vectors = await self._vectors(embedder, pending, batch, live)
                except Stopped:
                    break
                in_flight.popleft()
                live.in_flight = len(in_flight)
                await self._commit(live, batch, vectors)
                if record.state == FAILED:
                    break
        finally:
            live.in_flight = 0
            await embedder.discard([p for _, p in in_flight])
            await embedder.close()
            await self._on_files(reader.close)
        await self._end(live, completed)

    async def _submit(self, embedder: Embedder, collection: str, batch: Batch) -> Pending:
        unchanged: set[str] = set()
        if batch.docs:  # texts already stored as they are need no vectors (a replayed batch)
            unchanged = await self._on_files(self._engine.unchanged_ids, collection, batch.docs)
        todo = [d for d in batch.docs if d.id not in unchanged]
        return await embedder.submit([d.id for d in todo], [d.text for d in todo])

    async def _end(self, live: LiveJob, completed: bool) -> None:
        record = live.record
        if record.state == FAILED:
            await self._jobs.finish(live, FAILED, record.reason)
        elif completed:  # every line is committed or recorded, even if a cancel came too late to matter
            await self._jobs.finish(live, SUCCEEDED, "")
        elif live.cancel:
            await self._jobs.finish(
                live, CANCELLED, f"cancelled; committed through line {record.next_line - 1}"
            )
        else:
            await self._jobs.save(record)  # paused by shutdown: RUNNING on disk, resumed on restart

    async def _vectors(
        self, embedder: Embedder, pending: Pending, batch: Batch, live: LiveJob
    ) -> dict[str, Any]:
        """The batch's vectors. If its embedding task keeps failing, find the line at fault: the documents
        the task cannot embed move from the batch to its errors, and the rest goes on."""
        try:
            return await embedder.result(pending, live)
        except EmbedFailed as exc:
            if not exc.by_content:
                raise
            vectors, bad = await self._isolate(embedder, pending.ids, pending.texts, str(exc), live)
        batch.docs = [d for d in batch.docs if d.id not in bad]
        batch.valid_lines -= len(bad)
        for doc_id, reason in bad.items():
            batch.errors.append(LineError(batch.lines[doc_id], doc_id, f"embedding failed: {reason}"[:500]))
        batch.errors.sort(key=lambda e: e.line)
        return vectors

    async def _isolate(
        self, embedder: Embedder, ids: list[str], texts: list[str], reason: str, live: LiveJob
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Bisect a failing batch: each half is tried once; a failing single document is a bad line. If both
        halves fail it is not one bad document but the workers (or several): the job fails."""
        if len(ids) == 1:
            return {}, {ids[0]: reason}
        mid = len(ids) // 2
        vectors: dict[str, Any] = {}
        failing: list[tuple[list[str], list[str], EmbedFailed]] = []
        for part_ids, part_texts in ((ids[:mid], texts[:mid]), (ids[mid:], texts[mid:])):
            pending = await embedder.submit(part_ids, part_texts)
            pending.attempts = self._settings.job_batch_retries  # one try
            try:
                vectors.update(await embedder.result(pending, live))
            except EmbedFailed as exc:
                if not exc.by_content:
                    raise
                failing.append((part_ids, part_texts, exc))
        if len(failing) == 2 and not all(f[2].refused for f in failing):
            raise EmbedFailed(
                f"a batch fails in both halves, so not because of one document: {reason}", False
            )
        bad: dict[str, str] = {}
        for part_ids, part_texts, part_exc in failing:
            more, part_bad = await self._isolate(embedder, part_ids, part_texts, str(part_exc), live)
            vectors.update(more)
            bad.update(part_bad)
        return vectors, bad

    async def _commit(self, live: LiveJob, batch: Batch, embedded: dict[str, Embedded]) -> None:
        record = live.record
        if batch.docs:
            vectors = {i: e.vector for i, e in embedded.items()}
            tokens = {i: e.tokens for i, e in embedded.items() if e.tokens is not None}
            result = await self._engine.upsert_embedded(record.collection, batch.docs, vectors, tokens)
            record.generation = result.generation
        record.done += batch.valid_lines
        record.failed += len(batch.errors)
        record.next_offset, record.next_line = batch.end_offset, batch.last_line + 1
        if record.failed > self._settings.job_max_errors:
            record.state = FAILED
            record.reason = (
                f"more than {self._settings.job_max_errors} bad lines (SIEVE_JOB_MAX_ERRORS); stopped after line "
                f"{batch.last_line}: is this the right file and format?"
            )
        await self._jobs.save(record, batch.errors)
        live.progressed()

    def _embedder(self, target: IndexTarget, job_id: str) -> Embedder:
        if self._settings.redis_url is None:
            # The server's own runner: zero-shot token vectors from the same run; a ColBERT bundle's are
            # left pending for the server's backfill.
            return InProcessEmbedder(partial(self._engine.embed, target.info.name), self._settings)
        model = target.info.embedding_model
        return WorkerEmbedder(self._settings, model, target.token_format, target.token_model, job_id)
