"""The vector index of one collection: a usearch HNSW graph derived from the document store.

Layouts (chosen with bench/ann_tune.py, see the README's vector-index section). A cosine collection's vectors
sit by default (storage "i8") as int8 under usearch's cosine kernel, each vector scaled so that its largest
component is 127 and rounded here (`quantise`): usearch's own cast of floats maps the unit vector to
[-127, 127], which leaves a normalised 384-d vector's components (~0.05) about 3 bits. The search is bound by
fetching vectors (same distance count as FAISS, more time per distance): a quarter of f32's bytes per vector.
Storage "f16" keeps them L2-normalised in f16 under inner product (the same ranking as cosine, exact up to f16
rounding), "f32" the same in f32. Inner-product collections (unnormalised vectors) use f16 unless f32 is asked;
l2 keeps f32.

Searches share a read lock; adds, removes and ef changes take the write lock. Snapshots are written
to `index-<generation>.usearch` with an atomic rename, so the newest complete file names the store
generation it contains; on start the newest snapshot is loaded and caught up from the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# onnxruntime must be loaded before usearch's extension module: in the other order the process
# segfaults inside onnxruntime's import (usearch 2.26.6 + onnxruntime 1.31.1 on x86_64 Linux; see
# tests/unit/test_import_order.py). Every process that embeds also searches, so load it here, first.
import onnxruntime  # noqa: F401, I001  (import order matters, see above)
from usearch.index import Index, MetricKind  # noqa: I001

log = logging.getLogger(__name__)

_SNAPSHOT_PREFIX, _SNAPSHOT_SUFFIX = "index-", ".usearch"
STORAGES = ("f16", "i8", "f32")
DEFAULT_STORAGE = "i8"  # sieve_core.config's default (SIEVE_INDEX_STORAGE); chosen by bench/ann_tune.py
I8_PEAK = 127  # the largest component of every (non-zero) vector this module stores as int8


@dataclass(frozen=True)
class Layout:
    """How a collection's vectors sit in usearch: its metric kind, scalar type, and the transform applied to
    vectors and queries on the way in. A snapshot's file header records the first two (its format)."""

    kind: MetricKind
    dtype: str
    transform: str  # "none", "normalise" (cosine as inner product), "quantise" (i8 under the cosine kernel)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.transform == "none":
            return x
        if self.transform == "normalise":
            return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))
        return quantise(x)

    def describe(self) -> str:
        return f"{self.kind.name.lower()} {self.dtype}"


def quantise(x: np.ndarray) -> np.ndarray:
    """int8 vectors for the cosine kernel: each scaled so that its largest component is 127, then rounded. Given
    float input usearch would quantise by 127 x the unit vector instead, which leaves a normalised 384-d vector's
    components (~0.05) about 3 bits; given int8 it stores them as they are."""
    peak = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-30)
    return np.ascontiguousarray(np.rint(x * (I8_PEAK / peak)), dtype=np.int8)


def layout(metric: str, storage: str = DEFAULT_STORAGE) -> Layout:
    """The index layout of a collection with this metric when `storage` is asked for (see the docstring)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown index storage {storage!r}; one of {', '.join(STORAGES)}")
    if metric == "cosine":
        if storage == "i8":
            return Layout(MetricKind.Cos, "i8", "quantise")
        return Layout(MetricKind.IP, storage, "normalise")
    if metric == "ip":
        return Layout(MetricKind.IP, "f32" if storage == "f32" else "f16", "none")
    return Layout(MetricKind.L2sq, "f32", "none")


class RWLock:
    """Many readers or one writer. Writers wait for readers to drain; new readers wait for a writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def scores_from_distances(metric: str, distances: np.ndarray) -> np.ndarray:
    """usearch distances -> scores where higher is better (cosine and ip: similarity; l2: -distance)."""
    d = distances.astype(np.float64)
    return -d if metric == "l2" else 1.0 - d


