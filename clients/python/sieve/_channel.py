"""Channel set-up shared by the sync and async clients: TLS, API key, message limits, default deadlines, and
the target and service config that spread calls over several servers.

Several servers: `address` may be a list of "IP:port" (or one string of them, comma-separated). They become
one gRPC target, `ipv4:10.0.0.1:50051,10.0.0.2:50051` (or `ipv6:[::1]:50051,...`), and the channel's service
config picks gRPC's `round_robin` load balancing, which spreads calls over the servers that are up and stops
sending to one whose connection fails. Servers known by name: give one DNS name that resolves to all of them
(e.g. a headless Kubernetes service, `sieve:50051`): gRPC resolves it to every address, spreads the calls
the same way and resolves it again when connections fail (a list of names is refused rather than resolved
once here, which would go stale). With several addresses, a call that fails with UNAVAILABLE is also retried
at once by gRPC itself (the service config's retryPolicy: one attempt per address, at most 5) on another
server, for the idempotent methods only (`sieve.retry.IDEMPOTENT`); the client's own retries (`sieve.retry`:
backoff, RetryInfo, non-idempotent calls refused before any work) come on top as before. The TypeScript
client (clients/node/src/channel.ts) builds the same target and service config.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from sieve import __version__
from sieve.retry import IDEMPOTENT

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


def target(address: str | Sequence[str]) -> tuple[str, int]:
    """The gRPC target for `address` and how many addresses it names: one "host:port" as it is (gRPC resolves
    a name to every address it has); several "IP:port" (a list, or comma-separated) as one `ipv4:` / `ipv6:`
    list. A gRPC target (`ipv4:`, `ipv6:`, `dns:`, `unix:`) is kept."""
    if isinstance(address, str) and address.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        return address, address.count(",") + 1 if address.startswith("ipv") else 1
    items = [address] if isinstance(address, str) else list(address)
    found = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not found:
        raise ValueError("no server address given")
    if len(found) == 1:
        return found[0], 1
    versions, literals = set(), []
    for item in found:
        host, sep, port = item.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        if ip is None or not sep or not port.isdigit():
            raise ValueError(
                f"several addresses must be IP:port, got {item!r}; for servers known by name give one DNS "
                "name that resolves to all of them"
            )
        versions.add(ip.version)
        literals.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(versions) != 1:
        raise ValueError(f"{found}: give IPv4 addresses only or IPv6 only (one gRPC target cannot mix them)")
    return f"ipv{versions.pop()}:{','.join(literals)}", len(literals)


def service_config(address_count: int) -> str:
    """round_robin over the target's addresses; with several, gRPC's own retry of UNAVAILABLE (one attempt
    per address, at most 5, a short backoff) for the idempotent methods."""
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if address_count > 1:
        names = []
        for method in sorted(IDEMPOTENT):
            service, _, name = method.partition("/")
            names.append({"service": f"sieve.v1.{service}", "method": name})
        policy = {
            "maxAttempts": min(address_count, 5),
            "initialBackoff": "0.01s",
            "maxBackoff": "0.1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        config["methodConfig"] = [{"name": names, "retryPolicy": policy}]
    return json.dumps(config)


def options(extra: list[tuple[str, object]] | None, address_count: int = 1) -> list[tuple[str, object]]:
    """The client's channel options; `extra` replaces any of them (grpc would take the first of two)."""
    merged: dict[str, object] = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.primary_user_agent": f"sieve-client-python/{__version__}",
        "grpc.service_config": service_config(address_count),
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
