"""`sieve index` and `sieve jobs`: bulk indexing jobs from the command line, with a live progress bar.

    sieve index FILE --collection NAME [--create] [--upload] [--format auto|sieve|beir] [--batch-size N]
    sieve jobs list [--collection NAME] | show ID [--errors N] | watch ID | cancel ID

`sieve index` starts a job and follows it until it ends; Ctrl-C detaches (the job keeps running on the
server; `sieve jobs watch ID` follows it again). By default the server reads FILE itself (same machine
or shared disk); `--upload` sends its bytes instead. Exit codes: 0 succeeded with no bad lines, 3
succeeded with bad lines (listed), 1 failed or cancelled, 130 detached.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sieve.v1 import collections_pb2, collections_pb2_grpc, jobs_pb2, jobs_pb2_grpc

FORMATS = {
    "auto": jobs_pb2.SOURCE_FORMAT_UNSPECIFIED,
    "sieve": jobs_pb2.SOURCE_FORMAT_SIEVE,
    "beir": jobs_pb2.SOURCE_FORMAT_BEIR,
}
FINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
UPLOAD_CHUNK = 1 << 20
EXIT_DETACHED = 130
_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def register(sub: Any) -> None:
    """Adds `index` and `jobs` to the `sieve` command's subparsers."""
    idx = sub.add_parser(
        "index", help="index a JSONL file (or a BEIR folder) into a collection as a job, with a progress bar"
    )
    idx.add_argument("file", type=Path, help="JSONL file (Sieve or BEIR lines), or a BEIR folder")
    idx.add_argument("--collection", required=True)
    idx.add_argument("--address", help="the server (default: SIEVE_GRPC_ADDRESS)")
    idx.add_argument("--format", choices=sorted(FORMATS), default="auto", help="line format (auto: per line)")
    idx.add_argument(
        "--batch-size", type=int, default=0, help="documents per worker task (default: server's)"
    )
    idx.add_argument(
        "--upload", action="store_true", help="send the file's bytes (the server cannot read it)"
    )
    idx.add_argument("--create", action="store_true", help="create the collection if it does not exist")
    idx.add_argument("--detach", action="store_true", help="print the job id and return at once")
    idx.add_argument("--json", action="store_true", help="no progress bar; print the final job as JSON")
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
    for p in (ls, show, watch, cancel):
        p.add_argument("--address", help="the server (default: SIEVE_GRPC_ADDRESS)")
        p.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(func=_jobs)


def _address(args: argparse.Namespace) -> str:
    if args.address:
        return str(args.address)
    from sieve_core.config import load_settings

    return load_settings().grpc_address


def _fail(exc: grpc.RpcError) -> int:
    print(f"sieve: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
    return 1


# -- sieve index ------------------------------------------------------------------------------------
def _index(args: argparse.Namespace) -> int:
    path: Path = args.file
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        path = path / "corpus.jsonl"
    if not path.is_file():
        print(f"sieve index: {args.file} is not a file (or a BEIR folder)", file=sys.stderr)
        return 2
    with grpc.insecure_channel(_address(args), options=_OPTIONS) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        try:
            if args.create:
                _create_collection(channel, args.collection)
            if args.upload:
                job = stub.UploadIndexJob(
                    _upload_messages(path, args.collection, args.batch_size, FORMATS[args.format], args.json),
                    timeout=24 * 3600,
                ).job
            else:
                request = jobs_pb2.StartIndexJobRequest(
                    collection=args.collection,
                    path=str(path.resolve()),
                    format=FORMATS[args.format],
                    batch_size=args.batch_size,
                )
                job = stub.StartIndexJob(request, timeout=60).job
        except grpc.RpcError as exc:
            return _fail(exc)
        except KeyboardInterrupt:
            print(
                "\ninterrupted before the server acknowledged the upload: no job was started", file=sys.stderr
            )
            return EXIT_DETACHED
        if args.detach:
            print(json.dumps(_as_dict(job)) if args.json else job.id)
            return 0
        if not args.json:
            print(f"job {job.id}: {job.source} -> collection {job.collection!r}")
        return _follow(stub, job.id, args.json)


def _create_collection(channel: grpc.Channel, name: str) -> None:
    stub = collections_pb2_grpc.CollectionServiceStub(channel)
    try:
        stub.GetCollection(collections_pb2.GetCollectionRequest(name=name), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise
        stub.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name=name)),
            timeout=60,
        )


def _upload_messages(
    path: Path, collection: str, batch_size: int, fmt: int, quiet: bool
) -> Iterator[jobs_pb2.UploadIndexJobRequest]:
    yield jobs_pb2.UploadIndexJobRequest(collection=collection, batch_size=batch_size, format=fmt)
    size = path.stat().st_size
    with _progress(quiet, "uploading") as bar, path.open("rb") as fh:
        task = bar.add_task("upload", total=size, rate="", errors="", eta="", status="")
        while chunk := fh.read(UPLOAD_CHUNK):
            yield jobs_pb2.UploadIndexJobRequest(jsonl=chunk)
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


