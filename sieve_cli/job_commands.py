"""`sieve index` and `sieve jobs`: bulk indexing jobs from the command line, with a live progress bar,
through the Python client facade (`sieve.SieveClient`) only.

    sieve index FILE --collection NAME [--create [--late MODE] [--cross MODE] [--candidates N]
                [--model M] [--metric cosine|ip|l2]] [--upload] [--format auto|sieve|beir] [--batch-size N]
    sieve jobs list [--collection NAME] | show ID [--errors N] | watch ID | cancel ID

`sieve index` starts a job and follows it until it ends; Ctrl-C detaches (the job keeps running on the
server; `sieve jobs watch ID` follows it again). By default the server reads FILE itself (same machine
or shared disk); `--upload` sends its bytes instead. Every command takes --address (default
SIEVE_GRPC_ADDRESS), --api-key, --tls/--ca-cert, --timeout and --json. Exit codes: 0 succeeded with no
bad lines, 3 succeeded with bad lines (listed), 1 failed or cancelled (or the server refused: the status
and message go to stderr), 130 detached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sieve
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sieve import FINAL_JOB_STATES, SieveClient, SieveError

from sieve_cli.api_options import (
    add_connection_arguments,
    address,
    as_dict,
    create_options,
    refused,
    stage_defaults,
)

FORMATS = ("auto", "beir", "sieve")
SUCCEEDED = sieve.JobState.JOB_STATE_SUCCEEDED
UPLOAD_CHUNK = 1 << 20
EXIT_DETACHED = 130
# Large uploads and large GetJob error pages: the client's channel limits (64 MiB), stated explicitly.
_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
# Deadlines of the unary calls when --timeout is not given (the upload and the watch stream use the
# client's stream deadline, 24 h).
_T_START = 60.0
_T_GET = 30.0
_T_CHANGE = 60.0


def register(sub: Any) -> None:
    """Adds `index` and `jobs` to the `sieve` command's subparsers."""
    idx = sub.add_parser(
        "index", help="index a JSONL file (or a BEIR folder) into a collection as a job, with a progress bar"
    )
    idx.add_argument("file", type=Path, help="JSONL file (Sieve or BEIR lines), or a BEIR folder")
    idx.add_argument("--collection", required=True)
    idx.add_argument("--format", choices=FORMATS, default="auto", help="line format (auto: per line)")
    idx.add_argument(
        "--batch-size", type=int, default=0, help="documents per worker task (default: server's)"
    )
    idx.add_argument(
        "--upload", action="store_true", help="send the file's bytes (the server cannot read it)"
    )
    idx.add_argument("--create", action="store_true", help="create the collection if it does not exist")
    create_options(idx, "with --create: ")
    idx.add_argument("--detach", action="store_true", help="print the job id and return at once")
    idx.set_defaults(func=_index)

    jobs = sub.add_parser("jobs", help="list, show, watch or cancel index jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = jsub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--collection", default="")
    ls.add_argument("--limit", type=int, default=20)
    show = jsub.add_parser("show", help="a job and its error list")
    show.add_argument("id")
    show.add_argument("--errors", type=int, default=20, help="bad lines to list (default 20)")
    watch = jsub.add_parser("watch", help="follow a job with a progress bar until it ends (Ctrl-C detaches)")
    watch.add_argument("id")
    cancel = jsub.add_parser("cancel", help="stop a job; what it committed stays")
    cancel.add_argument("id")
    jobs.set_defaults(func=_jobs)

    for p in (idx, ls, show, watch, cancel):
        add_connection_arguments(
            p, "deadline per call in seconds (default: 30-60 s; the upload and the watch stream: 24 h)"
        )
    idx.add_argument("--json", action="store_true", help="no progress bar; print the final job as JSON")
    for p in (ls, show, watch, cancel):
        p.add_argument("--json", action="store_true", help="print JSON")


# -- plumbing -------------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> SieveClient:
    return SieveClient(
        address(args),
        tls=args.tls,
        root_certificates=args.ca_cert,
        api_key=args.api_key,
        options=_OPTIONS,
    )


