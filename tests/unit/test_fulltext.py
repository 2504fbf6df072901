"""Unit tests of the full-text index (server/storage/fulltext.py): BM25 on tantivy, derived from a real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.storage.fulltext import LANGUAGES, FullTextIndex, analyzer, open_fulltext
from server.storage.records import CollectionRow
from server.storage.store import SqliteStore, Store
from sieve_core.types import Document

ROOT = Path(__file__).resolve().parents[2]
DIMS = 4
TEXTS = {
    "a": "The quick brown fox jumps over the lazy dog",
    "b": "Dogs are running in the park; a dog runs faster than a cat",
    "c": "Cats sleep all day",
    "d": "title: foo AND bar OR baz NOT qux",
    "e": "Protein kinase C phosphorylates the receptor",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = SqliteStore(tmp_path / "sieve.db")
    yield s
    s.close()


def _create(store: Store) -> CollectionRow:
    return store.create_collection("c", "model", "model@rev", "cosine", DIMS, "{}")


def _upsert(store: Store, cid: int, docs: list[Document]) -> tuple[int, list[tuple[int, str]], list[int]]:
    """Write to the store as the engine does; what the full-text index must apply: (generation, added, removed)."""
    vectors = {d.id: np.ones(DIMS, dtype=np.float32) for d in docs}
    outcome = store.upsert(cid, docs, vectors)
    texts = {d.id: d.text for d in docs}
    keys = store.get_documents(cid, list(texts))
    added = [(keys[i].key, texts[i]) for i in texts if any(k == keys[i].key for k, _ in outcome.added)]
    return outcome.generation, added, outcome.removed


def _ids(store: Store, cid: int, keys: np.ndarray) -> list[str]:
    docs = store.documents_by_keys(cid, keys.tolist(), with_text=False)
    return [docs[int(k)].doc_id for k in keys.tolist()]


def _open(store: Store, row: CollectionRow, directory: Path, language: str = "english") -> FullTextIndex:
    row = store.get_collection(row.name)
    return open_fulltext(
        directory,
        language,
        lambda g: store.text_changes_since(row.id, g, batch=2),
        row.generation,
        row.doc_count,
        row.name,
    )


@pytest.fixture
def filled(store: Store, tmp_path: Path) -> Iterator[tuple[Store, CollectionRow, FullTextIndex]]:
    row = _create(store)
    index = _open(store, row, tmp_path / "ft")
    gen, added, removed = _upsert(store, row.id, [Document(i, t, {"n": i}) for i, t in TEXTS.items()])
    index.apply(added, removed, gen)
    yield store, row, index
    index.close()


def test_bm25_ranks_by_term_frequency_and_stems_english(filled) -> None:  # type: ignore[no-untyped-def]
    store, row, index = filled
    keys, scores = index.search("dog running", 10)
    ids = _ids(store, row.id, keys)
    # "b" has dog twice and run twice (running/runs stemmed to "run"); "a" only "dog" once.
    assert ids[:2] == ["b", "a"]
    assert scores[0] > scores[1] > 0
    assert list(scores) == sorted(scores, reverse=True)


def test_stop_words_alone_find_nothing(filled) -> None:  # type: ignore[no-untyped-def]
    _, _, index = filled
    assert index.terms("the and of a") == []
    assert len(index.search("the and of a", 10)[0]) == 0


def test_query_syntax_is_searched_as_words(filled) -> None:  # type: ignore[no-untyped-def]
    store, row, index = filled
    # Query-parser syntax would read `title:` as a field and AND/OR/NOT as operators; here they are words.
    keys, _ = index.search('title:foo AND "baz', 10)
    assert _ids(store, row.id, keys) == ["d"]


def test_filter_keeps_only_the_allowed_keys(filled) -> None:  # type: ignore[no-untyped-def]
    store, row, index = filled
    only_a = store.get_documents(row.id, ["a"])["a"].key
    keys, _ = index.search("dog", 10, allowed=np.array([only_a], dtype=np.uint64))
    assert keys.tolist() == [only_a]
    assert len(index.search("dog", 10, allowed=np.zeros(0, dtype=np.uint64))[0]) == 0


def test_replaced_and_deleted_documents_leave_the_index(filled) -> None:  # type: ignore[no-untyped-def]
    store, row, index = filled
    gen, added, removed = _upsert(store, row.id, [Document("b", "Birds sing", {})])
    assert removed  # the old version's key
    index.apply(added, removed, gen)
    assert _ids(store, row.id, index.search("dog", 10)[0]) == ["a"]
    assert _ids(store, row.id, index.search("birds", 10)[0]) == ["b"]
    gen, keys = store.delete(row.id, ["a"])
    index.apply([], keys, gen)
    assert len(index.search("dog", 10)[0]) == 0
    assert len(index) == len(TEXTS) - 1


@pytest.mark.parametrize(
    ("language", "document", "query"),
    [
        ("english", "the houses", "house"),
        ("dutch", "de huizen", "huis"),
        ("german", "die Häuser", "Haus"),
        ("french", "les chevaux", "cheval"),
        ("spanish", "las casas", "casa"),
    ],
)
def test_each_language_stems_and_drops_its_stop_words(tmp_path: Path, language, document, query) -> None:  # type: ignore[no-untyped-def]
    index = FullTextIndex(tmp_path / language, language)
    index.apply([(1, document)], [], 1)
    assert index.search(query, 10)[0].tolist() == [1]
    stop_word = document.split()[0]
    assert index.terms(stop_word) == []
    index.close()


def test_unknown_language_is_refused() -> None:
    with pytest.raises(ValueError, match="english"):
        analyzer("klingon")
    assert set(LANGUAGES) >= {"english", "dutch", "german", "french", "spanish"}


HOSTILE = [
    "",
    " ",
    '"',
    '"unclosed phrase',
    "title:",
    "text:dog",
    "key:1",
    "AND OR NOT",
    "+dog -cat",
    "dog~2",
    "do*",
    "[a TO z]",
    "{}()[]^~*?:\\/",
    "\x00\x01\x7f",
    "\ud7ff\ue000\ufffd",
    "🐕🐈 dog",
    "𝔡𝔬𝔤",
    "ﷺ" * 50,
    "a" * 10_000,
    "dog " * 2_000,
    "Z̴̧̛a̶l̵g̸o̷ dog",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(filled, query: str) -> None:  # type: ignore[no-untyped-def]
    _, _, index = filled
    keys, scores = index.search(query, 10)
    assert keys.dtype == np.uint64 and len(keys) == len(scores) <= 10


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=200), count=st.integers(min_value=-1, max_value=50))
def test_any_text_is_a_query(filled, query: str, count: int) -> None:  # type: ignore[no-untyped-def]
    store, row, index = filled
    keys, scores = index.search(query, count)
    assert len(keys) == len(scores) <= max(count, 0)
    # Every hit holds one of the query's terms: the words were searched, nothing else.
    terms = set(index.terms(query))
    for doc_id in _ids(store, row.id, keys):
        assert terms & set(index.terms(TEXTS[doc_id]))


def test_restart_catches_up_writes_never_committed(store: Store, tmp_path: Path) -> None:
    row = _create(store)
    index = _open(store, row, tmp_path / "ft")
    gen, added, removed = _upsert(store, row.id, [Document(i, t, {}) for i, t in TEXTS.items()])
    index.apply(added, removed, gen)
    index.close()
    # Writes the store acknowledged while the full-text index missed them (as if the process died first).
    _upsert(store, row.id, [Document("f", "zebras graze on the savanna", {})])
    _upsert(store, row.id, [Document("c", "Cats purr", {})])
    store.delete(row.id, ["a"])
    index = _open(store, row, tmp_path / "ft")
    assert _ids(store, row.id, index.search("zebra", 10)[0]) == ["f"]
    assert _ids(store, row.id, index.search("purr", 10)[0]) == ["c"]
    assert len(index.search("sleep", 10)[0]) == 0  # c's old text
    assert _ids(store, row.id, index.search("dog", 10)[0]) == ["b"]  # a was deleted
    assert len(index) == store.get_collection("c").doc_count
    index.close()


def test_restart_rebuilds_an_index_that_disagrees_with_the_store(
    store: Store, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    row = _create(store)
    index = _open(store, row, tmp_path / "ft")
    gen, added, removed = _upsert(store, row.id, [Document(i, t, {}) for i, t in TEXTS.items()])
    index.apply(added, removed, gen)
    index.close()
    # A delete whose tombstone is gone (pruned after a vector snapshot) cannot be caught up: the count differs.
    gen, _ = store.delete(row.id, ["a"])
    store.prune_tombstones(row.id, gen)
    index = _open(store, row, tmp_path / "ft")
    assert "rebuilding the full-text index" in caplog.text
    assert len(index.search("fox", 10)[0]) == 0
    index.close()
    # Another analyzer than the one the index was built with: rebuilt too.
    caplog.clear()
    index = _open(store, row, tmp_path / "ft", language="german")
    assert "rebuilding the full-text index" in caplog.text
    assert index.language == "german" and len(index) == len(TEXTS) - 1
    index.close()


_CHILD = """
import os, signal, sys
from pathlib import Path
import numpy as np
from server.storage.fulltext import open_fulltext
from server.storage.store import SqliteStore
from sieve_core.types import Document
store = SqliteStore(Path(sys.argv[1]) / "sieve.db")
row = store.create_collection("c", "m", "m@1", "cosine", 4, "{}")
index = open_fulltext(Path(sys.argv[1]) / "ft", "english", lambda g: store.text_changes_since(row.id, g), 0, 0)
for i in range(3):
    doc = Document(f"d{i}", f"acknowledged number{i}", {})
    out = store.upsert(row.id, [doc], {doc.id: np.ones(4, dtype=np.float32)})
    index.apply([(k, doc.text) for k, _ in out.added], out.removed, out.generation)
    if i == 1:
        assert len(index.search("number1", 5)[0]) == 1  # committed by this search
print("acknowledged", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the third write was staged, never committed
"""


def test_acknowledged_write_is_searchable_after_kill_9(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "acknowledged" in proc.stdout
    store = SqliteStore(tmp_path / "sieve.db")
    row = store.get_collection("c")
    index = FullTextIndex(tmp_path / "ft")
    assert index.generation < row.generation  # the last write never reached tantivy's disk
    index.close()
    index = _open(store, row, tmp_path / "ft")
    for i in range(3):
        assert _ids(store, row.id, index.search(f"number{i}", 5)[0]) == [f"d{i}"]
    index.close()
    store.close()
