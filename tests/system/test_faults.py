"""Faults with real processes (issue 7): what a client sees, and what is on disk afterwards.

- `kill -9` of a `sieve serve` process while 8 clients upsert and delete concurrently, at three moments:
  after a restart every acknowledged write is there, every unacknowledged one is entirely there or not
  at all, and the store, the index, the counts and the generation agree.
- A full data directory (a small tmpfs): writes fail with RESOURCE_EXHAUSTED and leave nothing behind,
  reads and searches go on, a snapshot that cannot be written keeps the previous one, and once space is
  freed writes work again without a restart (and survive `kill -9`).
- A data directory the kernel remounts read-only under the running server (ext4 on a loop device,
  errors=remount-ro): writes fail with FAILED_PRECONDITION, reads and searches go on, SIGTERM still
  exits cleanly, and after fsck every acknowledged write is there. A server started on a read-only
  data directory refuses to start with a one-line error.
- Redis flushed, then restarted (stopped, started again empty on the same port) under a running server
  and worker: late-interaction searches complete from the server's token store and no document is encoded
  again (the server's encoder sees only the query; the worker runs no task); the server's cache, its task
  dispatch and an index job all work again without restarting either process.
- Late interaction under the two tests above: the collection stores token vectors, and after every
  restart each document's stored token vectors are compress(encode(text)) of its current text, with no
  row missing or left over (check_token_vectors).

Worker kills during a re-rank and Redis stopped mid-re-rank are in tests/integration/test_rerank_faults.py; `kill -9`
after sequential writes, snapshots and SIGTERM in tests/system/test_durability.py. These tests mount file
systems and so need root (they skip, saying why, where mounting is not permitted).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sieve.v1 import (
    collections_pb2,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    jobs_pb2,
    search_pb2,
)

from server.storage.index import VectorIndex, snapshot_generation
from sieve_core.errors import is_read_only
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_codec import decode_tokens, read_header
from sieve_core.token_format import TokenFormat, compress_many
from tests.conftest import (
    MODELS_DIR,
    ROOT,
    RedisServer,
    Worker,
    make_settings,
    run_index_job,
    start_api,
    stop_api,
)
from tests.system.test_durability import (
    COLLECTION,
    DIMS,
    MODEL,
    WORDS,
    Client,
    Model,
    Texts,
    collection_snapshots,
    create_collection,
    kill_9,
    new_docs,
    running_server,
    verify,
)

pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / MODEL / "manifest.json").is_file(),
    reason=f"no bundle at {MODELS_DIR / MODEL}; run `make models`",
)

# Each test server is a child process of its own; none of them needs the metrics endpoint (and two
# test runs on one machine would otherwise race for its fixed default port).
NO_METRICS = {"SIEVE_METRICS_ADDRESS": ""}


# == 1. kill -9 during concurrent writes ==============================================================

CLIENTS = 8
PRIVATE_IDS = 24  # per client: only that client writes or deletes them
SHARED_IDS = [f"s{i}" for i in range(12)]  # every client upserts these


@dataclass
class Op:
    """One write a client sent. `acked`: the RPC returned OK (with `generation`); otherwise unknown."""

    tag: str  # unique over the whole test: r<round>c<client>n<seq>
    client: int
    kind: str  # "upsert" | "delete"
    docs: dict[str, tuple[str, dict[str, str]]]  # upserts: id -> (text, metadata)
    deleted: list[str]  # deletes: ids
    acked: bool = False
    generation: int = 0
    error: str = ""

    @property
    def ids(self) -> list[str]:
        return list(self.docs) if self.kind == "upsert" else self.deleted

    @property
    def private_ids(self) -> list[str]:
        return [i for i in self.ids if i.startswith("p")]


def doc_text(doc_id: str, text_op: str) -> str:
    """Text that names the write that set it; words derived from both so every text is distinct."""
    seed = int.from_bytes(hashlib.sha256(f"{doc_id}/{text_op}".encode()).digest()[:8], "little")
    words = random.Random(seed).sample(WORDS, 6)
    return f"{doc_id} {text_op} {' '.join(words)}"


def text_op_of(text: str) -> str:
    return text.split(" ")[1]


class Writer(threading.Thread):
    """A client that writes until its first failed call, recording every call it made."""

    def __init__(
        self, address: str, round_no: int, client: int, state: dict[str, tuple[str, dict[str, str]]]
    ) -> None:
        super().__init__(name=f"writer-{client}", daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.stub = documents_pb2_grpc.DocumentServiceStub(self.channel)
        self.round_no, self.client = round_no, client
        self.rng = random.Random(f"{round_no}/{client}")
        self.pool = [f"p{client}-{i}" for i in range(PRIVATE_IDS)]
        # This client's private documents as the store holds them (it alone writes them).
        self.mine = {i: state[i] for i in self.pool if i in state}
        self.ops: list[Op] = []
        self.acked = 0
        self.problem = ""  # an acknowledged answer that contradicts what was asked

    def next_op(self, seq: int) -> Op:
        tag = f"r{self.round_no}c{self.client}n{seq}"
        if len(self.mine) >= 4 and self.rng.random() < 0.15:
            ids = self.rng.sample(sorted(self.mine), self.rng.randint(1, 2))
            return Op(tag, self.client, "delete", {}, ids)
        docs: dict[str, tuple[str, dict[str, str]]] = {}
        for doc_id in self.rng.sample(self.pool, self.rng.randint(2, 3)):
            text_op = tag
            if doc_id in self.mine and self.rng.random() < 0.3:
                text_op = text_op_of(self.mine[doc_id][0])  # same text, new metadata: no new vector
            docs[doc_id] = (
                doc_text(doc_id, text_op),
                {"op": tag, "text_op": text_op, "client": str(self.client)},
            )
        for doc_id in self.rng.sample(SHARED_IDS, self.rng.randint(0, 2)):
            docs[doc_id] = (doc_text(doc_id, tag), {"op": tag, "text_op": tag, "client": str(self.client)})
        return Op(tag, self.client, "upsert", docs, [])

    def run(self) -> None:
        try:
            for seq in range(10_000):
                op = self.next_op(seq)
                self.ops.append(op)
                try:
                    if op.kind == "upsert":
                        response = self.stub.UpsertDocuments(upsert_request(op.docs), timeout=60)
                        if response.upserted != len(op.docs):
                            self.problem = f"{op.tag}: upserted {response.upserted} of {len(op.docs)}"
                        self.mine.update({i: d for i, d in op.docs.items() if i in self.pool})
                    else:
                        delete = documents_pb2.DeleteDocumentsRequest(collection=COLLECTION, ids=op.deleted)
                        response = self.stub.DeleteDocuments(delete, timeout=60)
                        if (response.deleted, response.not_found) != (len(op.deleted), 0):
                            self.problem = f"{op.tag}: deleted {response.deleted} of {op.deleted}"
                        for i in op.deleted:
                            del self.mine[i]
                except grpc.RpcError as exc:
                    op.error = f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
                    return  # the server is gone: stop at the first failed call
                op.acked, op.generation = True, response.generation
                self.acked += 1
        finally:
            self.channel.close()


@dataclass
class Expected:
    """The state every committed write so far implies: id -> (text, metadata, generation)."""

    docs: dict[str, tuple[str, dict[str, str], int]] = field(default_factory=dict)
    generation: int = 0


def read_store(data_dir: Path) -> tuple[dict[str, tuple[str, dict[str, str], int]], int, int]:
    """The collection straight from the store (read-only; the server is running): documents with the
    generation that last wrote each, the collection's generation and count. Also checks that the
    metadata index (doc_meta) holds exactly the stored documents' metadata."""
    conn = sqlite3.connect(f"file:{data_dir / 'sieve.db'}?mode=ro", uri=True)
    try:
        cid, generation, count = conn.execute(
            "SELECT id, generation, doc_count FROM collections WHERE name = ?", (COLLECTION,)
        ).fetchone()
        docs, by_key = {}, {}
        for doc_id, key, text, meta, gen in conn.execute(
            "SELECT doc_id, key, text, metadata_json, generation FROM documents WHERE collection_id = ?",
            (cid,),
        ):
            docs[doc_id] = (text, json.loads(meta), gen)
            by_key[key] = json.loads(meta)
        meta_rows: dict[int, dict[str, str]] = {}
        for key, name, value in conn.execute(
            "SELECT key, name, value FROM doc_meta WHERE collection_id = ?", (cid,)
        ):
            meta_rows.setdefault(key, {})[name] = value
        assert meta_rows == {k: m for k, m in by_key.items() if m}, "doc_meta disagrees with the documents"
        return docs, generation, count
    finally:
        conn.close()


