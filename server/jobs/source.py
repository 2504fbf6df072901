"""Reading an index job's source: JSONL lines -> validated documents in batches, bad lines -> errors.

A source is read as bytes from a byte offset, so a resumed job continues exactly after its last
committed line. Line numbers are physical (1-based, blank lines counted) so that an error points at
the line an editor shows; blank lines are skipped and are neither documents nor errors.

Formats, per line (SOURCE_FORMAT_UNSPECIFIED decides per line: "_id" means BEIR):
  Sieve: {"id": "...", "text": "...", "metadata": {"key": "value"}}   (metadata optional)
  BEIR:  {"_id": "...", "title": "...", "text": "..."}  -> text = (title + " " + text).strip(), as
         sieve_core.beir.load_beir and BEIR's dense models index it; BEIR's "metadata" is not imported.
Ids may be JSON strings or integers (written as decimal strings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from server.core import validation
from server.jobs.job_store import LineError
from sieve_core.config import Settings
from sieve_core.errors import InvalidArgument
from sieve_core.types import Document

FORMAT_AUTO, FORMAT_SIEVE, FORMAT_BEIR = 0, 1, 2
FORMAT_NAMES = {FORMAT_AUTO: "auto", FORMAT_SIEVE: "sieve", FORMAT_BEIR: "beir"}
_READ_CHUNK = 1 << 16


class BadLine(Exception):
    def __init__(self, reason: str, doc_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.doc_id = doc_id


@dataclass
class Batch:
    """Up to `batch_size` consecutive non-blank lines: their valid documents and their bad lines."""

    first_line: int
    last_line: int  # the last line read (inclusive)
    end_offset: int  # byte offset just after `last_line`
    docs: list[Document] = field(default_factory=list)  # one per id: the batch's last line with that id
    lines: dict[str, int] = field(default_factory=dict)  # id -> the line its document comes from
    valid_lines: int = 0  # lines that gave a document (including ones a later line of the batch replaced)
    errors: list[LineError] = field(default_factory=list)


def parse_line(raw: bytes, fmt: int, settings: Settings, where: str) -> Document:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise BadLine("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object (a {type(obj).__name__})")
    metadata: dict[str, str]
    doc_text: object
    beir = fmt == FORMAT_BEIR or (fmt == FORMAT_AUTO and "_id" in obj)
    id_key = "_id" if beir else "id"
    doc_id = _doc_id(obj, id_key)
    if beir:
        title, body = obj.get("title", ""), obj.get("text", "")
        if not isinstance(title, str) or not isinstance(body, str):
            raise BadLine('"title" and "text" must be strings', doc_id)
        doc_text, metadata = (title + " " + body).strip(), {}
    else:
        doc_text = obj.get("text")
        if doc_text is None:
            raise BadLine('missing "text"', doc_id)
        if not isinstance(doc_text, str):
            raise BadLine('"text" must be a string', doc_id)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise BadLine('"metadata" must be an object with string values', doc_id)
    doc = Document(doc_id, doc_text, metadata)
    try:
        validation.document(doc, settings, where)
    except InvalidArgument as exc:
        raise BadLine(exc.message, doc_id) from None
    return doc


def _doc_id(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise BadLine(f'missing id ("{key}")')
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadLine(f'id ("{key}") must be a string or an integer')
    return str(value)


class SourceReader:
    """Reads batches from a byte offset. Not thread-safe: one job's reads run one at a time."""

    def __init__(self, path: Path, fmt: int, settings: Settings, offset: int = 0, line: int = 1) -> None:
        self._file: BinaryIO = path.open("rb")
        self._file.seek(offset)
        self._offset = offset
        self._line = line  # number of the next line to read
        self._fmt = fmt
        self._settings = settings

    def close(self) -> None:
        self._file.close()

    def read_batch(self, size: int) -> Batch | None:
        """The next batch, or None at the end of the file."""
        batch = Batch(first_line=self._line, last_line=self._line - 1, end_offset=self._offset)
        by_id: dict[str, Document] = {}
        lines = 0
        while lines < size:
            raw, too_long = self._next_line()
            if raw is None:
                break
            number = self._line - 1
            batch.last_line, batch.end_offset = number, self._offset
            if not too_long and not raw.strip():
                continue
            lines += 1
            try:
                if too_long:
                    raise BadLine(f"line is longer than {self._settings.job_max_line_bytes} bytes")
                doc = parse_line(raw, self._fmt, self._settings, f"line {number}")
            except BadLine as exc:
                batch.errors.append(LineError(number, exc.doc_id[:256], exc.reason[:500]))
                continue
            by_id.pop(doc.id, None)  # the last line with an id wins; keep the batch in source order
            by_id[doc.id] = doc
            batch.lines[doc.id] = number
            batch.valid_lines += 1
        if lines == 0:
            return None
        batch.docs = list(by_id.values())
        return batch

    def _next_line(self) -> tuple[bytes | None, bool]:
        """(line without its newline, whether it was longer than the limit); (None, False) at the end."""
        limit = self._settings.job_max_line_bytes
        raw = self._file.readline(limit + 1)
        if not raw:
            return None, False
        self._offset += len(raw)
        self._line += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            # Skip the rest of an over-long line without holding it in memory.
            while chunk := self._file.readline(_READ_CHUNK):
                self._offset += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            return b"", True
        return raw.rstrip(b"\r\n"), False


def count_lines(path: Path, limit: int) -> int:
    """Non-blank lines of a file (the job's total), counted as SourceReader reads them."""
    total = 0
    with path.open("rb") as fh:
        while raw := fh.readline(limit + 1):
            if len(raw) > limit and not raw.endswith(b"\n"):
                total += 1  # an over-long line: one error
                while chunk := fh.readline(_READ_CHUNK):
                    if chunk.endswith(b"\n"):
                        break
            elif raw.strip():
                total += 1
    return total


def file_identity(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): a resumed job checks that its source is the file it started on."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def resolve_source(path: str, settings: Settings) -> Path:
    """The file a job reads: absolute, readable, inside SIEVE_JOB_SOURCE_DIRS (a BEIR folder: its corpus.jsonl)."""
    validation.job_path(path)
    shown = validation.shown(path, 200)
    source = Path(path)
    if not source.is_absolute():
        raise InvalidArgument(
            f"path {shown} is not absolute; it is read by the server, not the client"
            " (to send a local file, upload it: UploadIndexJob, `sieve index --upload`)"
        )
    try:
        if source.is_dir():
            if not (source / "corpus.jsonl").is_file():
                raise InvalidArgument(f"{shown} is a directory without a corpus.jsonl")
            source = source / "corpus.jsonl"
        if not source.is_file():
            raise InvalidArgument(
                f"{shown} is not a file on the server (to send a local file, upload it: UploadIndexJob,"
                " `sieve index --upload`)"
            )
        real = source.resolve()
        allowed = [Path(d.strip()).resolve() for d in settings.job_source_dirs.split(",") if d.strip()]
        if allowed and not any(real.is_relative_to(d) for d in allowed):
            raise InvalidArgument(f"{shown} is outside the directories jobs may read (SIEVE_JOB_SOURCE_DIRS)")
        with real.open("rb"):
            pass
    except OSError as exc:
        # e.g. a name too long for the file system, or a directory the server may not search
        raise InvalidArgument(f"the server cannot read {shown}: {exc.strerror}") from None
    return real
