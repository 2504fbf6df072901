"""Walkthrough: create a collection, index a JSONL file as a job and watch it, search with a cascade,
and handle a degraded or failed stage. Needs only `pip install ./clients/python` and a running server
(`make run`; late interaction runs in the server from the collection's stored token vectors, the
cross-encoder needs a configured model and its workers).

    python examples/python/walkthrough.py [--address 127.0.0.1:50051] [--collection notes]
"""

import argparse
from pathlib import Path

import sieve
from sieve import FailedPrecondition, SieveClient, StageStatus, Unavailable

NOTES = Path(__file__).resolve().parent.parent / "data" / "notes.jsonl"

parser = argparse.ArgumentParser()
parser.add_argument("--address", default="127.0.0.1:50051")
parser.add_argument("--collection", default="notes")
parser.add_argument("--file", type=Path, default=NOTES, help="JSONL: {id, text, metadata} per line")
args = parser.parse_args()


def stage_name(value: int) -> str:
    return sieve.Stage.Name(value).removeprefix("STAGE_").lower()


with SieveClient(args.address) as client:
    # 1. A collection that stores its documents' token vectors (token_storage), so that late interaction
    #    can run; it is opted into per search below (it could be a default here).
    try:
        client.create_collection(
            args.collection,
            metric="cosine",
            defaults={"retrieve_candidates": 50},
            token_storage={"pool_factor": 4},
        )
        print(f"created collection {args.collection!r}")
    except sieve.AlreadyExists:
        print(f"collection {args.collection!r} exists; indexing into it again (idempotent by id)")

    # 2. Index a JSONL file as a background job: upload_index_job sends the file, so the server need not
    #    see this disk (start_index_job(collection, "/abs/path.jsonl") has the server read it instead).
    started = client.upload_index_job(args.collection, args.file)
    print(f"job {started.id} started: {sieve.JobState.Name(started.state)}")
    job = started
    for job in client.watch_job(started.id, min_interval_ms=200):  # ends when the job does
        total = job.total if job.HasField("total") else "?"
        print(f"  job {job.id}: {sieve.JobState.Name(job.state)} {job.done}/{total} lines, {job.failed} bad")
    if job.state != sieve.JobState.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"job {job.id} ended {sieve.JobState.Name(job.state)}: {job.reason}")
    if job.failed:
        for error in client.get_job(job.id, max_errors=10).errors:
            print(f"  bad line {error.line}: {error.reason}")

    # 3. Search with a cascade: 20 candidates from the bi-encoder, re-ranked by late interaction (keep 10),
    #    then the cross-encoder, both best-effort. min_generation: see everything the job committed.
    response = client.search(
        args.collection,
        "how does light carry energy?",
        top_k=3,
        retrieve_candidates=20,
        late_interaction="best_effort",
        late_interaction_keep=10,
        cross_encoder="best_effort",
        min_generation=job.generation,
    )
    for hit in response.hits:
        scores = ", ".join(f"{stage_name(s.stage)} {s.score:.3f}" for s in hit.stage_scores)
        print(f"{hit.id:10} {hit.score:.3f}  [{scores}]  {hit.text[:60]}")

    # 4. A best-effort stage that cannot run is DEGRADED: the hits keep the previous stage's order.
    for stage in response.stages:
        status = StageStatus.Name(stage.status)
        print(f"  stage {stage_name(stage.stage)}: {status} in {stage.took_ms:.1f} ms {stage.reason}")
        if stage.status == StageStatus.STAGE_STATUS_DEGRADED:
            print(f"  -> {stage_name(stage.stage)} was skipped for this answer: {stage.reason}")

    #    A *required* stage that cannot run fails the call instead: FAILED_PRECONDITION when the server
    #    has no model for it, UNAVAILABLE when its workers are missing (retried until the deadline).
    for mode in ("cross_encoder", "late_interaction"):
        try:
            client.search(args.collection, "light", top_k=3, timeout=5, **{mode: "required"})
            print(f"required {mode}: completed")
        except FailedPrecondition as exc:
            print(f"required {mode}: failed, {exc.code.name}: {exc.message}")
        except Unavailable as exc:
            print(f"required {mode}: failed after {exc.attempts} attempts, {exc.code.name}: {exc.message}")