def settle_round(
    ops: list[Op], before: Expected, stored: dict[str, tuple[str, dict[str, str], int]], generation: int
) -> Expected:
    """Decide from the store which unacknowledged writes happened (all or nothing, else fail), then
    replay every committed write of the round in generation order and return the state it implies."""
    committed: list[Op] = [op for op in ops if op.acked]
    unplaced_deletes: list[Op] = []
    for op in ops:
        if op.acked:
            continue
        # Private ids are written by this client alone and this was its last call: nothing later can
        # have overwritten or deleted them, so they show whether the write happened.
        private = op.private_ids
        if op.kind == "upsert":
            landed = [i for i in private if i in stored and stored[i][1].get("op") == op.tag]
            if not landed:
                continue
            assert len(landed) == len(private), f"{op.tag} is half there: {landed} of {private} ({op.error})"
            gens = {stored[i][2] for i in landed}
            assert len(gens) == 1, f"{op.tag} landed at several generations {gens}"
            op.generation = gens.pop()
            committed.append(op)
        else:
            gone = [i for i in private if i not in stored]
            if not gone:
                continue
            assert len(gone) == len(private), f"delete {op.tag} is half done: {gone} of {private}"
            unplaced_deletes.append(op)
    placed = [op.generation for op in committed]
    assert len(set(placed)) == len(placed), f"two writes share a generation: {sorted(placed)}"
    span = set(range(before.generation + 1, generation + 1))
    assert set(placed) <= span, (
        f"generations {sorted(set(placed) - span)} outside ({before.generation}, {generation}]"
    )
    free = sorted(span - set(placed))
    # Every committed write moved the generation by exactly one, and nothing else did.
    assert len(free) == len(unplaced_deletes), (
        f"generation {generation}: {len(free)} generations unaccounted for, {len(unplaced_deletes)} unacknowledged deletes happened"
    )
    # The unacknowledged deletes only touch their own client's ids, after that client's last acknowledged
    # write: which free generation each took does not change the outcome.
    for op, gen in zip(unplaced_deletes, free, strict=True):
        op.generation = gen
        committed.append(op)
    state = dict(before.docs)
    for op in sorted(committed, key=lambda o: o.generation):
        if op.kind == "upsert":
            state.update({i: (t, m, op.generation) for i, (t, m) in op.docs.items()})
        else:
            for i in op.deleted:
                state.pop(i, None)
    return Expected(state, generation)


