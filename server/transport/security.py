"""Who may call what: API keys with roles, and TLS on the gRPC port.

Keys come from SIEVE_API_KEYS (`KEY:ROLE,KEY:ROLE`) and SIEVE_API_KEYS_FILE (`KEY:ROLE` lines, `#`
comments). Roles are ordered: read < write < admin, each including the ones before it. Only SHA-256
digests of the keys are kept, compared in constant time against every key; no message or log line names a
key (a bad entry is named by its position instead).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from sieve_core.config import Settings
from sieve_core.errors import SieveError

log = logging.getLogger("sieve.server")

AUTHORIZATION = "authorization"  # what the Python and TypeScript clients send: `Bearer KEY`
SHORT_KEY_CHARS = 16


class ConfigError(SieveError):
    """Settings the server cannot start with; the message says which setting and why (never a secret)."""

    code = "FAILED_PRECONDITION"


class Role(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def _methods(service: str, role: Role, *names: str) -> dict[str, Role]:
    return {f"/sieve.v1.{service}/{name}": role for name in names}


# The role each sieve.v1 method needs. A method missing here needs admin (tests check none is missing).
METHOD_ROLES: dict[str, Role] = {
    **_methods("CollectionService", Role.READ, "GetCollection", "ListCollections"),
    **_methods("CollectionService", Role.ADMIN, "CreateCollection", "DeleteCollection"),
    **_methods("DocumentService", Role.READ, "GetDocuments"),
    **_methods("DocumentService", Role.WRITE, "UpsertDocuments", "DeleteDocuments"),
    **_methods("SearchService", Role.READ, "Search", "SearchStream"),
    **_methods("JobService", Role.READ, "GetJob", "WatchJob", "ListJobs"),
    **_methods("JobService", Role.WRITE, "StartIndexJob", "UploadIndexJob", "CancelJob"),
}


def role_needed(method: str) -> Role:
    return METHOD_ROLES.get(method, Role.ADMIN)


@dataclass(frozen=True)
class Denial:
    """Why a call may not go ahead: the status and a message that never contains the key."""

    code: grpc.StatusCode
    message: str


class KeyRing:
    """The configured keys (as SHA-256 digests) and their roles."""

    def __init__(self, keys: dict[str, Role]) -> None:
        self._entries = [(hashlib.sha256(key.encode()).digest(), role) for key, role in keys.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def role_of(self, key: str) -> Role | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, role in self._entries:  # every entry, whatever matches: the time does not tell which
            if hmac.compare_digest(known, digest):
                found = role
        return found

    def check(self, method: str, metadata: object) -> Denial | None:
        """None if the call's `authorization: Bearer KEY` has a role high enough for `method`."""
        header = None
        for key, value in metadata or ():  # type: ignore[attr-defined]
            if key == AUTHORIZATION and isinstance(value, str):
                header = value
                break
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Denial(
                grpc.StatusCode.UNAUTHENTICATED,
                "this server needs an API key: send `authorization: Bearer KEY`",
            )
        role = self.role_of(token.strip())
        if role is None:
            return Denial(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
        needed = role_needed(method)
        if role < needed:
            name = method.rsplit("/", 1)[-1]
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs an API key with the {needed.label} role; this key has the {role.label} role",
            )
        return None


_INLINE_COMMENT = re.compile(r"\s+#.*$")


def parse_keys(entries: list[tuple[str, str]]) -> dict[str, Role]:
    """`KEY:ROLE` entries, each with where it came from (for messages), into a key -> role map.
    Raises ConfigError for an empty or unsendable key, an unknown role, or one key with two roles."""
    keys: dict[str, Role] = {}
    origin: dict[str, str] = {}
    for where, entry in entries:
        key, sep, role_name = entry.strip().rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: expected KEY:ROLE (ROLE one of read, write, admin)")
        try:
            role = Role[role_name.strip().upper()]
        except KeyError:
            raise ConfigError(
                f"{where}: unknown role {role_name.strip()[:20]!r} (expected read, write or admin)"
            ) from None
        key = key.strip()
        if not key:
            raise ConfigError(f"{where}: the key is empty")
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise ConfigError(
                f"{where}: the key must be printable ASCII without spaces (it is sent as `Bearer KEY`)"
            )
        if key in keys and keys[key] != role:
            raise ConfigError(
                f"{where}: the same key is also given at {origin[key]} with the {keys[key].label} role "
                f"(here {role.label}); give each key one role"
            )
        if len(key) < SHORT_KEY_CHARS and key not in keys:
            log.warning(
                "%s: a key of %d characters is easy to guess; use at least 32 random characters "
                "(e.g. `openssl rand -hex 32`)",
                where,
                len(key),
            )
        keys.setdefault(key, role)
        origin.setdefault(key, where)
    return keys


def load_keys(settings: Settings) -> KeyRing | None:
    """The keys from SIEVE_API_KEYS and SIEVE_API_KEYS_FILE, or None when neither is set (no
    authentication)."""
    entries: list[tuple[str, str]] = []
    if settings.api_keys is not None:
        parts = settings.api_keys.get_secret_value().split(",")
        # Blank entries (a trailing comma) are skipped; the others keep their position for messages.
        entries += [(f"SIEVE_API_KEYS entry {i}", p) for i, p in enumerate(parts, 1) if p.strip()]
    if settings.api_keys_file is not None:
        entries += _file_entries(settings.api_keys_file)
    if settings.api_keys is None and settings.api_keys_file is None:
        return None
    if not entries:
        raise ConfigError(
            "SIEVE_API_KEYS / SIEVE_API_KEYS_FILE are set but give no key; unset them to run without "
            "authentication"
        )
    return KeyRing(parse_keys(entries))


def _file_entries(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read SIEVE_API_KEYS_FILE {path}: {reason}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = _INLINE_COMMENT.sub("", line).strip()
        if line and not line.startswith("#"):
            entries.append((f"SIEVE_API_KEYS_FILE {path} line {number}", line))
    return entries


# -- TLS ----------------------------------------------------------------------------------------------


def _read_pem(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {setting} {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext). With SIEVE_TLS_CLIENT_CA_FILE, clients must
    present a certificate that CA signed. The files are checked here, so that a wrong path, a key that
    does not match the certificate or a file that is not PEM stops the start with a message saying so,
    instead of every handshake failing later."""
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError(
                "SIEVE_TLS_CLIENT_CA_FILE is set but SIEVE_TLS_CERT_FILE and SIEVE_TLS_KEY_FILE are not: "
                "client certificates need TLS"
            )
        return None
    if cert is None or key is None:
        given, missing = (
            ("SIEVE_TLS_CERT_FILE", "SIEVE_TLS_KEY_FILE")
            if key is None
            else ("SIEVE_TLS_KEY_FILE", "SIEVE_TLS_CERT_FILE")
        )
        raise ConfigError(f"{given} is set but {missing} is not: TLS needs both")
    cert_pem, key_pem = _read_pem("SIEVE_TLS_CERT_FILE", cert), _read_pem("SIEVE_TLS_KEY_FILE", key)
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"SIEVE_TLS_CERT_FILE {cert} and SIEVE_TLS_KEY_FILE {key} are not a PEM certificate chain and "
            f"its private key ({exc.reason or exc})"
        ) from None
    ca_pem = None
    if ca is not None:
        ca_pem = _read_pem("SIEVE_TLS_CLIENT_CA_FILE", ca)
        try:
            check.load_verify_locations(cadata=ca_pem.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"SIEVE_TLS_CLIENT_CA_FILE {ca} is not a PEM CA bundle ({exc})") from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )
