"""Channel set-up shared by the sync and async clients: TLS, API key, message limits, default deadlines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from sieve import __version__

# Sent with every call when the client has an API key (`authorization: Bearer <key>`).
API_KEY_HEADER = "authorization"
DEFAULT_ADDRESS = "127.0.0.1:50051"
# The server accepts up to 32 MiB by default (SIEVE_MAX_MESSAGE_BYTES); grpc's own default receive limit
# (4 MiB) would refuse a large search response with full texts.
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Timeouts:
    """Default deadlines in seconds, one per kind of call; a `timeout=` argument overrides them per call.
    A deadline covers the whole call, retries included."""

    default: float = 10.0
    # UpsertDocuments / DeleteDocuments: a batch of 1000 texts is embedded before the call returns.
    write: float = 120.0
    # UploadIndexJob sends a whole file; WatchJob follows a job until it ends.
    stream: float = 24 * 3600.0


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return ((API_KEY_HEADER, f"Bearer {api_key}"),) if api_key else ()


def options(extra: list[tuple[str, object]] | None) -> list[tuple[str, object]]:
    """The client's channel options; `extra` replaces any of them (grpc would take the first of two)."""
    merged: dict[str, object] = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.primary_user_agent": f"sieve-client-python/{__version__}",
    }
    merged.update(extra or [])
    return list(merged.items())


def credentials(
    tls: bool,
    root_certificates: bytes | str | Path | None,
    private_key: bytes | str | Path | None,
    certificate_chain: bytes | str | Path | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: plaintext). Certificates as PEM bytes or a file path; no root certificates
    means the system's trust store."""
    if not (tls or root_certificates or certificate_chain):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(root_certificates),
        private_key=_read(private_key),
        certificate_chain=_read(certificate_chain),
    )