def check_served(client: Client, expected: Expected, probes: list[str]) -> None:
    """What the restarted server answers agrees with the expected state (store, index, counts)."""
    info = client.collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=30)
    assert (info.collection.document_count, info.collection.generation) == (
        len(expected.docs),
        expected.generation,
    )
    every_id = sorted({f"p{c}-{i}" for c in range(CLIENTS) for i in range(PRIVATE_IDS)} | set(SHARED_IDS))
    got = client.documents.GetDocuments(
        documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=every_id), timeout=30
    )
    assert {d.id: (d.text, dict(d.metadata)) for d in got.documents} == {
        i: (t, m) for i, (t, m, _) in expected.docs.items()
    }
    for doc in got.documents:  # text and metadata come from one write
        assert text_op_of(doc.text) == doc.metadata["text_op"], doc

    # The index holds every stored document: under SIEVE_FULL_SCAN_MAX the search scores every vector in
    # the index, so asking for them all returns exactly the indexed documents.
    everything = client.search.Search(
        search_pb2.SearchRequest(collection=COLLECTION, query="harbor", top_k=1000, omit_documents=True),
        timeout=30,
    )
    assert everything.stages[0].method == "exact" and everything.generation == expected.generation
    assert sorted(h.id for h in everything.hits) == sorted(expected.docs)
    # The metadata index agrees: a filter per client finds the documents it last wrote.
    for c in range(CLIENTS):
        response = client.search.Search(
            search_pb2.SearchRequest(
                collection=COLLECTION,
                query="harbor",
                top_k=1000,
                omit_documents=True,
                filter=common_pb2.Filter(all=[common_pb2.Condition(key="client", equals=str(c))]),
            ),
            timeout=30,
        )
        assert sorted(h.id for h in response.hits) == sorted(
            i for i, (_, m, _) in expected.docs.items() if m["client"] == str(c)
        )
    # Each probe is found by its own text, with its current vector.
    for doc_id in probes:
        text, metadata, _ = expected.docs[doc_id]
        hit = client.search.Search(
            search_pb2.SearchRequest(collection=COLLECTION, query=text, top_k=1), timeout=30
        ).hits[0]
        assert (hit.id, hit.text, dict(hit.metadata)) == (doc_id, text, metadata) and hit.score > 0.999


