"""The full-text index of one collection: BM25 over the documents' texts, on tantivy, derived from the store.

Like the vector index it holds only what the store can give back: each stored version of a document (its
integer `key`, whose text never changes) is one tantivy document with that key and its analysed text.
Metadata stays in the store: a filter becomes the set of keys the store says match, intersected here.

Every applied write is committed to tantivy (at the latest by the next search) and then recorded in `fulltext/state.json` (the store generation
the index contains, its format and its analyzer). On start the index is caught up from the store's changes
after that generation; a commit that died with the process is simply re-applied (adding a key removes it
first, so re-applying is harmless). An index whose state is missing, of another format or analyzer, or whose
document count disagrees with the store after the catch-up is rebuilt from the store, and the log says why.

Queries are text, never query syntax: the text goes through the collection's analyzer and the resulting
terms are OR-ed as term queries built here (tantivy's query parser is never used), so quotes, operators,
field names and odd Unicode are searched as words or dropped by the analyzer, and never raise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tantivy

from server.storage.records import TextChanges

log = logging.getLogger(__name__)

# Analyzer languages offered at collection creation (tantivy's Snowball stemmers and stop word lists).
LANGUAGES = ("english", "dutch", "german", "french", "spanish")
DEFAULT_LANGUAGE = "english"
FORMAT = 1  # bump when the schema or the analysis changes: an index of another format is rebuilt
_STATE = "state.json"
_ANALYZER = "sieve"
_MAX_TOKEN_CHARS = 40  # longer "words" (base64, hashes, URLs run together) only bloat the term dictionary
_MAX_QUERY_TERMS = 512  # distinct terms per query: bounds the cost of a pasted document used as a query
_COMMIT_EVERY = 64  # staged writes before a commit even when no search asks for one
_WRITER_HEAP = 32_000_000  # bytes; tantivy flushes a segment when its writer's heap fills


def analyzer(language: str) -> tantivy.TextAnalyzer:
    """Words (Unicode letters and digits) -> lowercase -> stop words removed -> Snowball stems."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown analyzer language {language!r}; one of {', '.join(LANGUAGES)}")
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(_MAX_TOKEN_CHARS))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stopword(language))
        .filter(tantivy.Filter.stemmer(language))
        .build()
    )


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # indexed: deletes by key and filters as a key set; fast: hits' keys without loading stored documents.
    builder.add_unsigned_field("key", indexed=True, fast=True)
    # Term frequencies are all BM25 needs; positions (phrases) would double the index for no use here.
    builder.add_text_field("text", tokenizer_name=_ANALYZER, index_option="freq")
    return builder.build()


# The store's change feed: changes_since(generation) -> batches of TextChanges (generation 0: everything).
ChangesSince = Callable[[int], Iterator[TextChanges]]


