"""Several servers over one database: each follows the writes the others commit.

Every server accepts writes and keeps its own derived indexes (vectors, full text). The database's change log
is the collections' generations with the documents and tombstones written at each (server/storage/store.py):
a server whose index shows generation G catches up by applying what was written after G, as at start.
PostgreSQL announces each commit that changes a collection (LISTEN/NOTIFY, server/storage/postgres_db.py);
the Follower's thread waits for those, and every POLL_S seconds anyway (a notification sent while it was not
connected is lost, so polling is the safety net), then has the writer thread bring the collections in step:
catch up their indexes, load the collections other servers created, drop the ones they deleted. Read your
writes across servers: `min_generation` waits for this (Writes.wait_for_generation).

A store no other server can write (the SQLite file) has no listener: no Follower runs.
"""

from __future__ import annotations

import logging
import threading

from server.core.collections import Collections
from server.core.executors import Executors
from server.storage.store import Store
from sieve_core.errors import SieveError

log = logging.getLogger(__name__)

# Seconds between catch-ups when no notification came: the bound on how stale a missed one leaves a server.
POLL_S = 1.0


class Follower:
    """Wakes on the database's change notifications (or every POLL_S) and catches the collections up."""

    def __init__(
        self, store: Store, collections: Collections, run: Executors, poll_s: float = POLL_S
    ) -> None:
        self._store = store
        self._collections = collections
        self._run = run
        self._poll_s = poll_s
        self._listener = store.change_listener()
        self._stop = threading.Event()
        self._queued = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._listener is None:
            return
        self._thread = threading.Thread(target=self._listen, name="sieve-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_s + 5)
            self._listener.close()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._listener.wait(self._poll_s)
            except SieveError as exc:  # the database is unreachable: wait, then try again
                log.warning("change notifications: %s", exc.message)
                self._stop.wait(self._poll_s)
            if not self._stop.is_set() and not self._queued.is_set():
                self._queued.set()  # one catch-up queued at a time: it takes in everything committed so far
                self._run.writer.submit(self._sync)

    def _sync(self) -> None:
        """On the writer thread: bring every collection in step with the store."""
        self._queued.clear()
        try:
            self._collections.sync(self._store.list_collections())
        except Exception:
            log.warning(
                "catching up with other servers' writes failed; retrying at the next wake", exc_info=True
            )
