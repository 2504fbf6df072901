"""Evidence spans: the parts of a document's text that late interaction matched (issue 15).

MaxSim sums, over the query's tokens, each one's best similarity to any stored row of the document. The
kernel keeps which row that was (`late_interaction.BestMatches`), and a version 3 blob records the text
spans each stored row stands for (`late_interaction.decode_spans`). So a hit's evidence is: for each row
that some query token picked, its member tokens' spans, scored by the sum of the similarities of the
query tokens that picked it; spans of adjacent tokens (touching, or one character apart: a space) are
merged into one, whose score sums its distinct rows'; the best `MAX_SPANS` are kept, in text order.

With token pooling a stored row is a cluster of tokens (pool factor 4: about four), so a row's evidence
is all of its members, e.g. "Vitamin", "D", "deficiency" for a query token "vitamin": the granularity
the store keeps, not a claim that each member matched alone.

A hit found lexically (BM25) carries the spans of the query's terms where they occur in its text, found
by the collection's own analyzer (server/storage/fulltext.py: the same words, lowercasing, stop words and
stems as the index): each occurrence is a span scored by its term's BM25 idf (rarer terms weigh more), merged
and kept the same way. A hit late interaction scored carries late interaction's evidence instead (what the
later, finer stage matched); one found lexically that late interaction did not score (the budget cut it,
or its token vectors are pending) keeps its lexical spans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

from sieve_core.late_interaction import BestMatches
from sieve_core.token_codec import decode_spans
from sieve_core.types import Span

MAX_SPANS = 5  # "a handful per hit": more is noise for a reader
_ADJACENT_GAP = 1  # code points between two tokens that still make one span (a space; none for word pieces)
K = TypeVar("K", bound=Hashable)


def evidence_spans(blob: bytes, best: BestMatches, max_spans: int = MAX_SPANS) -> list[Span]:
    """A hit's evidence from its stored blob and MaxSim's argmax for the query (see the module doc).
    Empty for a blob without spans (codec version 1 or 2) or a document without rows."""
    row_scores: dict[int, float] = defaultdict(float)
    for row, sim in zip(best.rows.tolist(), best.sims.tolist(), strict=True):
        if sim > 0:  # a query token that found nothing similar is no evidence
            row_scores[row] += sim
    if not row_scores:
        return []
    rows = sorted(row_scores)
    pieces = [
        (start, end, row)
        for row, members in zip(rows, decode_spans(blob, rows), strict=True)
        for start, end in members
    ]
    return _merged(pieces, row_scores, max_spans)


def lexical_spans(
    occurrences: Iterable[tuple[int, int, str]], weights: Mapping[str, float], max_spans: int = MAX_SPANS
) -> list[Span]:
    """A lexical hit's evidence: the query terms' `occurrences` in its text ((start, end, term), code
    points), each scored by its term's `weights` (BM25 idf); adjacent ones merged as for late interaction."""
    return _merged([o for o in occurrences if o[2] in weights], weights, max_spans)


def _merged(pieces: list[tuple[int, int, K]], scores: Mapping[K, float], max_spans: int) -> list[Span]:
    """Spans of the `pieces` ((start, end, what matched)): adjacent ones merged into one scored by the sum
    of its distinct matches' `scores`; the best `max_spans`, in text order."""
    pieces = sorted((p for p in pieces if p[1] > p[0]), key=lambda p: (p[0], p[1]))  # empty: special tokens
    merged: list[tuple[int, int, set[K]]] = []
    for start, end, key in pieces:
        if merged and start - merged[-1][1] <= _ADJACENT_GAP:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2] | {key})
        else:
            merged.append((start, end, {key}))
    scored = [(sum(scores[k] for k in keys), start, end) for start, end, keys in merged]
    kept = sorted(scored, key=lambda s: -s[0])[:max_spans]
    return [Span(start, end, score) for score, start, end in sorted(kept, key=lambda s: s[1])]
