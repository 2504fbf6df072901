"""`sieve collections`, `sieve docs` and `sieve search`: the API from the command line, through the Python
client facade (`sieve.SieveClient`) only.

    sieve collections create NAME [--model M] [--metric cosine|ip|l2] [--late MODE] [--candidates N]
    sieve collections list | get NAME | delete NAME
    sieve docs upsert COLLECTION FILE.jsonl      (Sieve lines: {"id", "text", "metadata"}; '-' for stdin)
    sieve docs get COLLECTION ID... | delete COLLECTION ID...
    sieve search QUERY --collection NAME [--top-k K] [--filter KEY=VALUE]... [--late [MODE]] [--cross [MODE]]
                 [--budget MS | --tier fast|balanced|best] [--stream]
                 [--candidates N] [--late-keep N] [--cross-keep N] [--min-generation G] [--json]

Every command takes --address (default SIEVE_GRPC_ADDRESS), --api-key, --tls/--ca-cert, --timeout and
--json (the messages as proto3 JSON, for scripts). Exit codes: 0 done, 1 the server refused (the status
and message go to stderr), 2 bad usage, 3 `docs upsert` done but with bad lines (each listed on stderr
with its line number and reason, the words `sieve index` uses; the good lines are upserted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sieve
from rich.table import Table
from sieve import SieveClient, SieveError
from sieve._build import parse_document

from sieve_cli.api_options import (
    MODES,
    add_connection_arguments,
    address,
    as_dict,
    create_options,
    print_json,
    refused,
    stage_defaults,
)
from sieve_cli.render import console, enum_name, show_collections_table, show_search

EXIT_BAD_LINES = 3  # as `sieve index`: done, but some lines were refused (listed on stderr)


def register(sub: Any) -> None:
    """Adds `collections`, `docs` and `search` to the `sieve` command's subparsers."""
    col = sub.add_parser("collections", help="create, list, show or delete collections")
    csub = col.add_subparsers(dest="collections_command", required=True)
    create = csub.add_parser("create", help="create a collection")
    create.add_argument("name")
    create_options(create)
    parsers = [create]
    for verb, text in (("list", "all collections"), ("get", "one collection"), ("delete", "delete one")):
        p = csub.add_parser(verb, help=text)
        if verb != "list":
            p.add_argument("name")
        parsers.append(p)
    col.set_defaults(func=_collections)

    docs = sub.add_parser("docs", help="upsert, get or delete documents")
    dsub = docs.add_subparsers(dest="docs_command", required=True)
    up = dsub.add_parser("upsert", help="upsert a JSONL file of Sieve lines, in batches")
    up.add_argument("collection")
    up.add_argument("file", help='JSONL ({"id", "text", "metadata"} per line); - for stdin')
    up.add_argument("--batch-size", type=int, default=256, help="documents per UpsertDocuments call")
    parsers.append(up)
    for verb in ("get", "delete"):
        p = dsub.add_parser(verb, help=f"{verb} documents by id")
        p.add_argument("collection")
        p.add_argument("ids", nargs="+", metavar="ID")
        parsers.append(p)
    docs.set_defaults(func=_docs)

    se = sub.add_parser("search", help="search a collection; shows every stage's scores and timings")
    se.add_argument("query")
    se.add_argument("--collection", "-c", required=True)
    se.add_argument("--top-k", "-k", type=int, default=0, help="hits (default: the server's, 10)")
    se.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE", help="repeatable; all must hold"
    )
    se.add_argument(
        "--late", nargs="?", const="best_effort", choices=MODES, help="late interaction (alone: best_effort)"
    )
    se.add_argument(
        "--cross", nargs="?", const="best_effort", choices=MODES, help="cross-encoder (alone: best_effort)"
    )
    se.add_argument("--candidates", type=int, help="candidates the retrieval stage hands on")
    se.add_argument("--late-keep", type=int, help="candidates late interaction keeps")
    se.add_argument("--cross-keep", type=int, help="candidates the cross-encoder keeps")
    se.add_argument("--ef-search", type=int, help="HNSW search breadth")
    se.add_argument(
        "--min-generation", type=int, default=0, help="read your writes: wait for this generation"
    )
    se.add_argument("--omit-documents", action="store_true", help="ids and scores only")
    se.add_argument(
        "--budget", type=int, metavar="MS", help="latency budget: the server plans its stages to fit"
    )
    se.add_argument("--tier", choices=("fast", "balanced", "best"), help="a named budget with depths")
    se.add_argument(
        "--stream", action="store_true", help="SearchStream: print each stage's ranking as it arrives"
    )
    se.set_defaults(func=_search)
    parsers.append(se)

    for p in parsers:
        add_connection_arguments(p, "deadline per call in seconds (default: the client's)")
        p.add_argument("--json", action="store_true", help="print proto3 JSON")


# -- plumbing -------------------------------------------------------------------------------------
@contextmanager
def _client(args: argparse.Namespace) -> Iterator[SieveClient]:
    with SieveClient(
        address(args), tls=args.tls, root_certificates=args.ca_cert, api_key=args.api_key
    ) as client:
        yield client


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            return int(run(client, args))
    except SieveError as exc:
        return refused(exc)


# -- collections ----------------------------------------------------------------------------------
def _collections(args: argparse.Namespace) -> int:
    return _guarded(_collections_on, args)


