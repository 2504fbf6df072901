"""The store the settings name: PostgreSQL at SIEVE_STORE_URL, else the SQLite file in the data directory."""

from __future__ import annotations

from server.storage.store import SqliteStore, Store
from sieve_core.config import Settings


def open_store(settings: Settings) -> Store:
    if settings.store_url is None:
        return SqliteStore(settings.data_dir / "sieve.db")
    from server.storage.postgres_db import PostgresStore  # psycopg is needed only when it is asked for

    return PostgresStore(settings.store_url.get_secret_value())
