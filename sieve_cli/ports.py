"""Busy ports, said in one line: which port, and which setting moves it (a second stack on one machine)."""

from __future__ import annotations

import errno
import socket


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def is_busy(address: str) -> bool:
    """True if something already listens on host:port (port 0 is never busy).

    Binds a throwaway socket with SO_REUSEADDR, as the servers do: on Linux that still fails while a socket
    listens there, but not for the TIME_WAIT leftovers of a stack that just stopped. A host this machine
    does not have is not "busy" (the server's own error then says what is wrong)."""
    host, port = _split(address)
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def busy_message(command: str, what: str, address: str, setting: str) -> str:
    port = address.rpartition(":")[2]
    return (
        f"{command}: port {port} is already in use ({what} at {address}): another Sieve running? "
        f"Stop it, or set {setting} to a free port"
    )


def first_busy(command: str, wanted: list[tuple[str, str, str]]) -> str | None:
    """The one-line message for the first (what, address, setting) whose port is taken, or None."""
    for what, address, setting in wanted:
        if address and is_busy(address):
            return busy_message(command, what, address, setting)
    return None
