"""SearchService calls: one search, or the same search streamed stage by stage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sieve import _build
from sieve._build import SearchOptions
from sieve._sync.base import ClientBase
from sieve.v1 import search_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack


class SearchCalls(ClientBase):
    def search(
        self, collection: str, query: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> search_pb2.SearchResponse:
        """Search a collection. Options (`sieve._build.SearchOptions`): top_k; `filter`: {"key": "value", ...}
        (all must hold) or a `Filter`; `settings` (a `SearchSettings` or a dict of its fields) and, on top,
        retrieve_candidates, ef_search, late_interaction / cross_encoder (stage modes "off", "best_effort" or
        "required"; None: the collection default), late_interaction_keep, cross_encoder_keep,
        latency_budget_ms, tier ("fast", "balanced", "best"); retrieval ("dense", "lexical" or "hybrid"),
        fusion ("rrf" with rrf_k, or "weighted" with dense_weight); query_vector (search by this vector of
        the collection's model instead of the query's embedding; the query may then be "" unless lexical
        retrieval or a re-ranker needs the text); omit_documents; min_generation.

        The response has `hits` (each with `stage_scores`, and with late interaction or lexical retrieval
        `evidence`: the spans of `hit.text` that matched, in code points, so `hit.text[span.start:span.end]`
        in Python) and one
        `StageReport` per stage in `stages`: a best-effort stage that could not run is reported DEGRADED with
        a `reason`; a required one raises `Unavailable` (no worker) or `FailedPrecondition` (no model). With
        `latency_budget_ms` / `tier` the server plans the stages to fit and says what it cut or skipped in
        each report's `plan` and `reason`."""
        request = _build.search(collection, query, options)
        return self._unary("SearchService/Search", self._search.Search, request, timeout)

    def search_stream(
        self, collection: str, query: str, *, timeout: float | None = None, **options: Unpack[SearchOptions]
    ) -> Iterator[search_pb2.SearchStreamResponse]:
        """The same search as `search` (same options), as it improves: yields the first stage's ranking as
        soon as it exists, then each later stage's (`message.stage`, `message.result`), the last with `final`
        set; its `result` is what `search` returns. `deadline_reached` on the final message: time ran out and
        the last ranking stands. Not retried once a message has arrived (a search is cheap to ask again)."""
        request = _build.search(collection, query, options)
        limit = self.timeouts.default if timeout is None else timeout
        method = "SearchService/SearchStream"
        yield from self._stream(method, self._search.SearchStream, request, limit, resume=False)
