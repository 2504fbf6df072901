"""Unit tests of the durable document store (server/storage/store.py) on both of its backends: a real SQLite
file and a real PostgreSQL database (the `postgres` fixture's cluster; skipped where PostgreSQL is missing).
The tests of SQLite's own matters (file space, migrating an old file) run on SQLite only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.storage.records import CollectionRow
from server.storage.store import SqliteStore, Store
from sieve_core.errors import AlreadyExists, NotFound
from sieve_core.types import Condition, Document

DIMS = 4


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens the test's store (again): an SQLite file, or a PostgreSQL database of the test's own."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "sieve.db")
    url = request.getfixturevalue("pg_url")
    from server.storage.postgres_db import PostgresStore

    return lambda: PostgresStore(url)


@pytest.fixture
def store(reopen: Callable[[], Store]) -> Iterator[Store]:
    s = reopen()
    yield s
    s.close()


def _create(store: Store, name: str = "c") -> CollectionRow:
    return store.create_collection(name, "model", "model@rev", "cosine", DIMS, "{}")


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)


def _upsert(store: Store, cid: int, docs: list[Document], seed: int = 0):  # type: ignore[no-untyped-def]
    """Upsert with a vector for every document (as if all were embedded)."""
    vectors = {d.id: _vec(seed * 1000 + i) for i, d in enumerate(docs)}
    outcome = store.upsert(cid, docs, vectors)
    assert outcome.missing_vectors == []
    return outcome, vectors


def _live(store: Store, cid: int) -> dict[int, np.ndarray]:
    """key -> vector of every stored document, read straight from the documents table."""
    rows = (
        store._conn().execute("SELECT key, vector FROM documents WHERE collection_id = ?", (cid,)).fetchall()
    )
    return {int(k): np.frombuffer(v, dtype=np.float32) for k, v in rows}


def _apply(state: dict[int, np.ndarray], store: Store, cid: int, generation: int) -> dict[int, np.ndarray]:
    """Apply changes_since(generation) to a copy of `state` the way the engine catches up an index."""
    out = dict(state)
    for change in store.changes_since(cid, generation, DIMS, batch=2):
        for key in change.removed_keys.tolist():
            out.pop(int(key), None)
        for key, vec in zip(change.added_keys.tolist(), change.added_vectors, strict=True):
            out[int(key)] = vec.copy()
    return out


def test_create_twice_raises_already_exists(store: Store) -> None:
    row = _create(store, "docs")
    assert (row.name, row.dims, row.metric, row.generation, row.doc_count) == ("docs", DIMS, "cosine", 0, 0)
    with pytest.raises(AlreadyExists):
        _create(store, "docs")
    assert [r.name for r in store.list_collections()] == ["docs"]


def test_unknown_collection_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_collection("nope")
    with pytest.raises(NotFound):
        store.delete_collection("nope")
    _create(store, "gone")
    store.delete_collection("gone")
    with pytest.raises(NotFound):
        store.get_collection("gone")


def test_upsert_is_atomic_when_a_changed_text_has_no_vector(store: Store) -> None:
    cid = _create(store).id
    _upsert(store, cid, [Document("a", "alpha", {"k": "1"}), Document("b", "beta", {"k": "1"})])
    before = store.get_collection("c")
    docs_before = store.get_documents(cid, ["a", "b"])
    live_before = _live(store, cid)

    # "a" changes text but gets no vector; "c" is new and has one; "b" changes metadata only.
    batch = [Document("a", "alpha v2", {"k": "2"}), Document("b", "beta", {"k": "9"}), Document("c", "gamma")]
    outcome = store.upsert(cid, batch, {"c": _vec(42)})
    assert outcome.missing_vectors == ["a"]
    assert (outcome.generation, outcome.added, outcome.removed) == (0, [], [])

    after = store.get_collection("c")
    assert (after.generation, after.doc_count) == (before.generation, before.doc_count)
    assert store.get_documents(cid, ["a", "b", "c"]) == docs_before  # "c" absent, "a" and "b" untouched
    assert store.filter_keys(cid, [Condition("k", "9")]).size == 0
    assert store.filter_keys(cid, [Condition("k", "1")]).size == 2
    assert _live(store, cid).keys() == live_before.keys()
    changes = list(store.changes_since(cid, before.generation, DIMS))
    assert [c.removed_keys.size + c.added_keys.size for c in changes] == [0]

    # A new document without a vector is missing too.
    outcome = store.upsert(cid, [Document("d", "delta")], {})
    assert outcome.missing_vectors == ["d"]
    assert store.get_collection("c").generation == before.generation

    # With the vector supplied, the same batch goes through.
    outcome = store.upsert(cid, batch, {"a": _vec(7), "c": _vec(42)})
    assert outcome.missing_vectors == []
    assert outcome.generation == before.generation + 1
    assert store.get_documents(cid, ["a"])["a"].text == "alpha v2"
    assert store.get_collection("c").doc_count == 3


def test_unchanged_text_keeps_key_and_only_metadata_changes(store: Store) -> None:
    cid = _create(store).id
    _, vectors = _upsert(store, cid, [Document("a", "alpha", {"lang": "en", "x": "1"})])
    key = store.get_documents(cid, ["a"])["a"].key
    gen = store.get_collection("c").generation
    assert store.unchanged_ids(cid, [Document("a", "alpha"), Document("b", "beta")]) == {"a"}
    assert store.unchanged_ids(cid, [Document("a", "alpha!")]) == set()

    outcome = store.upsert(cid, [Document("a", "alpha", {"lang": "fr"})], {})  # no vector needed
    assert outcome.missing_vectors == []
    assert outcome.added == [] and outcome.removed == []
    assert outcome.generation == gen + 1
    doc = store.get_documents(cid, ["a"])["a"]
    assert (doc.key, doc.text, doc.metadata) == (key, "alpha", {"lang": "fr"})
    assert store.get_collection("c").doc_count == 1
    assert store.filter_keys(cid, [Condition("lang", "en")]).size == 0
    assert store.filter_keys(cid, [Condition("x", "1")]).size == 0
    assert store.filter_keys(cid, [Condition("lang", "fr")]).tolist() == [key]
    np.testing.assert_array_equal(_live(store, cid)[key], vectors["a"])  # vector kept
    # No tombstone: a snapshot from before only needs the (same-key) document re-applied.
    changes = list(store.changes_since(cid, gen, DIMS))
    assert sum(c.removed_keys.size for c in changes) == 0
    assert [k for c in changes for k in c.added_keys.tolist()] == [key]


def test_changed_text_gets_new_key_and_tombstone(store: Store) -> None:
    cid = _create(store).id
    _upsert(store, cid, [Document("a", "alpha", {"v": "1"}), Document("b", "beta")])
    old_key = store.get_documents(cid, ["a"])["a"].key
    gen = store.get_collection("c").generation

    new_vec = _vec(99)
    outcome = store.upsert(cid, [Document("a", "alpha v2", {"v": "2"})], {"a": new_vec})
    assert outcome.missing_vectors == [] and outcome.generation == gen + 1
    assert outcome.removed == [old_key]
    assert len(outcome.added) == 1
    new_key, added_vec = outcome.added[0]
    assert new_key != old_key and new_key > max(_live(store, cid).keys() - {new_key})
    np.testing.assert_array_equal(added_vec, new_vec)

    doc = store.get_documents(cid, ["a"])["a"]
    assert (doc.key, doc.text, doc.metadata) == (new_key, "alpha v2", {"v": "2"})
    assert store.get_collection("c").doc_count == 2
    assert old_key not in _live(store, cid)
    assert store.documents_by_keys(cid, [old_key]) == {}
    assert store.filter_keys(cid, [Condition("v", "1")]).size == 0
    assert store.filter_keys(cid, [Condition("v", "2")]).tolist() == [new_key]
    changes = list(store.changes_since(cid, gen, DIMS))
    assert [k for c in changes for k in c.removed_keys.tolist()] == [old_key]
    assert [k for c in changes for k in c.added_keys.tolist()] == [new_key]


def test_delete_counts(store: Store) -> None:
    cid = _create(store).id
    _upsert(store, cid, [Document(i, f"text {i}", {"g": "x"}) for i in ("a", "b", "c")])
    keys = {i: d.key for i, d in store.get_documents(cid, ["a", "b", "c"]).items()}
    gen = store.get_collection("c").generation

    generation, removed = store.delete(cid, ["a", "missing", "a", "c"])
    assert generation == gen + 1
    assert sorted(removed) == sorted([keys["a"], keys["c"]])  # each once, unknown ids ignored
    row = store.get_collection("c")
    assert (row.generation, row.doc_count) == (gen + 1, 1)
    assert set(store.get_documents(cid, ["a", "b", "c"])) == {"b"}
    assert store.filter_keys(cid, [Condition("g", "x")]).tolist() == [keys["b"]]
    tomb = [k for c in store.changes_since(cid, gen, DIMS) for k in c.removed_keys.tolist()]
    assert sorted(tomb) == sorted(removed)

    _, removed = store.delete(cid, ["a", "zzz"])
    assert removed == []
    assert store.get_collection("c").doc_count == 1


def test_a_write_to_a_collection_deleted_meanwhile_is_not_found(store: Store) -> None:
    cid = _create(store, "gone").id  # e.g. deleted through another server sharing the store
    store.delete_collection("gone")
    with pytest.raises(NotFound):
        store.upsert(cid, [Document("a", "alpha")], {"a": _vec(1)})
    with pytest.raises(NotFound):
        store.delete(cid, ["a"])
    assert store.list_collections() == []


def test_changes_since_catches_up_a_snapshot(store: Store) -> None:
    cid = _create(store).id
    docs = [Document(f"d{i}", f"text {i}", {"n": str(i % 3)}) for i in range(10)]
    _upsert(store, cid, docs, seed=1)
    store.delete(cid, ["d0"])
    _upsert(store, cid, [Document("d1", "text 1 v2")], seed=2)

    snap_gen = store.get_collection("c").generation
    snapshot = _live(store, cid)  # what an index snapshot at snap_gen holds

    # Writes after the snapshot: new docs, replacements, metadata-only changes, deletes, and a document
    # that is both added and deleted after the snapshot.
    _upsert(store, cid, [Document("d10", "text 10"), Document("d11", "text 11")], seed=3)
    _upsert(store, cid, [Document("d2", "text 2 v2"), Document("d10", "text 10 v2")], seed=4)
    store.upsert(cid, [Document("d3", "text 3", {"n": "changed"})], {})
    store.delete(cid, ["d4", "d11"])
    final_gen = store.get_collection("c").generation
    final = _live(store, cid)

    caught_up = _apply(snapshot, store, cid, snap_gen)
    assert caught_up.keys() == final.keys()
    for key, vec in final.items():
        np.testing.assert_array_equal(caught_up[key], vec)

    # Exactly the right removals: keys live at the snapshot that are gone now are all listed, and a
    # key still live now is never listed (only keys that really retired).
    removed = {k for c in store.changes_since(cid, snap_gen, DIMS) for k in c.removed_keys.tolist()}
    assert snapshot.keys() - final.keys() <= removed
    assert not removed & final.keys()
    # Removals come first (the engine relies on it), added vectors have the collection's shape.
    changes = list(store.changes_since(cid, snap_gen, DIMS, batch=2))
    assert changes[0].added_keys.size == 0
    assert all(c.removed_keys.size == 0 for c in changes[1:])
    assert all(c.added_vectors.shape == (c.added_keys.size, DIMS) for c in changes)
    assert all(c.added_keys.dtype == np.uint64 and c.removed_keys.dtype == np.uint64 for c in changes)

    # From scratch (generation 0) and at the latest generation.
    assert _apply({}, store, cid, 0).keys() == final.keys()
    assert _apply(final, store, cid, final_gen) == final

    # After a snapshot at snap_gen, pruning its tombstones does not change what catches it up.
    store.prune_tombstones(cid, snap_gen)
    assert _apply(snapshot, store, cid, snap_gen).keys() == final.keys()


def test_filter_keys_with_one_and_two_conditions(store: Store) -> None:
    cid = _create(store).id
    docs = [
        Document("en-2020", "a", {"lang": "en", "year": "2020"}),
        Document("en-2021", "b", {"lang": "en", "year": "2021"}),
        Document("fr-2020", "c", {"lang": "fr", "year": "2020"}),
        Document("none", "d", {}),
        Document("de-2020", "e", {"lang": "de", "year": "2020", "extra": "en"}),
    ]
    _upsert(store, cid, docs)
    key = {i: d.key for i, d in store.get_documents(cid, [d.id for d in docs]).items()}

    en = store.filter_keys(cid, [Condition("lang", "en")])
    assert en.dtype == np.uint64
    assert en.tolist() == sorted([key["en-2020"], key["en-2021"]])
    assert store.filter_keys(cid, [Condition("year", "2020")]).tolist() == sorted(
        [key["en-2020"], key["fr-2020"], key["de-2020"]]
    )
    both = store.filter_keys(cid, [Condition("lang", "en"), Condition("year", "2020")])
    assert both.tolist() == [key["en-2020"]]
    assert store.filter_keys(cid, [Condition("lang", "fr"), Condition("year", "2021")]).size == 0
    assert store.filter_keys(cid, [Condition("lang", "EN")]).size == 0  # exact, case-sensitive
    assert store.filter_keys(cid, [Condition("missing", "x")]).size == 0

    # Other collections' metadata never leaks in.
    other = _create(store, "other").id
    _upsert(store, other, [Document("x", "x", {"lang": "en"})])
    assert store.filter_keys(cid, [Condition("lang", "en")]).tolist() == en.tolist()


def test_data_survives_close_and_reopen(reopen: Callable[[], Store]) -> None:
    store = reopen()
    cid = _create(store, "keep").id
    _, vectors = _upsert(store, cid, [Document("a", "alpha", {"m": "1"}), Document("b", "beta")])
    store.delete(cid, ["b"])
    row = store.get_collection("keep")
    live = _live(store, cid)
    store.close()

    reopened = reopen()
    try:
        again = reopened.get_collection("keep")
        assert again == row
        assert (again.generation, again.doc_count) == (2, 1)
        docs = reopened.get_documents(cid, ["a", "b"])
        assert set(docs) == {"a"}
        assert (docs["a"].text, docs["a"].metadata) == ("alpha", {"m": "1"})
        assert reopened.filter_keys(cid, [Condition("m", "1")]).tolist() == [docs["a"].key]
        rebuilt = _apply({}, reopened, cid, 0)
        assert rebuilt.keys() == live.keys()
        np.testing.assert_array_equal(rebuilt[docs["a"].key], vectors["a"])
        # Keys keep increasing after a reopen (never reused).
        outcome, _ = _upsert(reopened, cid, [Document("c", "gamma")])
        assert outcome.added[0][0] > max(live)
    finally:
        reopened.close()


# -- token vectors ------------------------------------------------------------------------------------
FORMAT_JSON = '{"codec": "int8", "pool_factor": 4, "projection_dims": 0}'


def _token_collection(store: Store, name: str = "t") -> CollectionRow:
    return store.create_collection(name, "model", "model@rev", "cosine", DIMS, "{}", FORMAT_JSON, "model@rev")


def _blob(doc_id: str, size: int = 64) -> bytes:
    """A stand-in blob that names its document (the store treats blobs as opaque bytes)."""
    return (doc_id.encode() * size)[:size]


def test_token_format_is_recorded_per_collection(store: Store) -> None:
    plain = _create(store, "plain")
    assert (plain.token_format, plain.token_model_id, plain.tokens_pending) == (None, None, 0)
    tok = _token_collection(store)
    again = store.get_collection("t")
    assert (
        (again.token_format, again.token_model_id)
        == (FORMAT_JSON, "model@rev")
        == (
            tok.token_format,
            tok.token_model_id,
        )
    )


def test_tokens_are_written_with_the_documents_and_go_with_their_keys(store: Store) -> None:
    cid = _token_collection(store).id
    docs = [Document("a", "alpha"), Document("b", "beta"), Document("c", "gamma")]
    vectors = {d.id: _vec(i) for i, d in enumerate(docs)}
    store.upsert(cid, docs, vectors, {d.id: _blob(d.id) for d in docs})
    keys = {i: d.key for i, d in store.get_documents(cid, ["a", "b", "c"]).items()}
    assert store.token_blobs(cid, list(keys.values())) == {keys[i]: _blob(i) for i in keys}
    row = store.get_collection("t")
    assert (row.doc_count, row.token_count, row.tokens_pending) == (3, 3, 0)

    # A changed text whose vector is missing writes nothing at all: no document, no token row.
    outcome = store.upsert(
        cid,
        [Document("a", "alpha v2"), Document("d", "delta")],
        {"d": _vec(9)},
        {
            "a": _blob("a2"),
            "d": _blob("d"),
        },
    )
    assert outcome.missing_vectors == ["a"]
    assert store.get_collection("t").token_count == 3
    assert store.pending_tokens(cid, 10) == []

    # Replaced: the old key's row goes in the same transaction, the new key has the new blob.
    outcome = store.upsert(cid, [Document("a", "alpha v2")], {"a": _vec(7)}, {"a": _blob("a2")})
    new_key = outcome.added[0][0]
    assert store.token_blobs(cid, [keys["a"], new_key]) == {new_key: _blob("a2")}
    # Deleted: its row goes too.
    store.delete(cid, ["b"])
    assert store.token_blobs(cid, [keys["b"]]) == {}
    row = store.get_collection("t")
    assert (row.doc_count, row.token_count, row.tokens_pending) == (2, 2, 0)
    # Other collections never see these rows.
    other = _token_collection(store, "other").id
    assert store.token_blobs(other, [new_key, keys["c"]]) == {}


def test_pending_documents_are_counted_listed_and_filled(store: Store) -> None:
    cid = _token_collection(store).id
    docs = [Document(f"d{i}", f"text {i}") for i in range(5)]
    _upsert(store, cid, docs)  # no token blobs: e.g. a ColBERT bundle computes them later
    row = store.get_collection("t")
    assert (row.doc_count, row.token_count, row.tokens_pending) == (5, 0, 5)
    pending = store.pending_tokens(cid, 3)
    assert [p.doc_id for p in pending] == ["d0", "d1", "d2"]
    assert [p.text for p in pending] == ["text 0", "text 1", "text 2"]
    rest = store.pending_tokens(cid, 10, after_key=pending[-1].key)
    assert [p.doc_id for p in rest] == ["d3", "d4"]

    # Meanwhile d1 is replaced and d2 deleted: their blobs (computed from the old texts) are not stored.
    store.upsert(cid, [Document("d1", "text 1 v2")], {"d1": _vec(5)})
    store.delete(cid, ["d2"])
    written = store.put_tokens(cid, {p.key: _blob(p.doc_id) for p in pending + rest})
    assert written == 3  # d0, d3, d4
    row = store.get_collection("t")
    assert (row.doc_count, row.token_count, row.tokens_pending) == (4, 3, 1)
    assert [p.doc_id for p in store.pending_tokens(cid, 10)] == ["d1"]
    # Writing the same blob twice counts once.
    assert store.put_tokens(cid, {pending[0].key: _blob("d0")}) == 0
    # An unchanged text upserted with its blob fills its pending row, and only that one.
    d1 = store.pending_tokens(cid, 10)[0]
    store.upsert(
        cid,
        [Document("d1", "text 1 v2"), Document("d0", "text 0")],
        {},
        {
            "d1": _blob("d1"),
            "d0": b"not stored: d0 has its row",
        },
    )
    assert store.token_blobs(cid, [d1.key, pending[0].key]) == {
        d1.key: _blob("d1"),
        pending[0].key: _blob("d0"),
    }
    assert store.get_collection("t").tokens_pending == 0


def test_a_new_token_model_makes_every_document_pending(store: Store) -> None:
    cid = _token_collection(store).id
    docs = [Document("a", "alpha"), Document("b", "beta")]
    store.upsert(cid, docs, {d.id: _vec(i) for i, d in enumerate(docs)}, {d.id: _blob(d.id) for d in docs})
    assert store.set_token_storage(cid, FORMAT_JSON, "model@rev") == 0  # unchanged: nothing dropped
    assert store.get_collection("t").tokens_pending == 0
    assert store.set_token_storage(cid, FORMAT_JSON, "colbert@v2") == 2
    row = store.get_collection("t")
    assert (row.token_model_id, row.token_count, row.tokens_pending) == ("colbert@v2", 0, 2)
    assert len(store.pending_tokens(cid, 10)) == 2


def test_deleting_and_replacing_documents_reclaims_token_space(tmp_path: Path) -> None:
    path = tmp_path / "sieve.db"
    store = SqliteStore(path)
    try:
        assert store.incremental_vacuum
        cid = _token_collection(store).id
        blob_bytes = 23_000  # a SciFact document at int8, pool 4
        rng = np.random.default_rng(0)

        def write(ids: range, version: str) -> None:
            docs = [Document(f"d{i}", f"text {i} {version}") for i in ids]
            blobs = {d.id: rng.bytes(blob_bytes) for d in docs}
            store.upsert(cid, docs, {d.id: _vec(i) for i, d in enumerate(docs)}, blobs)

        write(range(400), "v1")
        store.compact(min_free_pages=0)
        full = store.size_bytes()
        assert full > 400 * blob_bytes

        # Replacing every document (new texts, new blobs; in batches, as clients write) then compacting: the
        # old versions' pages are reused or released, so the store stays the size of one copy, not two.
        for start in range(0, 400, 50):
            write(range(start, start + 50), "v2")
        store.compact(min_free_pages=0)
        assert store.size_bytes() < 1.1 * full
        assert store.free_pages() == 0

        # Deleting 300 of them gives back at least their blobs' bytes, on disk after a checkpoint.
        store.delete(cid, [f"d{i}" for i in range(300)])
        assert store.compact(min_free_pages=10**9) == 0  # under the threshold: nothing done
        released = store.compact(min_free_pages=0)
        assert released * 4096 >= 300 * blob_bytes
        assert store.size_bytes() < full - 300 * blob_bytes
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert path.stat().st_size == store.size_bytes()
        assert store.get_collection("t").token_count == 100
    finally:
        store.close()


def test_a_store_from_before_token_vectors_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from server.storage import sqlite_db as store_module

    path = tmp_path / "old.db"
    old_schema = store_module.SCHEMA.replace(
        "    created_at REAL NOT NULL,\n    token_format TEXT,\n    token_model_id TEXT,\n"
        "    token_count INTEGER NOT NULL DEFAULT 0\n);",
        "    created_at REAL NOT NULL\n);",
    )
    assert "token_format" not in old_schema.split("CREATE TABLE IF NOT EXISTS documents")[0]
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute(
        "INSERT INTO collections (name, embedding_model, embedding_model_id, metric, dims, defaults_json,"
        " created_at) VALUES ('old', 'model', 'model@rev', 'cosine', 4, '{}', 0)"
    )
    conn.commit()
    conn.close()

    store = SqliteStore(path)
    try:
        assert not store.incremental_vacuum  # created without it: the log asks for a one-off VACUUM
        row = store.get_collection("old")
        assert (row.token_format, row.token_model_id, row.token_count, row.tokens_pending) == (
            None,
            None,
            0,
            0,
        )
        _upsert(store, row.id, [Document("a", "alpha")])
        store.set_token_storage(row.id, FORMAT_JSON, "model@rev")
        assert store.get_collection("old").tokens_pending == 1
        assert store.compact(min_free_pages=0) == 0
    finally:
        store.close()
    SqliteStore(path).close()  # a second open finds the columns there
