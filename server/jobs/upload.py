"""Uploaded documents for an index job, spooled durably to the data directory before the job exists.

An upload is written to <data_dir>/jobs/uploads/<job id>.jsonl.part as it arrives, then fsynced,
renamed into place and its directory fsynced, and only then is the job created and the upload
acknowledged: a job over an upload resumes after a restart like a job over a file. A `.part` file left
by a crash was never acknowledged and is removed at the next start.

An upload carries either documents (written as Sieve JSONL lines, so a document's line number is its
position in the upload) or raw JSONL bytes cut anywhere (written as they come, read as a file's lines).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from server.core import validation
from server.jobs.source import FORMAT_NAMES, FORMAT_SIEVE, file_identity
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument, ResourceExhausted
from sieve_core.types import Document


@dataclass(frozen=True)
class UploadChunk:
    """One message of an upload: collection, batch size and format (first message); documents or raw JSONL."""

    collection: str
    batch_size: int
    format: int
    documents: list[Document]
    jsonl: bytes = b""


@dataclass(frozen=True)
class Spooled:
    collection: str
    batch_size: int
    format: int
    path: Path
    file_size: int
    mtime_ns: int
    total: int | None  # documents uploaded; None for raw JSONL (counted when the job starts)


def check_format(fmt: int) -> int:
    if fmt not in FORMAT_NAMES:
        raise InvalidArgument(f"unknown source format {fmt}")
    return fmt


async def spool_upload(
    chunks: AsyncIterator[UploadChunk],
    final: Path,
    settings: Settings,
    check_collection: Callable[[str], Awaitable[Any]],
    run: Callable[..., Awaitable[Any]],
    check_open: Callable[[], None],
) -> Spooled:
    """Write the upload to `final` durably. `run(fn, *args)` runs blocking file work off the event loop."""
    part = final.with_name(final.name + ".part")
    spool: BinaryIO = await run(_open, part)
    collection, batch_size, fmt, count, written = "", 0, FORMAT_SIEVE, 0, 0
    kinds: set[str] = set()
    last = b"\n"
    try:
        async for chunk in chunks:
            if not collection:
                if not chunk.collection:
                    raise InvalidArgument("the first message of an upload must name the collection")
                collection = chunk.collection
                batch_size = validation.job_batch_size(chunk.batch_size, settings)
                fmt = check_format(chunk.format)
                await check_collection(collection)
            elif chunk.collection and chunk.collection != collection:
                raise InvalidArgument(
                    f"the upload is for collection {collection!r}; a later message names"
                    f" {validation.shown(chunk.collection)}"
                )
            data = chunk.jsonl
            if chunk.documents:
                kinds.add("documents")
                data = b"".join(_line(d) for d in chunk.documents)
                count += len(chunk.documents)
            elif data:
                kinds.add("jsonl")
            if len(kinds) > 1:
                raise InvalidArgument("an upload carries either documents or raw jsonl, not both")
            if not data:
                continue
            written += len(data)
            if written > settings.job_max_upload_bytes:
                raise ResourceExhausted(
                    f"the upload is larger than {settings.job_max_upload_bytes} bytes "
                    "(SIEVE_JOB_MAX_UPLOAD_BYTES); split it or index a file on the server"
                )
            await run(spool.write, data)
            last = data[-1:]
        if not collection:
            raise InvalidArgument("the upload is empty: the first message must name the collection")
        if not written:
            raise InvalidArgument("no documents in the upload")
        if last != b"\n":
            await run(spool.write, b"\n")
        check_open()
        size, mtime_ns = await run(_commit, spool, part, final)
    except BaseException:
        await run(_drop, spool, part)
        raise
    documents = "documents" in kinds
    return Spooled(
        collection=collection,
        batch_size=batch_size,
        format=FORMAT_SIEVE if documents else fmt,
        path=final,
        file_size=size,
        mtime_ns=mtime_ns,
        total=count if documents else None,
    )


def remove_partial(directory: Path) -> None:
    """Uploads a crash interrupted: never acknowledged, so nobody waits for them."""
    if directory.is_dir():
        for part in directory.glob("*.part"):
            part.unlink(missing_ok=True)


def remove_spools(directory: Path, keep: set[str]) -> None:
    """At start, before any upload: the spools of jobs that are not to run here (ended meanwhile)."""
    if directory.is_dir():
        for spool in directory.glob("*.jsonl"):
            if spool.stem not in keep:
                spool.unlink(missing_ok=True)


def _open(part: Path) -> BinaryIO:
    part.parent.mkdir(parents=True, exist_ok=True)
    return part.open("wb")


def _line(doc: Document) -> bytes:
    line: dict[str, Any] = {"id": doc.id, "text": doc.text}
    if doc.metadata:
        line["metadata"] = doc.metadata
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


def _commit(spool: BinaryIO, part: Path, final: Path) -> tuple[int, int]:
    """fsync the data, rename into place, fsync the directory: the upload survives a crash from here on."""
    spool.flush()
    os.fsync(spool.fileno())
    spool.close()
    os.replace(part, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return file_identity(final)


def _drop(spool: BinaryIO, part: Path) -> None:
    spool.close()
    part.unlink(missing_ok=True)