class FullTextIndex:
    """One collection's BM25 index. Writes (apply, rebuild) come from one thread at a time; searches from any."""

    def __init__(self, directory: Path | None, language: str = DEFAULT_LANGUAGE) -> None:
        """Open the index in `directory` (created if absent; None: in memory, for tests)."""
        self.directory = directory
        self.language = language
        self._analyzer = analyzer(language)
        self._schema = _schema()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self._index = tantivy.Index(self._schema, path=None if directory is None else str(directory))
        self._index.register_tokenizer(_ANALYZER, self._analyzer)
        # Searches see what the last apply() committed, as soon as it returns (not a reload "soon after").
        self._index.config_reader("Manual")
        self._index.reload()
        self._writer = self._index.writer(_WRITER_HEAP, 1)
        self._write_lock = threading.Lock()
        self._pending: int | None = None  # the generation staged but not yet committed
        self._pending_ops = 0
        self.generation = self._read_state()  # the generation committed

    def __len__(self) -> int:
        return int(self._index.searcher().num_docs)

    # -- writes --------------------------------------------------------------------------------------------
    def apply(self, added: Iterable[tuple[int, str]], removed: Iterable[int], generation: int) -> None:
        """Stage one committed store write (or a catch-up batch); searches commit it before they run.

        A tantivy commit costs a fixed 20-150 ms here (a new segment and its fsyncs) whatever its size, so
        consecutive writes share one: the next search, flush() or a full batch commits them together. Nothing
        is lost to a crash in between: the store holds the writes and the next start re-applies them."""
        with self._write_lock:
            self._stage(added, removed)
            self._pending = generation
            self._pending_ops += 1
            if self._pending_ops >= _COMMIT_EVERY:
                self._commit()

    def flush(self) -> None:
        """Commit what apply() staged (a search does this first; call it before a shutdown too)."""
        if self._pending is None:
            return
        with self._write_lock:
            if self._pending is not None:
                self._commit()

    def _stage(self, added: Iterable[tuple[int, str]], removed: Iterable[int]) -> None:
        for key in removed:
            self._delete(key)
        for key, text in added:
            # A key can already be present when a catch-up re-applies a write whose commit was recorded late.
            self._delete(key)
            doc = tantivy.Document()
            doc.add_unsigned("key", int(key))
            doc.add_text("text", text)
            self._writer.add_document(doc)

    def _delete(self, key: int) -> None:
        # By query: delete_documents_by_term turns a Python int into a signed term that matches no u64 key.
        self._writer.delete_documents_by_query(tantivy.Query.term_query(self._schema, "key", int(key)))

    def _commit(self) -> None:
        generation = self._pending
        try:
            self._writer.commit()
        except BaseException:
            self._writer.rollback()  # drop the staged part; the store still holds the writes
            self._pending, self._pending_ops = None, 0
            raise
        self._index.reload()
        self._pending, self._pending_ops = None, 0
        if generation is not None:
            self.generation = generation
            self._write_state(generation)

    def catch_up(self, changes: Iterator[TextChanges], generation: int) -> int:
        """Apply the store's changes since self.generation, in one commit; the number of keys applied."""
        applied = 0
        with self._write_lock:
            for change in changes:
                self._stage(change.added, change.removed)
                applied += len(change.added) + len(change.removed)
            if applied or generation != self.generation:
                self._pending = generation
                self._commit()
        return applied

    def close(self) -> None:
        """Commit, then release the writer (its lock file) so that another FullTextIndex may open the directory."""
        self.flush()
        with self._write_lock:
            self._writer.wait_merging_threads()  # consumes the writer

    # -- search --------------------------------------------------------------------------------------------
    def terms(self, text: str) -> list[str]:
        """The query's distinct analysed terms, in order of first appearance."""
        return list(dict.fromkeys(self._analyzer.analyze(text)))[:_MAX_QUERY_TERMS]

    def search(
        self, text: str, count: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """BM25 top `count`: (keys uint64, scores float64), best first. `allowed`: only these keys (a filter)."""
        terms = self.terms(text)
        if not terms or count <= 0 or (allowed is not None and len(allowed) == 0):
            return np.zeros(0, dtype=np.uint64), np.zeros(0)
        query = tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "text", t)) for t in terms]
        )
        if allowed is not None:
            keys = tantivy.Query.term_set_query(self._schema, "key", [int(k) for k in allowed])
            query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query), (tantivy.Occur.Must, keys)])
        self.flush()  # read your writes: what was acknowledged is searchable
        searcher = self._index.searcher()
        hits = searcher.search(query, count, count=False).hits
        if not hits:
            return np.zeros(0, dtype=np.uint64), np.zeros(0)
        found = searcher.fast_field_values("key", [address for _, address in hits])
        return np.asarray(found, dtype=np.uint64), np.asarray([score for score, _ in hits], dtype=np.float64)

    # -- state ---------------------------------------------------------------------------------------------
    def _read_state(self) -> int:
        """The store generation this index contains; -1 if unknown (no state, another format or analyzer)."""
        if self.directory is None:
            return 0
        path = self.directory / _STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return -1
        except (OSError, ValueError):
            log.warning("full-text index state %s is unreadable", path)
            return -1
        if state.get("format") != FORMAT or state.get("language") != self.language:
            return -1
        return int(state.get("generation", -1))

    def _write_state(self, generation: int) -> None:
        if self.directory is None:
            return
        tmp = self.directory / f".{_STATE}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"format": FORMAT, "language": self.language, "generation": generation}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / _STATE)


def open_fulltext(
    directory: Path,
    language: str,
    changes_since: ChangesSince,
    generation: int,
    doc_count: int,
    name: str = "",
) -> FullTextIndex:
    """A collection's full-text index at the store's `generation`: caught up, or rebuilt from the store.

    `changes_since(g)` yields the store's changes after generation g (g=0: every document)."""
    index = FullTextIndex(directory, language)
    if index.generation < 0 and generation == 0 and doc_count == 0:  # a new collection
        index.catch_up(iter(()), 0)
        return index
    if index.generation < 0:
        reason = "it has no usable state (new, or of another format or analyzer)"
    elif index.generation > generation:
        reason = f"it is ahead of the store ({index.generation} > {generation})"
    else:
        applied = index.catch_up(changes_since(index.generation), generation)
        if len(index) == doc_count:
            log.info(
                "collection %r: full-text index caught up from generation %d (%d changes)",
                name,
                index.generation,
                applied,
            )
            return index
        reason = f"it holds {len(index)} documents but the store {doc_count}"
    log.warning("collection %r: rebuilding the full-text index from the store: %s", name, reason)
    index.close()
    shutil.rmtree(directory, ignore_errors=True)
    index = FullTextIndex(directory, language)
    index.catch_up(changes_since(0), generation)
    return index
