"""Errors the core raises. The server maps each to one gRPC status code in one place.

Core code raises these with a message written for the client; anything else that escapes a handler
is a bug, reported to the client as INTERNAL with a generic message and logged with its traceback.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path


class SieveError(Exception):
    """Base class: an error whose message is meant for the caller."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SieveError):
    code = "INVALID_ARGUMENT"


class NotFound(SieveError):
    code = "NOT_FOUND"


class AlreadyExists(SieveError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SieveError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(SieveError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(SieveError):
    code = "UNAVAILABLE"


class DeadlineExceeded(SieveError):
    code = "DEADLINE_EXCEEDED"


# -- storage faults ---------------------------------------------------------------------------------
# SQLite's primary result codes (the low byte of an extended code, e.g. SQLITE_IOERR_WRITE = 778).
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 8, 10, 13, 14


def storage_error(exc: BaseException, data_dir: Path) -> SieveError | None:
    """The client-facing error for a write that failed because of the data directory, else None.

    The one place that recognises a full or read-only data directory, from an OSError's errno or a
    sqlite3 error's result code. SQLite reports a write to a file system remounted read-only (e.g. by
    the kernel after disk errors) as a plain I/O error, so for those the directory itself is asked.
    Either way the write was not applied: the store's transactions are atomic.
    """
    full = f"data directory {data_dir} is full"
    read_only = f"data directory {data_dir} is read-only"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return ResourceExhausted(f"{full} (no space left on device); the write was not applied")
        if exc.errno == errno.EDQUOT:
            return ResourceExhausted(f"{full} (disk quota exceeded); the write was not applied")
        if exc.errno == errno.EROFS:
            return FailedPrecondition(f"{read_only}; the write was not applied (searches still work)")
        return None
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            return ResourceExhausted(f"{full} (database or disk is full); the write was not applied")
        if code in (_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN) and is_read_only(data_dir):
            return FailedPrecondition(f"{read_only}; the write was not applied (searches still work)")
    return None


def is_read_only(path: Path) -> bool:
    """Whether the directory `path` is on a file system that refuses writes as read-only."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return False
    # A file system the kernel stopped after an error (ext4's errors=remount-ro shows `emergency_ro`
    # on Linux 6.x) still says read-write to statvfs: only a write tells. An unnamed temporary file
    # leaves nothing behind; file systems without O_TMPFILE answer with another errno (not read-only).
    try:
        fd = os.open(path, getattr(os, "O_TMPFILE", 0) | os.O_WRONLY, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    return False
