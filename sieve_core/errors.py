"""Errors the core raises. The server maps each to one gRPC status code in one place.

Core code raises these with a message written for the client; anything else that escapes a handler
is a bug, reported to the client as INTERNAL with a generic message and logged with its traceback.
"""

from __future__ import annotations


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