def _show_progress(bar: Progress, task: Any, job: jobs_pb2.Job) -> None:
    status = job.status or jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
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


def _watch(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, quiet: bool) -> jobs_pb2.Job:
    """Follow WatchJob until the job ends, reconnecting while the server restarts."""
    last: jobs_pb2.Job | None = None
    with _progress(quiet) as bar:
        task = bar.add_task(job_id, total=None, rate="", errors="", eta="", status="")
        while True:
            try:
                for message in stub.WatchJob(jobs_pb2.WatchJobRequest(id=job_id, min_interval_ms=250)):
                    last = message.job
                    _show_progress(bar, task, last)
                if last is not None and last.state in FINAL:
                    return last
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    raise
                bar.update(task, status=f"server unavailable ({exc.details()}); reconnecting")  # type: ignore[attr-defined]
            time.sleep(1.0)


def _follow(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, quiet: bool) -> int:
    try:
        job = _watch(stub, job_id, quiet)
    except KeyboardInterrupt:
        print(
            f"\ndetached: job {job_id} keeps running on the server "
            f"(`sieve jobs watch {job_id}` to follow it, `sieve jobs cancel {job_id}` to stop it)",
            file=sys.stderr,
        )
        return EXIT_DETACHED
    except grpc.RpcError as exc:
        return _fail(exc)
    if quiet:
        print(json.dumps(_as_dict(job)))
    else:
        _summary(stub, job)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        return 1
    return 3 if job.failed else 0


def _summary(stub: jobs_pb2_grpc.JobServiceStub, job: jobs_pb2.Job, max_errors: int = 20) -> None:
    state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    elapsed = ""
    if job.HasField("started_at") and job.HasField("finished_at"):
        seconds = (job.finished_at.ToNanoseconds() - job.started_at.ToNanoseconds()) / 1e9
        elapsed = f" in {_duration(seconds)} ({job.docs_per_second:.1f} docs/s)"
    print(f"job {job.id} {state}: {job.done} documents committed, {job.failed} bad lines{elapsed}")
    if job.reason:
        print(f"  reason: {job.reason}")
    print(
        f"  collection {job.collection!r} at generation {job.generation}: "
        f"search with min_generation={job.generation} to read these writes"
    )
    if job.failed:
        _print_errors(stub, job.id, max_errors)


def _print_errors(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, limit: int) -> None:
    if limit <= 0:
        return
    response = stub.GetJob(jobs_pb2.GetJobRequest(id=job_id, max_errors=limit), timeout=30)
    for err in response.errors:
        who = f" (id {err.document_id!r})" if err.document_id else ""
        print(f"  line {err.line}{who}: {err.reason}")
    if response.next_errors_after_line:
        print(f"  ... more: sieve jobs show {job_id} --errors N")


def _as_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)  # type: ignore[no-any-return]


# -- sieve jobs -------------------------------------------------------------------------------------
def _jobs(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(_address(args), options=_OPTIONS) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        try:
            if args.jobs_command == "list":
                return _list(stub, args)
            if args.jobs_command == "show":
                response = stub.GetJob(
                    jobs_pb2.GetJobRequest(id=args.id, max_errors=max(args.errors, 1)), timeout=30
                )
                if args.json:
                    print(json.dumps(_as_dict(response)))
                else:
                    _summary(stub, response.job, args.errors)
                    if response.job.state not in FINAL:
                        print(
                            f"  running: {response.job.done + response.job.failed} of {response.job.total or '?'} lines"
                        )
                return 0
            if args.jobs_command == "watch":
                return _follow(stub, args.id, args.json)
            job = stub.CancelJob(jobs_pb2.CancelJobRequest(id=args.id), timeout=60).job
            if args.json:
                print(json.dumps(_as_dict(job)))
            else:
                _summary(stub, job, 0)
            return 0
        except grpc.RpcError as exc:
            return _fail(exc)


def _list(stub: jobs_pb2_grpc.JobServiceStub, args: argparse.Namespace) -> int:
    jobs = stub.ListJobs(
        jobs_pb2.ListJobsRequest(collection=args.collection, limit=args.limit), timeout=30
    ).jobs
    if args.json:
        print(json.dumps([_as_dict(j) for j in jobs]))
        return 0
    table = Table("id", "collection", "state", "done/total", "errors", "docs/s", "created", "source / reason")
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.created_at.seconds))
        total = str(j.total) if j.HasField("total") else "?"
        table.add_row(
            j.id,
            j.collection,
            jobs_pb2.JobState.Name(j.state).removeprefix("JOB_STATE_").lower(),
            f"{j.done}/{total}",
            str(j.failed),
            f"{j.docs_per_second:.1f}",
            created,
            j.reason or j.status or j.source,
        )
    Console().print(table)
    return 0
