"""The `sieve` command: serve, run, eval, health, models, index, jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from sieve_cli.ports import busy_message, first_busy
    from sieve_core.config import load_settings
    from sieve_core.errors import SieveError

    overrides = {"grpc_address": args.address} if args.address else {}
    settings = load_settings(**overrides)
    setting = "--address" if args.address else "SIEVE_GRPC_ADDRESS"
    # Checked before anything loads: a second stack on this machine gets one line, not a traceback.
    busy = first_busy("sieve serve", [("the gRPC server", settings.grpc_address, setting)])
    if busy:
        print(busy, file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(settings))
    except SieveError as exc:  # a refusal to start, e.g. a read-only data directory: no traceback
        print(f"sieve serve: {exc.message}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc's bind failure (the port was taken after the check above)
        if "Failed to bind" not in str(exc):
            raise
        print(busy_message("sieve serve", "the gRPC server", settings.grpc_address, setting), file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from sieve_cli.supervisor import run

    return run()


def _eval(args: argparse.Namespace) -> int:
    from sieve_cli.evaluate import EvalOptions, parse_cascade, run_eval

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"sieve eval: {folder} is not a directory", file=sys.stderr)
        return 2
    cascades = list(args.cascade or [])
    if args.late_interaction:
        cascades.append("late")
    try:
        for spec in cascades:
            parse_cascade(spec)
    except ValueError as exc:
        print(f"sieve eval: {exc}", file=sys.stderr)
        return 2
    result = run_eval(
        EvalOptions(
            folder=folder,
            address=args.address,
            split=args.split,
            keep=args.keep,
            quiet=args.json,
            cascades=tuple(dict.fromkeys(cascades or ["retrieve"])),
            candidates=args.candidates,
            late_keep=args.late_keep,
            cross_keep=args.cross_keep,
            token_pool_factor=args.token_pool_factor,
            token_codec=args.token_codec,
        )
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['dataset']} ({result['split']}): {result['documents']} documents, {result['queries']} queries,"
        f" indexed at {result['index_docs_per_s']:.1f} docs/s"
    )
    print(f"  {'cascade':<48} {'nDCG@10':>8} {'R@100':>7} {'MRR@10':>7} {'q/s':>7} {'p50 ms':>7}")
    for run in result["runs"]:  # type: ignore[attr-defined]
        print(
            f"  {run['cascade']:<48} {run['ndcg@10']:>8.4f} {run['recall@100']:>7.4f} "
            f"{run['mrr@10']:>7.4f} {run['search_queries_per_s']:>7.1f} {run['search_ms']['p50']:>7.1f}"
        )
    return 0


def _health(args: argparse.Namespace) -> int:
    from sieve_cli.stack import wait_serving
    from sieve_core.config import load_settings

    address = args.address or load_settings().grpc_address
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert:
        import grpc

        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    try:
        wait_serving(address, timeout=args.timeout, credentials=credentials)
    except (TimeoutError, RuntimeError) as exc:
        print(f"sieve health: {exc}", file=sys.stderr)
        return 1
    print(f"{address}: SERVING")
    return 0


def _models(args: argparse.Namespace) -> int:
    if args.models_command == "prepare":
        from sieve_core.models.prepare import main as prepare_main

        return prepare_main(["--models-dir", str(args.models_dir)] + (["--force"] if args.force else []))
    from sieve_core.models.export import main as export_main

    return export_main(args.export_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sieve", description="Sieve gRPC search backend")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (settings from SIEVE_* variables)")
    serve.add_argument("--address", help="host:port to listen on (default: SIEVE_GRPC_ADDRESS)")
    serve.set_defaults(func=_serve)

    run = sub.add_parser(
        "run", help="the whole service: local Redis (if SIEVE_REDIS_URL is unset) and the server"
    )
    run.set_defaults(func=_run)

    ev = sub.add_parser("eval", help="index a BEIR folder and report nDCG@10, recall@100, MRR@10")
    ev.add_argument("folder", help="BEIR folder with corpus.jsonl, queries.jsonl, qrels/")
    ev.add_argument("--address", help="a running server (default: start one with a temporary data dir)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--keep", action="store_true", help="keep the collection afterwards")
    ev.add_argument(
        "--cascade",
        action="append",
        metavar="SPEC",
        help="a cascade to evaluate, repeatable: retrieve, late, cross or late+cross (default: retrieve); "
        "each is reported on the same index. Re-ranking stages run on workers (self-started: `sieve run`; "
        "cross needs SIEVE_CROSS_ENCODER_MODEL)",
    )
    ev.add_argument("--late-interaction", action="store_true", help="same as --cascade late")
    ev.add_argument("--candidates", type=int, default=100, help="candidates retrieved for re-ranking")
    ev.add_argument("--late-keep", type=int, default=100, help="candidates late interaction keeps")
    ev.add_argument("--cross-keep", type=int, default=100, help="candidates the cross-encoder keeps")
    ev.add_argument(
        "--token-pool-factor",
        type=int,
        default=0,
        help="with late interaction: the collection's token pooling (1: none; 0: the server default)",
    )
    ev.add_argument(
        "--token-codec",
        choices=("int4", "int8", "fp16"),  # sieve_core.token_codec.FORMATS, not imported: the CLI starts fast
        default="",
        help="with late interaction: the collection's token codec (default: the server's, int4)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object (no progress bars)")
    ev.set_defaults(func=_eval)

    hc = sub.add_parser("health", help="exit 0 when the server at --address reports SERVING")
    hc.add_argument("--address", help="default: SIEVE_GRPC_ADDRESS")
    hc.add_argument("--timeout", type=float, default=5.0)
    hc.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs (unless --tls-ca)")
    hc.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate (implies --tls)")
    hc.add_argument("--tls-cert", type=Path, help="client certificate, for a server that requires one (mTLS)")
    hc.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    hc.set_defaults(func=_health)

    models = sub.add_parser("models", help="prepare or export model bundles")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="export the default bi-encoder if it is missing or stale")
    prep.add_argument("--models-dir", type=Path, default=Path("models"))
    prep.add_argument("--force", action="store_true")
    exp = msub.add_parser("export", help="export a checkpoint (args as `python -m sieve_core.models.export`)")
    exp.add_argument("export_args", nargs=argparse.REMAINDER)
    models.set_defaults(func=_models)

    from sieve_cli import job_commands as cli_jobs  # `sieve index` and `sieve jobs`

    cli_jobs.register(sub)
    from sieve_cli import (
        client_commands as cli_client,  # `sieve collections`, `sieve docs`, `sieve search` (the Python client)
    )

    cli_client.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the server refused or failed (status and message on stderr), or a job failed;
    2 bad usage or input the command can check itself (a missing file, a bad flag); 3 done, but some
    lines were refused (`sieve index`, `sieve docs upsert`: each listed with its line number and reason);
    130 detached or interrupted (a job keeps running on the server)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OSError as exc:  # a file the user named that cannot be read: say so, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"sieve {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