def _collections_on(client: SieveClient, args: argparse.Namespace) -> int:
    command = args.collections_command
    if command == "create":
        created = client.create_collection(
            args.name,
            embedding_model=args.model,
            metric=args.metric,
            defaults=stage_defaults(args),
            timeout=args.timeout,
        )
        _show_collections([created], args.json, one=True)
    elif command == "list":
        _show_collections(client.list_collections(timeout=args.timeout), args.json)
    elif command == "get":
        _show_collections([client.get_collection(args.name, timeout=args.timeout)], args.json, one=True)
    else:
        client.delete_collection(args.name, timeout=args.timeout)
        if args.json:
            print_json({"deleted": args.name})
        else:
            print(f"deleted collection {args.name!r}")
    return 0


def _show_collections(collections: list[sieve.Collection], as_json: bool, one: bool = False) -> None:
    if as_json:
        print_json(as_dict(collections[0]) if one else [as_dict(c) for c in collections])
    else:
        show_collections_table(collections)


# -- documents ------------------------------------------------------------------------------------
def _docs(args: argparse.Namespace) -> int:
    return _guarded(_docs_on, args)


def _read_lines(path: str) -> Iterator[tuple[int, sieve.Document | str]]:
    """(line number, document) for each good line, (line number, reason) for each bad one: the checks and
    words of `sieve index` (the server's), so one file gets the same verdicts either way."""
    with contextlib.nullcontext(sys.stdin.buffer) if path == "-" else Path(path).open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            try:
                yield number, parse_document(json.loads(line))
            except json.JSONDecodeError as exc:
                yield number, f"invalid JSON: {exc.msg} at column {exc.colno}"
            except ValueError as exc:
                yield number, str(exc)


def _upsert(client: SieveClient, args: argparse.Namespace) -> int:
    """Good lines are upserted in batches; bad ones are listed (and skipped), as `sieve index` does."""
    if args.file != "-" and not Path(args.file).is_file():
        print(f"sieve docs upsert: {args.file} is not a file", file=sys.stderr)
        return 2
    batch: list[sieve.Document] = []
    total, generation, bad = 0, 0, 0

    def flush() -> None:
        nonlocal total, generation
        if batch:
            written = client.upsert_documents(args.collection, batch, timeout=args.timeout)
            total, generation = total + written.upserted, written.generation
            batch.clear()

    for number, doc in _read_lines(args.file):
        if isinstance(doc, str):
            bad += 1
            print(f"sieve docs upsert: {args.file}: line {number}: {doc}", file=sys.stderr)
            continue
        batch.append(doc)
        if len(batch) >= args.batch_size:
            flush()
    flush()
    if args.json:
        print_json({"upserted": total, "generation": generation, "bad_lines": bad})
    else:
        skipped = f"; {bad} bad lines skipped" if bad else ""
        print(f"upserted {total} documents into {args.collection!r} (generation {generation}){skipped}")
    return EXIT_BAD_LINES if bad else 0


def _docs_on(client: SieveClient, args: argparse.Namespace) -> int:
    command = args.docs_command
    if command == "upsert":
        return _upsert(client, args)
    elif command == "get":
        got = client.get_documents(args.collection, args.ids, timeout=args.timeout)
        if args.json:
            print_json(as_dict(got))
        else:
            table = Table("id", "text", "metadata")
            for d in got.documents:
                table.add_row(d.id, d.text, json.dumps(dict(d.metadata), ensure_ascii=False))
            console().print(table)
            if got.missing_ids:
                print(f"missing: {', '.join(got.missing_ids)}")
    else:
        deleted = client.delete_documents(args.collection, args.ids, timeout=args.timeout)
        if args.json:
            print_json(as_dict(deleted))
        else:
            print(
                f"deleted {deleted.deleted}, not found {deleted.not_found} (generation {deleted.generation})"
            )
    return 0


# -- search ---------------------------------------------------------------------------------------
def _search(args: argparse.Namespace) -> int:
    filters: dict[str, str] = {}
    for item in args.filter:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"sieve search: --filter {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        filters[key] = value
    args.filters = filters
    return _guarded(_search_on, args)


def _search_on(client: SieveClient, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    request: dict[str, Any] = dict(
        top_k=args.top_k,
        filter=args.filters or None,
        retrieve_candidates=args.candidates,
        ef_search=args.ef_search,
        late_interaction=args.late,
        late_interaction_keep=args.late_keep,
        cross_encoder=args.cross,
        cross_encoder_keep=args.cross_keep,
        latency_budget_ms=args.budget,
        tier=args.tier,
        omit_documents=args.omit_documents,
        min_generation=args.min_generation,
        timeout=args.timeout,
    )
    if args.stream:
        return _stream_on(client, args, request, started)
    response = client.search(args.collection, args.query, **request)
    round_trip_ms = (time.perf_counter() - started) * 1000
    if args.json:
        print_json({**as_dict(response), "round_trip_ms": round_trip_ms})
    else:
        show_search(response, round_trip_ms)
    return 0


def _stream_on(client: SieveClient, args: argparse.Namespace, request: dict[str, Any], started: float) -> int:
    """One line per message as it arrives (stage, time since the call, ids), then the final tables."""
    out = console()
    final = None
    for message in client.search_stream(args.collection, args.query, **request):
        at_ms = (time.perf_counter() - started) * 1000
        if args.json:
            print_json({**as_dict(message), "received_ms": at_ms})
        else:
            ids = " ".join(h.id for h in message.result.hits)
            flag = (
                " final" + (" (deadline reached)" if message.deadline_reached else "")
                if message.final
                else ""
            )
            out.print(f"{at_ms:8.2f} ms  {enum_name(sieve.Stage, message.stage, 'STAGE_'):<17}{flag}: {ids}")
        final = message
    if final is not None and not args.json:
        show_search(final.result, (time.perf_counter() - started) * 1000, out)
    return 0
