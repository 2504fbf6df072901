"""Durability against a real `sieve serve` process: acknowledged writes survive `kill -9`.

Each test starts `python -m sieve_cli.main serve` on a free port with its own data directory, writes over
gRPC (a write is acknowledged when its RPC returns), kills the server and restarts it on the same data
directory, then checks documents, counts, generation and that the index serves every live document.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from sieve.v1 import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from server.storage.index import VectorIndex, snapshot_files, snapshot_generation
from sieve_cli import stack

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / "models"
MODEL = "all-MiniLM-L6-v2"
DIMS = 384
COLLECTION = "durable"
NO_AUTO_SNAPSHOT = {"SIEVE_SNAPSHOT_EVERY_WRITES": "1000000", "SIEVE_SNAPSHOT_INTERVAL_S": "3600"}

pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / MODEL / "manifest.json").is_file(),
    reason=f"no bundle at {MODELS_DIR / MODEL}; run `make models`",
)

WORDS = (
    "river",
    "mountain",
    "coffee",
    "violin",
    "engine",
    "harbor",
    "pepper",
    "lantern",
    "glacier",
    "orchard",
    "falcon",
    "marble",
    "thunder",
    "velvet",
    "compass",
    "meadow",
    "rocket",
    "saddle",
    "copper",
    "island",
    "jungle",
    "beacon",
    "cactus",
    "dragon",
    "ember",
    "fossil",
    "garlic",
    "hammer",
    "igloo",
    "jasmine",
    "kettle",
    "lemon",
    "magnet",
    "nectar",
    "oyster",
    "pillow",
    "quartz",
    "raven",
    "silver",
    "tulip",
    "umbrella",
    "vapor",
    "walnut",
    "yacht",
    "zebra",
    "anchor",
    "bamboo",
    "candle",
    "desert",
    "eagle",
    "feather",
    "ginger",
    "honey",
    "ivory",
    "jacket",
    "kayak",
    "ladder",
    "mango",
    "nickel",
    "olive",
    "parrot",
    "quiver",
    "ribbon",
)


@dataclass
class Model:
    """What the server has acknowledged: the expected state after any restart."""

    docs: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    generation: int = 0


class Texts:
    """Short, distinct, deterministic texts."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._seen: set[str] = set()

    def new(self) -> str:
        while True:
            text = " ".join(self._rng.choice(WORDS, 6, replace=False).tolist())
            if text not in self._seen:
                self._seen.add(text)
                return text


@dataclass
class Client:
    proc: subprocess.Popen  # type: ignore[type-arg]
    log: Path
    collections: collections_pb2_grpc.CollectionServiceStub
    documents: documents_pb2_grpc.DocumentServiceStub
    search: search_pb2_grpc.SearchServiceStub
    address: str = ""  # host:port the server listens on

    # -- writes that keep the model in step with what was acknowledged ---------------------------
    def upsert(self, model: Model, docs: dict[str, tuple[str, dict[str, str]]]) -> int:
        request = documents_pb2.UpsertDocumentsRequest(
            collection=COLLECTION,
            documents=[documents_pb2.Document(id=i, text=t, metadata=m) for i, (t, m) in docs.items()],
        )
        response = self.documents.UpsertDocuments(request, timeout=60)
        assert response.upserted == len(docs)
        assert response.generation == model.generation + 1
        model.generation = response.generation
        model.docs.update(docs)
        model.deleted -= set(docs)
        return response.generation

    def delete(self, model: Model, ids: list[str], unknown: tuple[str, ...] = ()) -> int:
        response = self.documents.DeleteDocuments(
            documents_pb2.DeleteDocumentsRequest(collection=COLLECTION, ids=[*ids, *unknown]), timeout=60
        )
        assert (response.deleted, response.not_found) == (len(ids), len(unknown))
        assert response.generation == model.generation + 1
        model.generation = response.generation
        for i in ids:
            del model.docs[i]
        model.deleted |= set(ids)
        return response.generation


@contextmanager
def running_server(data_dir: Path, log: Path, **env: str) -> Iterator[Client]:
    """A `sieve serve` child process (sieve_cli.stack), SERVING, killed (if still alive) on the way out."""
    with (
        stack.sieve_process(
            "serve",
            data_dir=data_dir,
            settings=env,
            log=log,
            models_dir=MODELS_DIR,
            timeout_s=60,
            stop="kill",
        ) as served,
        grpc.insecure_channel(served.address) as channel,
    ):
        yield Client(
            served.proc,
            log,
            collections_pb2_grpc.CollectionServiceStub(channel),
            documents_pb2_grpc.DocumentServiceStub(channel),
            search_pb2_grpc.SearchServiceStub(channel),
            served.address,
        )


def kill_9(client: Client) -> None:
    os.kill(client.proc.pid, signal.SIGKILL)
    assert client.proc.wait(timeout=30) == -signal.SIGKILL


