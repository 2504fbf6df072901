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