def _timeout(args: argparse.Namespace, default: float) -> float:
    return float(args.timeout) if args.timeout else default


def _state(job: sieve.Job) -> str:
    return str(sieve.JobState.Name(job.state)).removeprefix("JOB_STATE_")


# -- sieve index ------------------------------------------------------------------------------------
def _index(args: argparse.Namespace) -> int:
    path: Path = args.file
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        path = path / "corpus.jsonl"
    if not path.is_file():
        print(f"sieve index: {args.file} is not a file (or a BEIR folder)", file=sys.stderr)
        return 2
    with _client(args) as client:
        try:
            if args.create:
                _create_collection(client, args.collection, args)
            if args.upload:
                job = client.upload_index_job(
                    args.collection,
                    _upload_chunks(path, args.json),
                    format=args.format,
                    batch_size=args.batch_size,
                )
            else:
                job = client.start_index_job(
                    args.collection,
                    str(path.resolve()),
                    format=args.format,
                    batch_size=args.batch_size,
                    timeout=_timeout(args, _T_START),
                )
        except SieveError as exc:
            return refused(exc)
        except KeyboardInterrupt:
            print(
                "\ninterrupted before the server acknowledged the upload: no job was started", file=sys.stderr
            )
            return EXIT_DETACHED
        if args.detach:
            print(json.dumps(as_dict(job)) if args.json else job.id)
            return 0
        if not args.json:
            print(f"job {job.id}: {job.source} -> collection {job.collection!r}")
        return _follow(client, job.id, args.json, args)


def _create_collection(client: SieveClient, name: str, args: argparse.Namespace) -> None:
    try:
        client.get_collection(name, timeout=_timeout(args, _T_GET))
    except sieve.NotFound:
        client.create_collection(
            name,
            embedding_model=args.model,
            metric=args.metric,
            defaults=stage_defaults(args),
            timeout=_timeout(args, _T_CHANGE),
        )
        return
    if any((args.model, args.metric, stage_defaults(args))):
        print(
            f"sieve index: collection {name!r} exists: its model, metric and stage defaults stay as they are",
            file=sys.stderr,
        )


def _upload_chunks(path: Path, quiet: bool) -> Iterator[bytes]:
    """The file's bytes in chunks, advancing an upload progress bar as the client sends them."""
    size = path.stat().st_size
    with _progress(quiet, "uploading") as bar, path.open("rb") as fh:
        task = bar.add_task("upload", total=size, rate="", errors="", eta="", status="")
        while chunk := fh.read(UPLOAD_CHUNK):
            yield chunk
            bar.advance(task, len(chunk))


