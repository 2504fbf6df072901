"""What the PostgreSQL store adds to the store's contract (tests/unit/test_store.py runs that on both backends):
several stores over one database, a read-only database, a lost connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import psycopg
import pytest

from server.storage.postgres_db import PostgresStore
from sieve_core.errors import FailedPrecondition, InvalidArgument, Unavailable
from sieve_core.types import Document

DIMS = 4


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url)
    yield s
    s.close()


def test_generations_are_never_reused_by_stores_writing_at_once(pg_url: str, store: PostgresStore) -> None:
    cid = store.create_collection("c", "model", "model@rev", "cosine", DIMS, "{}").id
    others = [PostgresStore(pg_url) for _ in range(2)]  # as if three servers shared the database
    generations: list[int] = []
    keys: list[int] = []
    lock = threading.Lock()

    def write(s: PostgresStore, writer: int) -> None:
        for i in range(15):
            doc = Document(f"w{writer}-{i}", f"text {writer} {i}")
            out = s.upsert(cid, [doc], {doc.id: np.ones(DIMS, dtype=np.float32)})
            with lock:
                generations.append(out.generation)
                keys.extend(k for k, _ in out.added)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate([store, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in others:
        s.close()
    assert sorted(generations) == list(range(1, 46))  # one each, none twice, none skipped
    assert len(set(keys)) == 45
    row = store.get_collection("c")
    assert (row.generation, row.doc_count) == (45, 45)


def test_writes_to_different_collections_commit_side_by_side_and_to_one_collection_in_turn(
    pg_url: str, store: PostgresStore
) -> None:
    """Two servers' stores: while one holds a write transaction on collection A open, the other commits to
    B at once, but its write to A, and the drop of A, wait for it."""
    a = store.create_collection("a", "model", "model@rev", "cosine", DIMS, "{}").id
    b = store.create_collection("b", "model", "model@rev", "cosine", DIMS, "{}").id
    other = PostgresStore(pg_url)
    vector = {"x": np.ones(DIMS, dtype=np.float32)}
    held, release = threading.Event(), threading.Event()

    def hold_a() -> None:
        with store._transaction(a) as tx:
            tx.execute("UPDATE collections SET doc_count = doc_count WHERE id = ?", (a,))
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_a)
    holder.start()
    try:
        assert held.wait(10)
        done = threading.Event()
        threading.Thread(
            target=lambda: (other.upsert(b, [Document("x", "to b")], vector), done.set())
        ).start()
        assert done.wait(10), "a write to collection b waited for a transaction on collection a"
        waiting: dict[str, object] = {}
        to_a = threading.Thread(
            target=lambda: waiting.update(a=other.upsert(a, [Document("x", "to a")], vector))
        )
        to_a.start()
        to_a.join(0.5)
        assert to_a.is_alive(), "a write to collection a did not wait for the open transaction on it"
    finally:
        release.set()
        holder.join()
    to_a.join(10)
    assert not to_a.is_alive() and waiting["a"].generation == 1  # type: ignore[attr-defined]
    # Dropping a collection waits for a write to it in progress on another server.
    held.clear()
    release.clear()
    holder = threading.Thread(target=hold_a)
    holder.start()
    assert held.wait(10)
    dropped = threading.Thread(target=other.delete_collection, args=("a",))
    dropped.start()
    dropped.join(0.5)
    alive = dropped.is_alive()
    release.set()
    holder.join()
    dropped.join(10)
    other.close()
    assert alive, "dropping collection a did not wait for the open write to it"
    assert {c.name for c in store.list_collections()} == {"b"}


def test_one_server_at_a_time_holds_a_collections_background_work(pg_url: str, store: PostgresStore) -> None:
    """Database.claim: the token backfill of a collection runs on one of the servers sharing the store; when
    that one stops, the next to ask takes it over."""
    other = PostgresStore(pg_url)
    assert store.claim(1) and store.claim(1), "the holder lost its claim"
    assert not other.claim(1), "two servers hold the same collection's claim"
    assert other.claim(2) and not store.claim(2)  # claims are per collection
    store.close()  # the holder stops
    assert other.claim(1)
    other.close()


def test_a_metadata_value_too_long_for_an_index_entry_is_invalid_and_writes_nothing(
    store: PostgresStore,
) -> None:
    cid = store.create_collection("c", "model", "model@rev", "cosine", DIMS, "{}").id
    value = "".join(chr(0x1F300 + i % 700) for i in range(2048))  # 2,048 characters, 8 KB of UTF-8
    docs = [Document("ok", "fine"), Document("long", "alpha", {"k": value})]
    vectors = {d.id: np.ones(DIMS, dtype=np.float32) for d in docs}
    with pytest.raises(InvalidArgument, match="too long"):
        store.upsert(cid, docs, vectors)
    assert store.get_documents(cid, ["ok", "long"]) == {}
    assert store.get_collection("c").generation == 0
    store.upsert(cid, docs[:1], vectors)  # the store is usable after the refusal
    assert set(store.get_documents(cid, ["ok"])) == {"ok"}


def test_a_read_only_database_is_refused(pg_url: str) -> None:
    name = urlsplit(pg_url).path.lstrip("/")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with pytest.raises(FailedPrecondition, match="read-only"):
        PostgresStore(pg_url)


def test_a_lost_connection_is_unavailable_and_the_next_call_reconnects(
    pg_url: str, store: PostgresStore
) -> None:
    store.create_collection("c", "model", "model@rev", "cosine", DIMS, "{}")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(Unavailable):
        store.get_collection("c")
    assert store.get_collection("c").name == "c"