def test_kill_9_during_concurrent_writes_keeps_exactly_the_acknowledged_state(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # Snapshots every 25 changed documents: some kills land while one is being written.
    env = {"SIEVE_SNAPSHOT_EVERY_WRITES": "25", "SIEVE_SNAPSHOT_INTERVAL_S": "3600", **NO_METRICS}
    expected = Expected()
    # The kill comes this long after the writers' 8th acknowledged write: early, middle, late.
    windows = [(0.0, 0.3), (0.3, 1.0), (1.0, 2.0)]
    rng = random.Random()
    for round_no, (low, high) in enumerate(windows):
        delay = rng.uniform(low, high)
        where = f"round {round_no}, kill {delay:.2f} s after the 8th acknowledged write"
        with running_server(data_dir, tmp_path / f"round{round_no}.log", **env) as client:
            if round_no == 0:
                create_collection(client, token_storage=True)
            writers = [
                Writer(client.address, round_no, c, {i: (t, m) for i, (t, m, _) in expected.docs.items()})
                for c in range(CLIENTS)
            ]
            for writer in writers:
                writer.start()
            deadline = time.monotonic() + 60
            while sum(w.acked for w in writers) < 8:
                assert time.monotonic() < deadline, f"{where}: the writers made no progress"
                assert any(w.is_alive() for w in writers), (
                    f"{where}: every writer stopped: {[w.ops[-1].error for w in writers]}"
                )
                time.sleep(0.01)
            time.sleep(delay)
            assert all(w.is_alive() for w in writers), f"{where}: a writer stopped before the kill"
            kill_9(client)
            for writer in writers:
                writer.join(timeout=60)
                assert not writer.is_alive(), f"{where}: writer {writer.client} did not notice the kill"
                assert not writer.problem, f"{where}: {writer.problem}"
        ops = [op for w in writers for op in w.ops]
        unknown = [op for op in ops if not op.acked]
        assert len(unknown) == CLIENTS and sum(op.acked for op in ops) >= 8, where

        with running_server(data_dir, tmp_path / f"restart{round_no}.log", **env) as client:
            stored, generation, count = read_store(data_dir)
            assert count == len(stored), f"{where}: doc_count {count} but {len(stored)} documents"
            try:
                expected = settle_round(ops, expected, stored, generation)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None
            assert stored == expected.docs, f"{where}: the store is not the replay of the committed writes"
            landed = [
                i
                for op in unknown
                for i in op.ids
                if i in expected.docs and op.kind == "upsert" and expected.docs[i][1]["op"] == op.tag
            ]
            probes = sorted(set(landed) | set(rng.sample(sorted(expected.docs), min(6, len(expected.docs)))))
            check_served(client, expected, probes)
            log = client.log.read_text(errors="replace")
            assert "rebuilding the index" not in log, f"{where}: the index was rebuilt, not caught up"
            # Every document's stored token vectors are its own text's: compress(encode(text)).
            check_token_vectors(data_dir, where)


_RUNNER: list[BiEncoderRunner] = []


def check_token_vectors(data_dir: Path, where: str = "") -> None:
    """Straight from the store: every document of the collection has exactly one token row (none
    missing, none left over from a replaced or deleted version), the count agrees, and each blob is
    compress(encode(text)) of the document's current text, recomputed here in-process (equal to the server's
    up to the float noise of batching: same header, rows within a fraction of an int8 step's worth)."""
    if not _RUNNER:
        _RUNNER.append(BiEncoderRunner(MODELS_DIR / MODEL, intra_op_threads=1))
    runner = _RUNNER[0]
    conn = sqlite3.connect(f"file:{data_dir / 'sieve.db'}?mode=ro", uri=True)
    try:
        cid, token_format, token_count, doc_count = conn.execute(
            "SELECT id, token_format, token_count, doc_count FROM collections WHERE name = ?", (COLLECTION,)
        ).fetchone()
        fmt = TokenFormat.from_json(json.loads(token_format))
        texts = dict(
            conn.execute("SELECT key, text FROM documents WHERE collection_id = ?", (cid,)).fetchall()
        )
        blobs = dict(conn.execute("SELECT key, blob FROM tokens WHERE collection_id = ?", (cid,)).fetchall())
    finally:
        conn.close()
    assert set(blobs) == set(texts), (
        f"{where}: token rows without a document {sorted(set(blobs) - set(texts))[:5]}, "
        f"documents without token rows {sorted(set(texts) - set(blobs))[:5]}"
    )
    assert token_count == doc_count == len(texts), (
        f"{where}: token_count {token_count}, {len(texts)} documents"
    )
    keys = sorted(texts)
    rows = runner.token_vectors([texts[k] for k in keys])
    offsets = runner.token_offsets([texts[k] for k in keys])
    for key, mine in zip(keys, compress_many(rows, fmt, offsets), strict=True):
        assert read_header(blobs[key]) == read_header(mine), f"{where}: key {key}: {texts[key]!r}"
        np.testing.assert_allclose(decode_tokens(blobs[key]), decode_tokens(mine), atol=2e-2, err_msg=where)


# == file-system helpers (root only) ===================================================================


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _need_root(what: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"{what} needs root and mount(8) (to mount a file system of a known size / state)")


def _unmount(path: Path) -> None:
    if _sh("umount", str(path)).returncode:
        _sh("umount", "-l", str(path))  # still busy: detach now, freed when the last file closes


def _mount_options(path: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    raise AssertionError(f"{path} is not mounted")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    _need_root("a full data directory")
    path.mkdir(parents=True, exist_ok=True)
    result = _sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        _unmount(path)


def fill(path: Path) -> None:
    """Append to `path` until its file system has no space left at all."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def expect_error(call, code: grpc.StatusCode, fragment: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()  # type: ignore[attr-defined]
    details: str = err.value.details()  # type: ignore[attr-defined]
    assert fragment in details, details
    return details


def expect_delete_and_create_refused(client, ids: list[str], code: grpc.StatusCode, fragment: str) -> None:  # type: ignore[no-untyped-def]
    """DeleteDocuments of `ids` and a CreateCollection both fail with `code`, saying `fragment`."""
    expect_error(
        lambda: client.documents.DeleteDocuments(
            documents_pb2.DeleteDocumentsRequest(collection=COLLECTION, ids=ids), timeout=30
        ),
        code,
        fragment,
    )
    expect_error(
        lambda: client.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(collection=collections_pb2.Collection(name="another")),
            timeout=30,
        ),
        code,
        fragment,
    )


def upsert_request(docs: dict[str, tuple[str, dict[str, str]]], collection: str = COLLECTION):  # type: ignore[no-untyped-def]
    return documents_pb2.UpsertDocumentsRequest(
        collection=collection,
        documents=[documents_pb2.Document(id=i, text=t, metadata=m) for i, (t, m) in docs.items()],
    )


def check_reads(client: Client, model: Model, probe: str) -> None:
    """Reads and searches answer as before; health still says SERVING; the server is alive."""
    text, metadata = model.docs[probe]
    hit = client.search.Search(
        search_pb2.SearchRequest(collection=COLLECTION, query=text, top_k=1), timeout=30
    ).hits[0]
    assert (hit.id, hit.text, dict(hit.metadata)) == (probe, text, metadata)
    got = client.documents.GetDocuments(
        documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=[probe]), timeout=30
    )
    assert [d.id for d in got.documents] == [probe]
    info = client.collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=30)
    assert (info.collection.document_count, info.collection.generation) == (len(model.docs), model.generation)
    assert health(client.address) == health_pb2.HealthCheckResponse.SERVING
    assert client.proc.poll() is None


# == 2. a full data directory ===========================================================================


def test_full_data_directory_refuses_writes_clearly_and_recovers_when_space_is_freed(tmp_path: Path) -> None:
    texts, model = Texts(seed=7), Model()
    # A snapshot after every write, however small against the index (SIEVE_SNAPSHOT_GROWTH 0), and f16
    # vectors (not the default i8): snapshots big enough for the gap below.
    env = {
        "SIEVE_SNAPSHOT_EVERY_WRITES": "1",
        "SIEVE_SNAPSHOT_GROWTH": "0",
        "SIEVE_SNAPSHOT_INTERVAL_S": "3600",
        "SIEVE_INDEX_STORAGE": "f16",
        **NO_METRICS,
    }
    with tmpfs(tmp_path / "mnt", "24m") as mnt:
        data_dir, small, big = mnt / "data", mnt / "ballast-small", mnt / "ballast-big"
        with running_server(data_dir, tmp_path / "first.log", **env) as client:
            create_collection(client, token_storage=True)
            for b in range(6):  # 300 documents, a snapshot after every write
                client.upsert(model, new_docs(texts, range(b * 50, (b + 1) * 50), f"b{b}"))
            [snapshot] = collection_snapshots(data_dir)
            assert snapshot_generation(snapshot) == model.generation == 6
            # Room for a small write but not for a snapshot, then nothing at all.
            # (f16 vectors: 300 documents make a ~270 KB snapshot; a one-document write needs far less.)
            gap = 128 * 1024
            small.write_bytes(bytes(gap))
            assert snapshot.stat().st_size > 2 * gap, "the test needs a snapshot much bigger than the gap"
            fill(big)

            # Every kind of write fails with RESOURCE_EXHAUSTED, and none leaves anything behind.
            full = "data directory"
            batch = new_docs(texts, range(1000, 1040), "full")
            detail = expect_error(
                lambda: client.documents.UpsertDocuments(upsert_request(batch), timeout=30),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                full,
            )
            assert "is full" in detail and "not applied" in detail, detail
            expect_delete_and_create_refused(
                client, ["doc-1", "doc-2"], grpc.StatusCode.RESOURCE_EXHAUSTED, "is full"
            )
            got = client.documents.GetDocuments(
                documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=sorted(batch)), timeout=30
            )
            assert not got.documents and sorted(got.missing_ids) == sorted(batch)
            check_reads(client, model, "doc-7")
            assert "Traceback" not in client.log.read_text(errors="replace")  # refused, not crashed
            check_token_vectors(data_dir, "after the refused writes")  # no token row half-written

            # Room for the write but not its snapshot: the write is acknowledged all the same, the failed
            # snapshot leaves no partial file and the previous snapshot as it was.
            small.unlink()
            client.upsert(model, new_docs(texts, range(2000, 2001), "tiny"))
            log = client.log.read_text(errors="replace")
            assert f"index snapshot at generation {model.generation} failed, keeping the one at 6" in log, (
                log[-3000:]
            )
            collection_dir = snapshot.parent
            files = sorted(p.name for p in collection_dir.iterdir() if p.is_file())  # (fulltext/ is a folder)
            assert files == [snapshot.name]  # no temp file
            loaded = VectorIndex.load_latest(collection_dir, DIMS, "cosine", storage="f16")
            assert loaded is not None and loaded[1] == 6 and len(loaded[0]) == 300
            check_reads(client, model, "doc-2000")

            # Space freed: writes work again, without a restart.
            big.unlink()
            client.upsert(model, batch)
            client.delete(model, ["doc-1", "doc-2"])
            check_reads(client, model, "doc-1039")
            kill_9(client)

        with running_server(data_dir, tmp_path / "second.log", **env) as client:
            verify(client, model, ["doc-0", "doc-1000", "doc-1039", "doc-2000", "doc-299"])
            # Caught up from the snapshot at generation 6 (the one the full disk could not replace).
            assert "(snapshot 6, " in client.log.read_text(errors="replace")
            check_token_vectors(data_dir, "after the restart")


# == 3. a read-only data directory ======================================================================


class Ext4Volume:
    """An ext4 file system in an image file, loop-mounted with errors=remount-ro: the way a data directory
    really turns read-only under a running process (the kernel remounts it after a disk error). A plain
    `mount -o remount,ro` is refused with "mount point is busy" while the server holds its store open."""

    def __init__(self, tmp_path: Path) -> None:
        _need_root("a data directory that turns read-only")
        for tool in ("mkfs.ext4", "e2fsck"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")
        self.image, self.mnt = tmp_path / "disk.img", tmp_path / "ext4"
        self.mnt.mkdir()
        with self.image.open("wb") as fh:
            fh.truncate(64 << 20)
        made = _sh("mkfs.ext4", "-q", "-F", str(self.image))
        assert made.returncode == 0, made.stderr
        self.mount()

    def mount(self) -> None:
        result = _sh("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mnt))
        if result.returncode:
            pytest.skip(f"cannot loop-mount an ext4 image here: {result.stderr.strip()}")

    def unmount(self) -> None:
        _unmount(self.mnt)

    def fail(self) -> None:
        """A file-system error, as a failing disk would cause: ext4 aborts its journal and goes read-only."""
        device = next(
            line.split()[0]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(self.mnt)
        )
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"{trigger} does not exist (kernel without ext4 error injection)")
        trigger.write_text("sieve fault test\n")
        # Linux 6.x shows `emergency_ro` in the options and still says read-write to statvfs.
        options = _mount_options(self.mnt)
        assert "ro" in options or "emergency_ro" in options, options
        assert is_read_only(self.mnt)

    def repair(self) -> None:
        """What an operator does next: unmount, fsck, mount again."""
        self.unmount()
        checked = _sh("e2fsck", "-f", "-y", str(self.image))
        assert checked.returncode in (0, 1), checked.stdout + checked.stderr  # 1: errors corrected
        self.mount()


def test_data_directory_turning_read_only_refuses_writes_and_keeps_serving_reads(tmp_path: Path) -> None:
    texts, model = Texts(seed=8), Model()
    env = {"SIEVE_SNAPSHOT_EVERY_WRITES": "40", "SIEVE_SNAPSHOT_INTERVAL_S": "3600", **NO_METRICS}
    volume = Ext4Volume(tmp_path)
    try:
        data_dir = volume.mnt / "data"
        with running_server(data_dir, tmp_path / "first.log", **env) as client:
            create_collection(client)
            for b in range(3):  # a snapshot after the second batch, the third only in the store
                client.upsert(model, new_docs(texts, range(b * 20, (b + 1) * 20), f"b{b}"))
            volume.fail()

            batch = new_docs(texts, range(100, 110), "ro")
            detail = expect_error(
                lambda: client.documents.UpsertDocuments(upsert_request(batch), timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION,
                "is read-only",
            )
            assert str(data_dir) in detail and "not applied" in detail, detail
            expect_delete_and_create_refused(
                client, ["doc-1"], grpc.StatusCode.FAILED_PRECONDITION, "is read-only"
            )
            got = client.documents.GetDocuments(
                documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=sorted(batch)), timeout=30
            )
            assert not got.documents
            check_reads(client, model, "doc-45")
            check_reads(client, model, "doc-3")

            # SIGTERM: the shutdown snapshot cannot be written; the server still stops cleanly.
            client.proc.send_signal(signal.SIGTERM)
            assert client.proc.wait(timeout=60) == 0, client.log.read_text(errors="replace")[-3000:]
            snapshot_failed = f"index snapshot at generation {model.generation} failed, keeping the one at 2"
            assert snapshot_failed in client.log.read_text(errors="replace")

        volume.repair()
        with running_server(data_dir, tmp_path / "second.log", **env) as client:
            verify(client, model, ["doc-0", "doc-45", "doc-59"])
            client.upsert(model, batch)  # writable again
            verify(client, model, ["doc-105"])
    finally:
        volume.unmount()


def test_server_refuses_to_start_on_a_read_only_data_directory(tmp_path: Path) -> None:
    texts, model = Texts(seed=9), Model()
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        data_dir = mnt / "data"
        with running_server(data_dir, tmp_path / "first.log", **NO_METRICS) as client:
            create_collection(client)
            client.upsert(model, new_docs(texts, range(20), "b0"))
            client.proc.send_signal(signal.SIGTERM)
            assert client.proc.wait(timeout=60) == 0

        remounted = _sh("mount", "-o", "remount,ro", str(mnt))  # nothing holds a file open now
        assert remounted.returncode == 0, remounted.stderr
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
        env.update(
            SIEVE_DATA_DIR=str(data_dir), SIEVE_MODELS_DIR=str(MODELS_DIR), SIEVE_GRPC_ADDRESS="127.0.0.1:0"
        )
        env.update(NO_METRICS)
        started = subprocess.run(
            [sys.executable, "-m", "sieve_cli.main", "serve"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 1, started.stderr[-3000:]
        assert started.stderr.strip().splitlines()[-1] == (
            f"sieve serve: data directory {data_dir} is on a read-only file system: the server keeps its document"
            " store there and needs to write it; mount it read-write or point SIEVE_DATA_DIR elsewhere"
        ), started.stderr[-3000:]
        assert "Traceback" not in started.stderr

        assert _sh("mount", "-o", "remount,rw", str(mnt)).returncode == 0
        with running_server(data_dir, tmp_path / "second.log", **NO_METRICS) as client:
            verify(client, model, ["doc-0", "doc-19"])


# == 4. Redis restarted under a running server and worker ===============================================


async def _wait_for(what: str, probe, limit_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not await probe():
        assert time.monotonic() < deadline, f"not within {limit_s:.0f} s: {what}"
        await asyncio.sleep(0.25)


class EncodedTexts:
    """Counts the texts the in-process server's encoder runs on (wrapping the real runner's `encode`)."""

    def __init__(self, runner: BiEncoderRunner) -> None:
        self.runner, self.texts = runner, []  # type: ignore[var-annotated]
        self._encode = runner.encode
        runner.encode = self  # type: ignore[method-assign]

    def __call__(self, texts, batch_size=32, *, tokens=False):  # type: ignore[no-untyped-def]
        self.texts.extend(texts)
        return self._encode(texts, batch_size, tokens=tokens)

    def close(self) -> None:
        del self.runner.encode


def _tasks_run(worker: Worker, name: str) -> int:
    return worker.log.read_text(errors="replace").count(f"task {name} SUCCESS")


async def test_redis_flushed_or_restarted_re_encodes_no_document(
    redis_server: RedisServer, worker: Worker, tmp_path: Path
) -> None:
    """Token vectors live in the server's store, not in Redis: after FLUSHALL, and after Redis is stopped and
    started again empty (no persistence), late-interaction searches complete from the store and no
    document is encoded again, by the server or by a worker. The server's cache, task dispatch and an
    index job on the embed queue all work again without restarting the server or the worker."""
    settings = make_settings(tmp_path / "data", redis_url=redis_server.url)
    api = await start_api(settings)
    encoded = EncodedTexts(api.server.engine.models.get(MODEL))
    r = redis.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    tag = uuid.uuid4().hex[:8]

    def text(i: int | str) -> str:
        return f"{tag} {i} " + " ".join(random.Random(f"{tag}/{i}").sample(WORDS, 8))

    async def upsert(ids: list[str]) -> int:
        request = upsert_request({i: (text(i), {}) for i in ids}, collection=name)
        return (await api.documents.UpsertDocuments(request, timeout=60)).generation

    async def late_search(query: str) -> search_pb2.SearchResponse:
        response = await api.search.Search(
            search_pb2.SearchRequest(collection=name, query=query, top_k=3, settings=late), timeout=30
        )
        stage = response.stages[1]
        assert stage.status == search_pb2.STAGE_STATUS_COMPLETED, stage
        assert (stage.token_source, stage.tokens_pending) == ("store", 0), stage
        return response

    try:
        name = f"redis-{tag}"
        late = common_pb2.SearchSettings(
            # Every document is a candidate (at most 21 here), so a later write cannot push the warm search's
            # best hit out of the first stage and the rankings before and after the Redis faults compare.
            late_interaction=common_pb2.STAGE_MODE_REQUIRED,
            retrieve_candidates=50,
            late_interaction_keep=3,
        )
        await api.collections.CreateCollection(
            collections_pb2.CreateCollectionRequest(
                collection=collections_pb2.Collection(name=name, defaults=late)
            )
        )
        docs = [f"a{i}" for i in range(20)]
        await upsert(docs)
        assert sorted(encoded.texts) == sorted(text(i) for i in docs)  # each document encoded once
        query = f"{tag} query"
        warm = await late_search(query)
        assert warm.stages[1].query_token_source == "encoder pass"
        assert (await late_search(query)).stages[1].query_token_source == "cache"
        embeds_before = _tasks_run(worker, "sieve.embed") + _tasks_run(worker, "sieve.document_tokens")

        # FLUSHALL: the query's cached vectors are gone, the documents' token vectors are not (they never
        # were in Redis). The same search: same ranking, only the query encoded again.
        r.flushall()
        encoded.texts.clear()
        flushed = await late_search(query)
        assert flushed.stages[1].query_token_source == "encoder pass"
        assert [(h.id, round(h.score, 5)) for h in flushed.hits] == [
            (h.id, round(h.score, 5)) for h in warm.hits
        ]
        assert encoded.texts == [query]

        # Redis stopped: writes and late-interaction searches need it not at all.
        redis_server.stop()
        started = time.monotonic()
        await upsert(["down"])
        # About 20 ms here; 15 s is slack for a loaded machine, far below a broker call that waits for Redis.
        assert time.monotonic() - started < 15
        await late_search(f"{tag} while Redis is down")
        redis_server.start()  # empty: no persistence
        encoded.texts.clear()
        again = await late_search(query)
        assert [h.id for h in again.hits][:1] == [h.id for h in warm.hits][:1]
        assert encoded.texts == [query]  # no document re-encoded after the restart either
        assert (
            _tasks_run(worker, "sieve.embed") + _tasks_run(worker, "sieve.document_tokens") == embeds_before
        )

        # The server's cache works again: the query's vectors are written to the restarted Redis.
        async def query_cached() -> bool:
            await late_search(f"{tag} query after the restart")
            return bool(r.keys("sieve:qtok:*"))

        await _wait_for("the server's cache writes to the restarted Redis", query_cached)

        # Dispatch and worker: an index job on the embed queue, its token vectors stored with its documents.
        path = tmp_path / "job.jsonl"
        path.write_text("".join(json.dumps({"id": f"j{i}", "text": text(f"j{i}")}) + "\n" for i in range(30)))
        final = await run_index_job(api, name, path, batch_size=10)
        assert (final.state, final.done, final.failed, final.embedder) == (
            jobs_pb2.JOB_STATE_SUCCEEDED,
            30,
            0,
            "workers",
        ), final
        info = await api.collections.GetCollection(collections_pb2.GetCollectionRequest(name=name))
        assert info.collection.token_storage.pending == 0
        hit = await api.search.Search(
            search_pb2.SearchRequest(
                collection=name, query=text("j17"), top_k=1, min_generation=final.generation, settings=late
            ),
            timeout=30,
        )
        assert hit.hits[0].id == "j17" and hit.stages[1].token_source == "store"
        assert worker.proc.poll() is None  # the same worker process throughout
    finally:
        encoded.close()
        r.close()
        await stop_api(api)
