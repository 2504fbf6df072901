"""What the store's logic needs from a database, whichever it is (SQLite file or PostgreSQL server).

The store (store.py, store_reads.py, store_tokens.py) is written once, in SQL both dialects accept: `?`
placeholders (the PostgreSQL backend turns them into `%s`), `INSERT ... ON CONFLICT`, `RETURNING`. A
backend (sqlite_db.py, postgres_db.py) supplies the connections, the write transactions, the batched reads
of the change log, the schema, and what "space" means for it.

Write transactions: one at a time, each committed before the write is acknowledged; an exception (or
`rollback_on_exit`) rolls the whole transaction back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What the store calls on a connection or a transaction (sqlite3.Connection has it as is)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...


class Transaction:
    """BEGIN ... COMMIT under the database's write lock; ROLLBACK on an exception or `rollback_on_exit`.

    A backend gives `conn` (a Connection) and says how to begin and roll back. `collection_id`: the one
    collection the transaction writes (its documents, tokens, tombstones and row), None for one that makes
    or drops collections: a backend shared by several servers may let writes to different collections
    commit at once (PostgreSQL does), but never two to the same collection."""

    def __init__(self, conn: Connection, lock: threading.Lock, collection_id: int | None = None) -> None:
        self.conn = conn
        self.lock = lock
        self.collection_id = collection_id
        self.rollback_on_exit = False

    def begin(self) -> None:
        raise NotImplementedError

    def lock_collection(self, collection_id: int) -> None:
        """In a transaction begun without a collection: also excludes every write to this one (taken after
        the transaction's own lock, the order every transaction takes them in)."""

    def rollback(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Transaction:
        self.lock.acquire()
        try:
            self.begin()
        except BaseException:
            self.lock.release()
            raise
        return self

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, params: Iterable[Sequence[object]]) -> Any:
        return self.conn.executemany(sql, params)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.rollback_on_exit:
                try:
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.rollback()  # e.g. the disk filled up, or the server went away, while committing
                    raise
            else:
                self.rollback()
        finally:
            self.lock.release()


class Database:
    """The backend a Store stands on (see the module docstring); SqliteDatabase or PostgresDatabase."""

    def _conn(self) -> Connection:
        """This thread's connection (reads outside a transaction see the last committed state)."""
        raise NotImplementedError

    def _transaction(self, collection_id: int | None = None) -> Transaction:
        """A write transaction; `collection_id`: the collection it writes, if only one (see Transaction)."""
        raise NotImplementedError

    def _batches(self, sql: str, params: Sequence[object], size: int) -> Iterator[list[Any]]:
        """The rows of a possibly large query, `size` at a time, without holding them all in memory."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def change_listener(self) -> Any:
        """What wakes this server when another commits to the same database (a ChangeListener); None when
        no other server can write here (an SQLite file is one server's)."""
        return None

    def claim(self, collection_id: int) -> bool:
        """Whether this server does the collection's background work (the token backfill of pending
        documents): always, on a store only it writes; on a shared one, only the server holding the claim
        (one at a time; held until that server stops or loses the database, then the next to ask gets it)."""
        return True

    # -- space (what it means is the backend's) ----------------------------------------------------
    def size_bytes(self) -> int:
        raise NotImplementedError

    def free_pages(self) -> int:
        return 0

    def compact(self, min_free_pages: int = 0) -> int:
        """Gives space freed by deleted rows back to the file system; returns the pages released."""
        return 0


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
