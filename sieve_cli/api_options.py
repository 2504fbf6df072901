"""What the commands that call the API (client_commands.py, job_commands.py) share: the connection options,
a new collection's options, the address they connect to, how a refusal is reported, JSON output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from sieve import SieveError

MODES = ("off", "best_effort", "required")


def add_connection_arguments(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    """--address, --api-key, --tls, --ca-cert and --timeout (every command that calls the server)."""
    parser.add_argument("--address", help="the server (default: SIEVE_GRPC_ADDRESS)")
    parser.add_argument("--api-key", help="sent as `authorization: Bearer KEY`")
    parser.add_argument("--tls", action="store_true", help="use TLS (system trust store unless --ca-cert)")
    parser.add_argument("--ca-cert", type=Path, help="PEM file of the CA to trust (implies --tls)")
    parser.add_argument("--timeout", type=float, help=timeout_help)


def create_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """A new collection's model, metric and stage defaults (`collections create`, `index --create`)."""
    parser.add_argument("--model", default="", help=f"{prefix}bi-encoder bundle (default: the server's)")
    parser.add_argument(
        "--metric", choices=("cosine", "ip", "l2"), help=f"{prefix}metric (default: the server's, cosine)"
    )
    parser.add_argument(
        "--late",
        choices=MODES,
        help=f"{prefix}late-interaction mode of searches that do not say (default off)",
    )
    parser.add_argument(
        "--cross", choices=MODES, help=f"{prefix}cross-encoder mode of searches that do not say (default off)"
    )
    parser.add_argument("--candidates", type=int, help=f"{prefix}candidates retrieved for re-ranking")


def stage_defaults(args: argparse.Namespace) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if args.late:
        defaults["late_interaction"] = args.late
    if args.cross:
        defaults["cross_encoder"] = args.cross
    if args.candidates:
        defaults["retrieve_candidates"] = args.candidates
    return defaults


def address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    from sieve_core.config import load_settings

    return load_settings().grpc_address


def refused(exc: SieveError) -> int:
    """The server's status and message on stderr; exit code 1."""
    print(f"sieve: {exc.code.name}: {exc.message}", file=sys.stderr)
    return 1


def as_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))