def collection_snapshots(data_dir: Path) -> list[Path]:
    root = data_dir / "collections"
    dirs = list(root.iterdir()) if root.exists() else []
    assert len(dirs) <= 1, f"expected one collection directory, got {dirs}"
    return snapshot_files(dirs[0]) if dirs else []


def create_collection(client: Client, token_storage: bool = False) -> None:
    """The test collection; with `token_storage` it stores late-interaction token vectors (default format)."""
    collection = collections_pb2.Collection(name=COLLECTION)
    if token_storage:
        collection.token_storage.SetInParent()
    request = collections_pb2.CreateCollectionRequest(collection=collection)
    response = client.collections.CreateCollection(request, timeout=60)
    assert response.collection.generation == 0


def new_docs(texts: Texts, ids: range, tag: str) -> dict[str, tuple[str, dict[str, str]]]:
    return {f"doc-{i}": (texts.new(), {"batch": tag, "parity": str(i % 2)}) for i in ids}


def replaced(model: Model, texts: Texts, ids: list[str], tag: str) -> dict[str, tuple[str, dict[str, str]]]:
    """New text and metadata for existing ids."""
    assert all(i in model.docs for i in ids)
    return {i: (texts.new(), {"batch": tag, "replaced": "yes"}) for i in ids}


def metadata_only(model: Model, ids: list[str], tag: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Same text, new metadata."""
    return {i: (model.docs[i][0], {"batch": tag, "touched": "metadata"}) for i in ids}


def verify(client: Client, model: Model, probe_ids: list[str]) -> None:
    """The restarted server holds exactly the acknowledged state, in the store and in the index."""
    info = client.collections.GetCollection(collections_pb2.GetCollectionRequest(name=COLLECTION), timeout=30)
    assert info.collection.document_count == len(model.docs)
    assert info.collection.generation == model.generation

    ids = sorted(model.docs) + sorted(model.deleted)
    request = documents_pb2.GetDocumentsRequest(collection=COLLECTION, ids=ids)
    got = client.documents.GetDocuments(request, timeout=30)
    assert sorted(got.missing_ids) == sorted(model.deleted)
    assert [d.id for d in got.documents] == sorted(model.docs)
    for doc in got.documents:
        text, metadata = model.docs[doc.id]
        assert (doc.text, dict(doc.metadata)) == (text, metadata), f"document {doc.id} is stale"

    # Every live document's current vector is in the index: a filter per batch tag takes the exact path,
    # which scores the index's vectors for the keys the store says match (a key missing from the index
    # would be missing from the hits). HNSW reachability is not the question here, so no graph walk.
    tags = sorted({meta["batch"] for _, meta in model.docs.values()})
    found: list[str] = []
    for tag in tags:
        response = client.search.Search(
            search_pb2.SearchRequest(
                collection=COLLECTION,
                query="river coffee",
                top_k=len(model.docs),
                omit_documents=True,
                filter=common_pb2.Filter(all=[common_pb2.Condition(key="batch", equals=tag)]),
            ),
            timeout=30,
        )
        assert response.generation == model.generation
        assert response.stages[0].method == "exact"
        found += [h.id for h in response.hits]
    assert sorted(found) == sorted(model.docs)

    # Each probe is found by its own text as the top hit (its current vector is in the index).
    for doc_id in probe_ids:
        text, metadata = model.docs[doc_id]
        response = client.search.Search(
            search_pb2.SearchRequest(collection=COLLECTION, query=text, top_k=3), timeout=30
        )
        top = response.hits[0]
        assert top.id == doc_id, f"searching the text of {doc_id} found {[h.id for h in response.hits]}"
        assert top.score > 0.999
        assert (top.text, dict(top.metadata)) == (text, metadata)


def assert_caught_up_without_rebuild(log: Path, snapshot_gen: int) -> None:
    text = log.read_text(errors="replace")
    assert "rebuilding the index" not in text, f"the index was rebuilt, not caught up:\n{text}"
    assert f"(snapshot {snapshot_gen}, " in text, f"did not load the snapshot at {snapshot_gen}:\n{text}"


def test_kill_9_before_any_snapshot_rebuilds_the_index_from_the_store(tmp_path: Path) -> None:
    data_dir, texts, model = tmp_path / "data", Texts(seed=1), Model()
    with running_server(data_dir, tmp_path / "first.log", **NO_AUTO_SNAPSHOT) as client:
        create_collection(client)
        for b in range(6):
            client.upsert(model, new_docs(texts, range(b * 25, (b + 1) * 25), f"b{b}"))
        client.upsert(model, replaced(model, texts, [f"doc-{i}" for i in range(0, 40, 2)], "r1"))
        client.upsert(model, metadata_only(model, [f"doc-{i}" for i in range(1, 21, 2)], "m1"))
        client.delete(model, [f"doc-{i}" for i in range(100, 115)], unknown=("never-existed",))
        client.upsert(
            model,
            {  # deleted then written again, and a mixed batch
                **new_docs(texts, range(100, 103), "again"),
                **new_docs(texts, range(150, 160), "late"),
                **replaced(model, texts, ["doc-41", "doc-43"], "r2"),
            },
        )
        client.delete(model, ["doc-5", "doc-150"])
        assert collection_snapshots(data_dir) == [], "a snapshot was written; this case needs none"
        kill_9(client)

    probes = ["doc-0", "doc-38", "doc-1", "doc-41", "doc-100", "doc-159", "doc-149", "doc-77"]
    with running_server(data_dir, tmp_path / "second.log", **NO_AUTO_SNAPSHOT) as client:
        verify(client, model, probes)
        assert_caught_up_without_rebuild(client.log, 0)
        # Writable again, and the generation continues.
        client.upsert(model, new_docs(texts, range(500, 501), "after-restart"))
        verify(client, model, ["doc-500"])


def test_kill_9_after_a_snapshot_catches_up_later_writes(tmp_path: Path) -> None:
    data_dir, texts, model = tmp_path / "data", Texts(seed=2), Model()
    every = 40
    env = {"SIEVE_SNAPSHOT_EVERY_WRITES": str(every), "SIEVE_SNAPSHOT_INTERVAL_S": "3600"}
    with running_server(data_dir, tmp_path / "first.log", **env) as client:
        create_collection(client)
        snapshots_seen = []
        for b in range(6):  # 20 documents a batch: a snapshot every second batch
            client.upsert(model, new_docs(texts, range(b * 20, (b + 1) * 20), f"b{b}"))
            snapshots_seen += [snapshot_generation(p) for p in collection_snapshots(data_dir)]
        client.delete(model, ["doc-0", "doc-1"])  # 2 changes
        files = collection_snapshots(data_dir)
        assert len(files) == 1, f"expected exactly one snapshot file, got {files}"
        snap_gen = snapshot_generation(files[0])
        assert len(set(snapshots_seen)) >= 2, "snapshots were not written as writes accumulated"
        assert snap_gen == 6, "the last snapshot should be at the sixth batch"

        # After the last snapshot (fewer than `every` changed documents, so no new snapshot):
        # replacements, metadata-only changes, deletes, new documents, a delete-then-rewrite.
        after = [
            client.upsert(model, replaced(model, texts, [f"doc-{i}" for i in range(10, 20)], "r-after")),
            client.upsert(model, metadata_only(model, [f"doc-{i}" for i in range(20, 25)], "m-after")),
            client.delete(model, [f"doc-{i}" for i in range(30, 36)]),
            client.upsert(model, new_docs(texts, range(200, 208), "new-after")),
            client.upsert(model, new_docs(texts, range(30, 32), "rewritten-after")),
        ]
        assert collection_snapshots(data_dir) == files, "a snapshot was written after the planned last one"
        assert min(after) > snap_gen
        kill_9(client)

    probes = ["doc-10", "doc-19", "doc-22", "doc-30", "doc-31", "doc-200", "doc-207", "doc-50", "doc-119"]
    with running_server(data_dir, tmp_path / "second.log", **env) as client:
        verify(client, model, probes)
        assert_caught_up_without_rebuild(client.log, snap_gen)
        client.upsert(model, replaced(model, texts, ["doc-50"], "after-restart"))
        verify(client, model, ["doc-50"])


def test_sigterm_exits_cleanly_and_leaves_a_snapshot_at_the_final_generation(tmp_path: Path) -> None:
    data_dir, texts, model = tmp_path / "data", Texts(seed=3), Model()
    with running_server(data_dir, tmp_path / "first.log", **NO_AUTO_SNAPSHOT) as client:
        create_collection(client)
        for b in range(3):
            client.upsert(model, new_docs(texts, range(b * 20, (b + 1) * 20), f"b{b}"))
        client.delete(model, ["doc-3", "doc-4"])
        client.upsert(model, replaced(model, texts, ["doc-5"], "r"))
        assert collection_snapshots(data_dir) == []
        client.proc.send_signal(signal.SIGTERM)
        try:
            code = client.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 30 s of SIGTERM")
        assert code == 0, f"exit code {code}:\n{client.log.read_text(errors='replace')}"

    files = collection_snapshots(data_dir)
    assert [snapshot_generation(p) for p in files] == [model.generation]
    loaded = VectorIndex.load_latest(files[0].parent, DIMS, "cosine")
    assert loaded is not None
    index, generation = loaded
    assert generation == model.generation
    assert len(index) == len(model.docs)

    with running_server(data_dir, tmp_path / "second.log", **NO_AUTO_SNAPSHOT) as client:
        verify(client, model, ["doc-5", "doc-0", "doc-59"])
        assert_caught_up_without_rebuild(client.log, model.generation)