def exact_scores(metric: str, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The same scores as the index would give, computed exactly."""
    q = query.astype(np.float32)
    if metric == "l2":
        diff = vectors - q
        return -np.einsum("ij,ij->i", diff, diff).astype(np.float64)
    dots = vectors @ q
    if metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1) * max(float(np.linalg.norm(q)), 1e-12)
        dots = dots / np.maximum(norms, 1e-12)
    return dots.astype(np.float64)


class VectorIndex:
    def __init__(
        self,
        dims: int,
        metric: str,
        *,
        connectivity: int = 16,
        ef_construction: int = 128,
        ef_search: int = 128,
        storage: str = DEFAULT_STORAGE,
        index: Index | None = None,
    ) -> None:
        self.dims = dims
        self.metric = metric
        self.default_ef = ef_search
        self.layout = layout(metric, storage)
        self._index = index or Index(
            ndim=dims,
            metric=self.layout.kind,
            dtype=self.layout.dtype,
            connectivity=connectivity,
            expansion_add=ef_construction,
            expansion_search=ef_search,
        )
        self._index.expansion_search = ef_search  # type: ignore[misc]  # usearch has a setter; its stub hides it
        self._lock = RWLock()

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: np.ndarray, vectors: np.ndarray, threads: int = 0) -> None:
        """Adds (or replaces) vectors; `threads`: usearch's workers for this call (0: all cores)."""
        if len(keys) == 0:
            return
        with self._lock.write():
            # A key can already be present when catching up a snapshot written mid-way; replace it.
            present = np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)
            if present.any():
                self._index.remove(keys[present])
            self._index.add(keys, self.layout.prepare(vectors), threads=threads)

    def remove(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        with self._lock.write():
            self._index.remove(keys)

    def search(self, query: np.ndarray, count: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top `count`: (keys uint64, scores float64), best first."""
        if len(self._index) == 0 or count <= 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0)
        query = self.layout.prepare(query)
        if ef is not None and ef != self.default_ef:
            # usearch's Python API sets ef on the index, not per call: change it alone, then restore.
            with self._lock.write():
                self._index.expansion_search = ef  # type: ignore[misc]  # (see __init__)
                try:
                    matches = self._index.search(query, count)
                finally:
                    self._index.expansion_search = self.default_ef  # type: ignore[misc]
        else:
            with self._lock.read():
                matches = self._index.search(query, count)
        return np.asarray(matches.keys, dtype=np.uint64), scores_from_distances(
            self.metric, matches.distances
        )

    def search_exact(self, query: np.ndarray, keys: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `count` among `keys` (e.g. the documents a filter matches)."""
        if len(keys) == 0 or count <= 0:
            return np.zeros(0, dtype=np.uint64), np.zeros(0)
        with self._lock.read():
            # An array, or a tuple with None for absent keys; dequantised to f32 (as stored: normalised or scaled,
            # which the cosine of exact_scores undoes).
            found: Any = self._index.get(keys, dtype="f32")
        if isinstance(found, np.ndarray):
            vectors = found.astype(np.float32, copy=False).reshape(len(keys), self.dims)
        else:
            # Some keys are not in the index yet (committed to the store, index update in flight): skip them.
            present = np.array([v is not None for v in found], dtype=bool)
            keys = keys[present]
            if len(keys) == 0:
                return np.zeros(0, dtype=np.uint64), np.zeros(0)
            vectors = np.stack([v for v in found if v is not None]).astype(np.float32, copy=False)
        scores = exact_scores(self.metric, query, vectors)
        count = min(count, len(keys))
        top = np.argpartition(-scores, count - 1)[:count]
        top = top[np.argsort(-scores[top], kind="stable")]
        return keys[top], scores[top]

    def search_batch(self, queries: np.ndarray, count: int, threads: int = 0) -> np.ndarray:
        """Keys (uint64, n x count) of the approximate top `count` of each query, at the default ef (bench)."""
        with self._lock.read():
            found = self._index.search(self.layout.prepare(queries), count, threads=threads)
        return np.asarray(found.keys, dtype=np.uint64)

    def memory_bytes(self) -> int:
        """What the index's serialised form takes (vectors and graph): its size in memory, without slack."""
        return int(self._index.serialized_length)

    def search_all(self, query: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `count` over every vector: for a small index a full scan costs less than a graph walk
        and, unlike one, cannot miss a node that removals left poorly connected."""
        with self._lock.read():
            keys = np.asarray(self._index.keys, dtype=np.uint64)
        return self.search_exact(query, keys, count)

    # -- snapshots -----------------------------------------------------------------------------
    def save(self, directory: Path, generation: int) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".{_SNAPSHOT_PREFIX}*.tmp"):  # a save cut short by kill -9
            stale.unlink(missing_ok=True)
        tmp = directory / f".{_SNAPSHOT_PREFIX}{generation:012d}.tmp"
        try:
            with self._lock.read():
                self._index.save(str(tmp))  # RuntimeError("Failed to serialize ...") on a full disk
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            # The name carries the content's digest: a snapshot damaged later is detected before it is loaded.
            final = directory / f"{_SNAPSHOT_PREFIX}{generation:012d}-{_digest(tmp)}{_SNAPSHOT_SUFFIX}"
            os.replace(tmp, final)
        except BaseException:
            # Never leave a partial file behind (on a full disk it would hold the space the next try needs);
            # the previous snapshot is untouched until a new one is complete.
            with suppress(OSError):  # e.g. a read-only file system, where nothing was written either
                tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        for old in snapshot_files(directory):
            if old != final:
                old.unlink(missing_ok=True)
        return final

    @classmethod
    def load_latest(
        cls, directory: Path, dims: int, metric: str, *, ef_search: int = 128, storage: str = DEFAULT_STORAGE
    ) -> tuple[VectorIndex, int] | None:
        """The newest snapshot in `directory` and its generation, or None if there is none usable (then the
        caller rebuilds from the store). A snapshot in another format than `storage` asks for (e.g. one from
        before f16, cosine f32) is not usable: rebuilt, and the log says so."""
        want = layout(metric, storage)
        for path in reversed(snapshot_files(directory)):
            generation, digest = _parse_name(path)
            if _digest(path) != digest:
                log.warning("index snapshot %s does not match its checksum; ignoring it", path)
                continue
            try:
                index = Index.restore(str(path))
            except Exception:  # a damaged snapshot is only a cache: fall back to an older one or a rebuild
                log.warning("cannot load index snapshot %s; ignoring it", path, exc_info=True)
                continue
            if index is None or index.ndim != dims:
                log.warning("index snapshot %s does not match the collection; ignoring it", path)
                continue
            kind, dtype = index.metric, index.dtype.name.lower()
            found = f"{getattr(kind, 'name', kind)!s} {dtype}".lower()
            if (
                (kind, dtype) == (want.kind, want.dtype)
                and want.transform == "quantise"
                and not _full_scale(index)
            ):
                found += " quantised by usearch"  # the i8 layout before vectors were scaled to full range
            if found != want.describe():
                log.warning(
                    "index snapshot %s is in format %s, the collection's index is %s: rebuilding it from the store",
                    path,
                    found,
                    want.describe(),
                )
                return None
            return cls(dims, metric, ef_search=ef_search, storage=storage, index=index), generation
        return None


def _full_scale(index: Index, sample: int = 256) -> bool:
    """Whether an i8 index's vectors were quantised by `quantise` (every non-zero one peaks at +-127). usearch's own
    quantisation (127 x the unit vector) reaches 127 only on a vector along an axis: one sampled vector below
    full scale tells the two apart."""
    keys = np.asarray(index.keys[: min(sample, len(index))], dtype=np.uint64)
    if len(keys) == 0:
        return True
    vectors = np.asarray(index.get(keys, dtype="i8"), dtype=np.int32).reshape(len(keys), -1)
    peaks = np.abs(vectors).max(axis=1)
    return bool(np.all((peaks == I8_PEAK) | (peaks == 0)))


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _parse_name(path: Path) -> tuple[int, str]:
    generation, _, digest = path.name[len(_SNAPSHOT_PREFIX) : -len(_SNAPSHOT_SUFFIX)].partition("-")
    return int(generation), digest


def snapshot_generation(path: Path) -> int:
    """The store generation a snapshot file contains (from its name)."""
    return _parse_name(path)[0]


def snapshot_files(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(_SNAPSHOT_PREFIX) and p.name.endswith(_SNAPSHOT_SUFFIX)
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
