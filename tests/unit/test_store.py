"""Unit tests of the durable document store (server/storage/store.py) on a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.storage.store import CollectionRow, Store
from sieve_core.errors import AlreadyExists, NotFound
from sieve_core.types import Condition, Document

DIMS = 4


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "sieve.db")
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


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sieve.db"
    store = Store(path)
    cid = _create(store, "keep").id
    _, vectors = _upsert(store, cid, [Document("a", "alpha", {"m": "1"}), Document("b", "beta")])
    store.delete(cid, ["b"])
    row = store.get_collection("keep")
    live = _live(store, cid)
    store.close()

    reopened = Store(path)
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
