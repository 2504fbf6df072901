"""The one typed settings object. Environment variables use the prefix SIEVE_ (e.g. SIEVE_DATA_DIR).

Nothing else in the project reads os.environ: tests and tools build a `Settings(...)` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Metric = Literal["cosine", "ip", "l2"]


class _Places(BaseSettings):
    """Where things live."""

    data_dir: Path = Field(Path("data"), description="Document store, index snapshots and job state.")
    store_url: SecretStr | None = Field(
        None,
        description="PostgreSQL for the document store (postgresql://user:password@host/db, psycopg 3: "
        "the `pg` extra); unset: an SQLite file in SIEVE_DATA_DIR. Index snapshots and job state stay in "
        "SIEVE_DATA_DIR either way.",
    )
    models_dir: Path = Field(Path("models"), description="Model bundles (one folder per model).")
    grpc_address: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on.")
    redis_url: SecretStr | None = Field(
        None, description="Redis for the Celery broker and cache; unset: `make run` starts a local one."
    )
    local_redis_port: int = Field(
        6390,
        ge=1,
        le=65535,
        description="Port of the Redis that `sieve run` starts when SIEVE_REDIS_URL is unset.",
    )
    run_worker_queues: str = Field(
        "embed,colbert",
        description="Worker queues `sieve run` starts, one Celery worker each (plus cross_encoder when "
        "SIEVE_CROSS_ENCODER_MODEL is set).",
    )
    run_worker_concurrency: int = Field(1, ge=1, description="Pool processes per worker `sieve run` starts.")
    run_state_file: Path | None = Field(
        None,
        description="Where `sieve run` records its children's restarts for the server's metrics "
        "(`sieve_run_restarts_total`); `sieve run` sets it for the server it starts (default: "
        "DATA_DIR/run/state.json). Unset for a bare `sieve serve`: no such series.",
    )


class _Models(BaseSettings):
    """Models and collections."""

    default_embedding_model: str = Field(
        "all-MiniLM-L6-v2", description="Bi-encoder bundle for new collections."
    )
    default_metric: Metric = Field("cosine", description="Metric of new collections: cosine, ip or l2.")
    late_interaction_model: str | None = Field(
        None,
        description="Bundle for the late-interaction stage: a `colbert` bundle, or unset to use MaxSim over "
        "the collection's own bi-encoder token vectors (zero-shot).",
    )
    cross_encoder_model: str | None = Field(
        None,
        description="`cross_encoder` bundle for the last stage; unset: asking for that stage is refused "
        "(REQUIRED) or reported degraded (BEST_EFFORT).",
    )
    embed_batch_size: int = Field(32, ge=1, le=1024, description="Texts per ONNX run when embedding.")
    onnx_threads: int = Field(0, ge=0, description="Intra-op threads per ONNX session; 0: one per core.")
    onnx_spin: bool = Field(
        False,
        description="Let idle ONNX threads busy-wait (lower latency on a dedicated machine, "
        "but they take cores from everything else).",
    )
    executor_threads: int = Field(4, ge=1, description="Threads for blocking work (ONNX, usearch, SQLite).")


class _Index(BaseSettings):
    """Index."""

    hnsw_connectivity: int = Field(
        32, ge=4, le=128, description="HNSW M (chosen with bench/ann_tune.py); a snapshot keeps its own."
    )
    index_storage: Literal["f16", "i8", "f32"] = Field(
        "i8",
        description="Vector index scalar type: i8 (cosine collections: int8 under the cosine kernel, each vector "
        "scaled to use the full int8 range; ip and l2 collections fall back to f16 and f32), f16 (cosine as inner "
        "product on normalised f16 vectors), f32. A snapshot of another format is rebuilt from the store on "
        "start. Measured: bench/ann_tune.py.",
    )
    hnsw_ef_construction: int = Field(200, ge=8, le=4096, description="HNSW ef at insertion time.")
    default_ef_search: int = Field(128, ge=1, le=4096, description="HNSW ef at search time.")
    default_rrf_k: int = Field(
        60,
        ge=1,
        le=100_000,
        description="Reciprocal rank fusion's k for hybrid retrieval (requests may set it).",
    )
    exact_filter_max: int = Field(
        20_000,
        ge=0,
        description="A filtered search whose filter matches at most this many documents "
        "scores them all exactly instead of walking the HNSW graph.",
    )
    full_scan_max: int = Field(
        1000,
        ge=0,
        description="A collection of at most this many documents is searched exactly (a full scan is "
        "cheaper than an HNSW walk there, and exact).",
    )
    snapshot_every_writes: int = Field(
        5_000,
        ge=1,
        description="Snapshot a collection's index after this many changed documents...",
    )
    snapshot_growth: float = Field(
        0.1,
        ge=0,
        le=10,
        description="...or this fraction of the index's size, if that is more (a snapshot rewrites the whole "
        "index: at a fixed count its cost per write grows with the index). 0: the count alone.",
    )
    snapshot_interval_s: float = Field(
        60.0,
        gt=0,
        description="...or this many seconds after a write (or 9x as long as the last snapshot took, if more).",
    )


class _SearchDefaults(BaseSettings):
    """Search defaults."""

    rerank_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Longest a re-ranking stage waits for its worker (less if the deadline is nearer).",
    )
    cache_ttl_s: int = Field(
        3600,
        ge=1,
        description="Lifetime of cached query vectors and re-rank scores in Redis (their keys name the "
        "model revision, and scores also the collection generation, so a write never serves stale ones).",
    )
    local_redis_maxmemory: str = Field(
        "1gb",
        description="maxmemory of the Redis that `sieve run` starts (policy volatile-lru: only cache "
        "entries, which have a TTL, are evicted; never the Celery queues).",
    )
    default_top_k: int = Field(10, ge=1, description="Hits per search when the request says 0.")
    default_retrieve_candidates: int = Field(
        100,
        ge=1,
        description="Candidates retrieval hands to re-ranking when neither request nor collection says.",
    )


class _Limits(BaseSettings):
    """Limits: requests beyond them get INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for message size)."""

    max_top_k: int = Field(1000, ge=1, description="Largest top_k a search may ask for.")
    max_retrieve_candidates: int = Field(2000, ge=1, description="Largest retrieve_candidates.")
    max_query_chars: int = Field(4096, ge=1, description="Longest query text.")
    max_batch_documents: int = Field(1000, ge=1, description="Documents per UpsertDocuments call.")
    max_text_chars: int = Field(65_536, ge=1, description="Longest document text.")
    max_id_chars: int = Field(256, ge=1, description="Longest document id.")
    max_metadata_entries: int = Field(64, ge=0, description="Metadata entries per document.")
    max_metadata_key_chars: int = Field(128, ge=1, description="Longest metadata key.")
    max_metadata_value_chars: int = Field(2048, ge=1, description="Longest metadata value.")
    max_filter_conditions: int = Field(16, ge=1, description="Conditions per search filter.")
    max_get_ids: int = Field(1000, ge=1, description="Ids per GetDocuments / DeleteDocuments call.")
    max_collections: int = Field(1000, ge=1, description="Collections one server holds.")
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted.")


class _Jobs(BaseSettings):
    """Index jobs (bulk loading, server/jobs/manager.py) and read-your-writes."""

    job_batch_size: int = Field(
        64,
        ge=1,
        le=1000,
        description="Documents per embedding task of an index job (jobs may ask for another).",
    )
    job_max_inflight_batches: int = Field(
        4,
        ge=1,
        le=256,
        description="Batches of one job sent to workers and not yet committed (backpressure); "
        "keep it above the number of embed worker processes so that none idles.",
    )
    job_max_concurrent: int = Field(
        2, ge=1, description="Jobs running at once; jobs on one collection always run one at a time."
    )
    job_batch_timeout_s: float = Field(
        330.0,
        gt=0,
        description="A batch a worker started and has not answered for this long is sent again "
        "(above the embed task's hard time limit, so a slow but healthy task is not run twice).",
    )
    job_batch_retries: int = Field(
        2,
        ge=0,
        description="Times a batch is sent again after a timeout or a worker failure; then the job fails.",
    )
    job_worker_wait_s: float = Field(
        10.0, gt=0, description="A batch no worker has taken for this long makes the job report why it waits."
    )
    job_worker_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A job fails when no worker consumes the embed queue (or Redis is unreachable) this long.",
    )
    job_max_errors: int = Field(
        10_000, ge=0, description="Bad lines a job records; one more and the job stops as failed."
    )
    job_max_line_bytes: int = Field(
        1 << 20, ge=1024, description="Longest line of a job's source; a longer one is recorded as an error."
    )
    job_max_upload_bytes: int = Field(
        8 << 30,
        ge=1,
        description="Largest UploadIndexJob (written to the data directory before the job starts).",
    )
    job_orphan_after_s: float = Field(
        3600.0,
        ge=0,
        description="PostgreSQL store: another server's unfinished jobs are marked FAILED once it has been gone "
        "this long (a job runs only on the server that started it); 0: never.",
    )
    job_source_dirs: str = Field(
        "",
        description="Comma-separated directories StartIndexJob may read files from; empty: any absolute path "
        "the server can read.",
    )
    min_generation_wait_s: float = Field(
        2.0,
        ge=0,
        description="Longest a Search with min_generation waits for the collection to reach it "
        "(less if the deadline is nearer), then FAILED_PRECONDITION.",
    )


class _Security(BaseSettings):
    """Security: API keys, TLS on the gRPC port, TLS to Redis (the Redis password goes in SIEVE_REDIS_URL)."""

    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated `KEY:ROLE` pairs, ROLE one of read, write, admin (each includes the "
        "ones before it); clients send `authorization: Bearer KEY`. Unset (and no SIEVE_API_KEYS_FILE): "
        "no authentication.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of `KEY:ROLE` lines (`#` comments), read at start-up, added to SIEVE_API_KEYS.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain for the gRPC port; set with SIEVE_TLS_KEY_FILE to serve TLS."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of SIEVE_TLS_CERT_FILE.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle that verifies Redis's certificate (with a `rediss://` SIEVE_REDIS_URL)."
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="Client certificate for Redis servers that require one (`tls-auth-clients yes`)."
    )
    redis_tls_key_file: Path | None = Field(None, description="Private key of SIEVE_REDIS_TLS_CERT_FILE.")
    redis_sentinels: str = Field(
        "",
        description="Comma-separated host:port of Redis Sentinels. Set: SIEVE_REDIS_URL's host is the name of "
        "the primary they watch (`redis://:PASSWORD@MASTER/0`, no port) and every connection (Celery broker, "
        "result backend, caches) asks them for the current primary, following a failover.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="Password of the Sentinels themselves (their `requirepass`), if they have one; the "
        "primary's password stays in SIEVE_REDIS_URL.",
    )


class _Operations(BaseSettings):
    """Load and operations."""

    max_inflight_requests: int = Field(
        64,
        ge=0,
        description="Calls the server works on at once (health and reflection excepted); past it a call gets "
        "RESOURCE_EXHAUSTED with a RetryInfo. 0: no limit.",
    )
    overload_retry_after_ms: int = Field(
        100, ge=1, description="The retry delay RESOURCE_EXHAUSTED refusals suggest (google.rpc.RetryInfo)."
    )
    metrics_address: str = Field(
        "127.0.0.1:9464",
        description="host:port of the Prometheus metrics endpoint (`/metrics`); empty: no endpoint.",
    )
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM/SIGINT, how long in-flight calls may finish before they are cancelled.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (with the request id), for log collectors."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class Settings(_Operations, _Security, _Jobs, _Limits, _SearchDefaults, _Index, _Models, _Places):
    """All settings (the groups above; fields keep their order: the first group's come first)."""

    model_config = SettingsConfigDict(env_prefix="SIEVE_", env_file=None, extra="ignore", frozen=True)

    @field_validator("late_interaction_model", "cross_encoder_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `SIEVE_CROSS_ENCODER_MODEL=` (e.g. from compose's ${VAR:-}) means "none", not a bundle named "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("grpc_address", "metrics_address")
    @classmethod
    def _has_port(cls, value: str, info: Any) -> str:
        if info.field_name == "metrics_address" and not value.strip():
            return ""
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_and_master(cls, value: str, info: Any) -> str:
        # A field validator (not a model one), so that an error shows this value and never the Redis URL.
        if not sentinel_addresses(value):  # raises on a malformed entry, at start-up rather than first use
            return value
        url = info.data.get("redis_url")
        parts = urlsplit(url.get_secret_value()) if url is not None else None
        if parts is None or not parts.hostname or parts.port is not None:
            raise ValueError(
                "with SIEVE_REDIS_SENTINELS, SIEVE_REDIS_URL names the primary the Sentinels watch, without "
                "a port: redis://[:PASSWORD@]MASTER_NAME/DB"
            )
        return value

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data, safe to log: secrets and URL passwords are masked."""
        out = self.model_dump(mode="json")
        if self.redis_url is not None:
            out["redis_url"] = redact_url(self.redis_url.get_secret_value())
        if self.store_url is not None:
            out["store_url"] = redact_url(self.store_url.get_secret_value())
        return out


def redact_url(url: str) -> str:
    """`redis://user:pw@host:6379/0` -> `redis://user:***@host:6379/0`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username}:***" if parts.username else ":***"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """`"h1:26379, h2:26379"` -> [("h1", 26379), ("h2", 26379)] (SIEVE_REDIS_SENTINELS); ValueError if malformed."""
    addresses = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"SIEVE_REDIS_SENTINELS: expected host:port entries, got {entry!r}")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from an environment (default: the process's), with explicit overrides on top."""
    env = dict(os.environ if environ is None else environ)
    values = {
        name: env[f"SIEVE_{name.upper()}"] for name in Settings.model_fields if f"SIEVE_{name.upper()}" in env
    }
    values.update(overrides)
    # Build from the explicit mapping only, so an injected environment really replaces os.environ.
    return _SettingsFromMapping.model_validate(values)


class _SettingsFromMapping(Settings):
    """Settings that take values only from constructor arguments (no process environment)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):
        return (init_settings,)
