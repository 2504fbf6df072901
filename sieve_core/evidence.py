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
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from sieve_core.late_interaction import BestMatches
from sieve_core.token_codec import decode_spans, span_values
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


def evidence_spans_many(
    matches: Sequence[tuple[bytes, BestMatches]], max_spans: int = MAX_SPANS
) -> list[list[Span]]:
    """`evidence_spans` of every hit of a reply at once, equal to it hit for hit (spans and scores): the
    spans sections decoded in one pass and the picking, merging and keeping done in numpy over all the
    hits' rows together, where one hit at a time cost ~0.13 ms in Python (13 ms for a reply of 100 hits,
    twice the MaxSim that ranked them: bench/late_overhead.py)."""
    if not matches:
        return []
    values, firsts = span_values([blob for blob, _ in matches])
    # Each hit's picked rows (a query token's best row with a positive similarity), each with the sum of
    # its query tokens' similarities, added in query-token order as `evidence_spans` does.
    hit = np.repeat(np.arange(len(matches)), [len(best.rows) for _, best in matches])
    rows = np.concatenate([best.rows for _, best in matches]).astype(np.int64)
    sims = np.concatenate([best.sims for _, best in matches]).astype(np.float64)
    positive = sims > 0
    stride = int(rows.max(initial=0)) + 1
    picked, inverse = np.unique(hit[positive] * stride + rows[positive], return_inverse=True)
    row_scores = np.bincount(inverse, weights=sims[positive], minlength=len(picked))
    picked_hit, picked_row = np.divmod(picked, stride)
    starts = _row_starts(values, firsts, picked_hit, picked_row)
    spanned = starts >= 0  # a blob without spans (codec version 1 or 2) gives no evidence
    picked_hit, row_scores, starts = picked_hit[spanned], row_scores[spanned], starts[spanned]
    # Every member of every picked row: its text span (starts are deltas within the row).
    counts = values[starts]
    first = np.cumsum(counts) - counts
    owner = np.repeat(np.arange(len(starts)), counts)  # the picked row of each member
    at = starts[owner] + 1 + 2 * (np.arange(len(owner)) - first[owner])
    delta, length = values[at], values[at + 1]
    begin = np.cumsum(delta)
    begin -= (begin - delta)[first][owner]
    keep = length > 0  # special tokens stand for no text
    return _merged_many(
        len(matches), picked_hit[owner[keep]], begin[keep], length[keep], owner[keep], row_scores, max_spans
    )


def _row_starts(values: np.ndarray, firsts: np.ndarray, hits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where each (hit, row) pair's member count is in `values`, -1 where the hit's blob has no spans (or
    fewer rows). A row's place depends on every row before it (row k + 1 starts 1 + 2 x count after row k),
    so this follows that chain by pointer jumping: `jump` maps a position to the next row's, then to the
    one 2, 4, 8 ... rows on, and each pair takes the jumps of its row number's bits. About log2(rows)
    gathers over all the values of the reply, instead of one Python step per row: the evidence of 100 hits
    (int4 pool 2, ~120 rows each) 2.61 instead of 2.86 ms (bench/evidence_cost.py before and after)."""
    n = len(values)
    jump = np.minimum(np.arange(n, dtype=np.int64) + 1 + 2 * values, n)
    jump = np.append(jump, n)  # position n: past every section, where the walk stays
    pos = firsts[hits].astype(np.int64)
    ends = firsts[hits + 1].astype(np.int64)
    remaining = rows.astype(np.int64)
    while True:
        odd = (remaining & 1).astype(bool)
        pos[odd] = jump[pos[odd]]
        remaining = remaining >> 1
        if not remaining.any():
            break
        jump = jump[jump]
    # Positions only grow, so a walk that ran past its own section ends at or beyond its end.
    return np.where(pos < ends, pos, -1)


def _merged_many(
    n_hits: int,
    hit: np.ndarray,
    begin: np.ndarray,
    length: np.ndarray,
    row: np.ndarray,
    row_scores: np.ndarray,
    max_spans: int,
) -> list[list[Span]]:
    """`_merged` for the pieces of many hits at once: piece i is [begin, begin + length) of `hit`, matched
    by `row` (an index into `row_scores`)."""
    spans: list[list[Span]] = [[] for _ in range(n_hits)]
    if not len(hit):
        return spans
    end = begin + length
    # Pieces by hit, then (start, end): one int64 key (a hit's pieces are shifted past the previous hit's,
    # so that one running maximum of the ends serves all below). Pieces equal in all three are
    # interchangeable: they merge into the same span.
    width = int(end.max()) + _ADJACENT_GAP + 2
    if n_hits * width * width < 1 << 62:
        order = np.argsort((hit * width + begin) * width + end)
    else:  # texts too long for one key
        order = np.lexsort((end, begin, hit))
    shift = hit[order] * width
    begin, end, row = begin[order] + shift, end[order] + shift, row[order]
    # A piece starts a new span when it begins more than the gap after every piece before it.
    reach = np.maximum.accumulate(end)
    new = np.ones(len(begin), dtype=bool)
    new[1:] = begin[1:] - reach[:-1] > _ADJACENT_GAP
    group = np.cumsum(new) - 1
    heads = np.flatnonzero(new)
    span_hit = hit[order][heads]
    span_begin = begin[heads] - shift[heads]
    span_end = np.maximum.reduceat(end, heads) - shift[heads]
    # A span's score: its distinct rows' scores, added in row order (as `_merged` adds its keys).
    pairs = np.sort(group * len(row_scores) + row)
    pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
    span_of, row_of = np.divmod(pairs, len(row_scores))
    score = np.bincount(span_of, weights=row_scores[row_of], minlength=len(heads))
    # Per hit the best `max_spans` (ties: the earlier; spans are in (hit, text) order), then in text order.
    ranked = np.argsort(-score, kind="stable")
    ranked = ranked[np.argsort(span_hit[ranked], kind="stable")]
    ranked_hit = span_hit[ranked]
    place = np.arange(len(ranked)) - np.searchsorted(ranked_hit, ranked_hit)
    kept = np.sort(ranked[place < max_spans])
    for h, a, b, s in zip(
        span_hit[kept].tolist(),
        span_begin[kept].tolist(),
        span_end[kept].tolist(),
        score[kept].tolist(),
        strict=True,
    ):
        spans[h].append(Span(a, b, s))
    return spans


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
    scored = [(_sum_sorted(scores, keys), start, end) for start, end, keys in merged]
    kept = sorted(scored, key=lambda s: -s[0])[:max_spans]
    return [Span(start, end, score) for score, start, end in sorted(kept, key=lambda s: s[1])]


def _sum_sorted(scores: Mapping[K, float], keys: set[K]) -> float:
    """The keys' scores added one by one in key order: the same float on every run and Python version (a
    set's order follows string hashing, and `sum` compensates from Python 3.12), and what
    `evidence_spans_many` adds."""
    total = 0.0
    for key in sorted(keys):  # type: ignore[type-var]
        total += scores[key]
    return total