# -- following a job --------------------------------------------------------------------------------
def _progress(quiet: bool, label: str = "indexing") -> Progress:
    return Progress(
        TextColumn(f"{label} " + "{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[errors]}"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=quiet,
        console=Console(stderr=True),
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _show_progress(bar: Progress, task: Any, job: sieve.Job) -> None:
    status = job.status or _state(job).lower()
    bar.update(
        task,
        description=job.id,
        total=job.total if job.HasField("total") else None,
        completed=job.done + job.failed,
        rate=f"{job.docs_per_second:.1f} docs/s",
        errors=f"{job.failed} errors",
        eta=f"ETA {_duration(job.eta_seconds)}" if job.HasField("eta_seconds") else "ETA -",
        status=status,
    )


def _watch(client: SieveClient, job_id: str, quiet: bool) -> sieve.Job:
    """Follow the job until it ends. The client reconnects the stream on UNAVAILABLE by itself; when it
    gives up (a long server restart) or the stream ends early, start watching again after a second."""
    last: sieve.Job | None = None
    with _progress(quiet) as bar:
        task = bar.add_task(job_id, total=None, rate="", errors="", eta="", status="")
        while True:
            try:
                for last in client.watch_job(job_id, min_interval_ms=250):
                    _show_progress(bar, task, last)
                if last is not None and last.state in FINAL_JOB_STATES:
                    return last
            except (sieve.Unavailable, sieve.DeadlineExceeded) as exc:
                bar.update(task, status=f"server unavailable ({exc.message}); reconnecting")
            time.sleep(1.0)


def _follow(client: SieveClient, job_id: str, quiet: bool, args: argparse.Namespace) -> int:
    try:
        job = _watch(client, job_id, quiet)
    except KeyboardInterrupt:
        print(
            f"\ndetached: job {job_id} keeps running on the server "
            f"(`sieve jobs watch {job_id}` to follow it, `sieve jobs cancel {job_id}` to stop it)",
            file=sys.stderr,
        )
        return EXIT_DETACHED
    except SieveError as exc:
        return refused(exc)
    try:
        if quiet:
            print(json.dumps(as_dict(job)))
        else:
            _summary(client, job, args)
    except SieveError as exc:
        return refused(exc)
    if job.state != SUCCEEDED:
        return 1
    return 3 if job.failed else 0


def _summary(client: SieveClient, job: sieve.Job, args: argparse.Namespace, max_errors: int = 20) -> None:
    elapsed = ""
    if job.HasField("started_at") and job.HasField("finished_at"):
        seconds = (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
        elapsed = f" in {_duration(seconds)} ({job.docs_per_second:.1f} docs/s)"
    print(f"job {job.id} {_state(job)}: {job.done} documents committed, {job.failed} bad lines{elapsed}")
    if job.reason:
        print(f"  reason: {job.reason}")
    print(
        f"  collection {job.collection!r} at generation {job.generation}: "
        f"search with min_generation={job.generation} to read these writes"
    )
    if job.failed:
        _print_errors(client, job.id, max_errors, args)


def _print_errors(client: SieveClient, job_id: str, limit: int, args: argparse.Namespace) -> None:
    if limit <= 0:
        return
    response = client.get_job(job_id, max_errors=limit, timeout=_timeout(args, _T_GET))
    for err in response.errors:
        who = f" (id {err.document_id!r})" if err.document_id else ""
        print(f"  line {err.line}{who}: {err.reason}")
    if response.next_errors_after_line:
        print(f"  ... more: sieve jobs show {job_id} --errors N")


# -- sieve jobs -------------------------------------------------------------------------------------
def _jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            if args.jobs_command == "list":
                return _list(client, args)
            if args.jobs_command == "show":
                response = client.get_job(
                    args.id, max_errors=max(args.errors, 1), timeout=_timeout(args, _T_GET)
                )
                if args.json:
                    print(json.dumps(as_dict(response)))
                else:
                    job = response.job
                    _summary(client, job, args, args.errors)
                    if job.state not in FINAL_JOB_STATES:
                        print(f"  running: {job.done + job.failed} of {job.total or '?'} lines")
                return 0
            if args.jobs_command == "watch":
                return _follow(client, args.id, args.json, args)
            job = client.cancel_job(args.id, timeout=_timeout(args, _T_CHANGE))
            if args.json:
                print(json.dumps(as_dict(job)))
            else:
                _summary(client, job, args, 0)
            return 0
        except SieveError as exc:
            return refused(exc)


def _list(client: SieveClient, args: argparse.Namespace) -> int:
    jobs = client.list_jobs(collection=args.collection, limit=args.limit, timeout=_timeout(args, _T_GET))
    if args.json:
        print(json.dumps([as_dict(j) for j in jobs]))
        return 0
    table = Table("id", "collection", "state", "done/total", "errors", "docs/s", "created", "source / reason")
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at.seconds))
        total = str(j.total) if j.HasField("total") else "?"
        table.add_row(
            j.id,
            j.collection,
            _state(j).lower(),
            f"{j.done}/{total}",
            str(j.failed),
            f"{j.docs_per_second:.1f}",
            created,
            j.reason or j.status or j.source,
        )
    Console().print(table)
    return 0
