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
"""

from __future__ import annotations

from collections import defaultdict

from sieve_core.late_interaction import BestMatches
from sieve_core.token_codec import decode_spans
from sieve_core.types import Span

MAX_SPANS = 5  # "a handful per hit": more is noise for a reader
_ADJACENT_GAP = 1  # code points between two tokens that still make one span (a space; none for word pieces)


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
    pieces = sorted(
        (start, end, row)
        for row, members in zip(rows, decode_spans(blob, rows), strict=True)
        for start, end in members
        if end > start  # special tokens stand for no text
    )
    merged: list[tuple[int, int, set[int]]] = []
    for start, end, row in pieces:
        if merged and start - merged[-1][1] <= _ADJACENT_GAP:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2] | {row})
        else:
            merged.append((start, end, {row}))
    scored = [(sum(row_scores[r] for r in members), start, end) for start, end, members in merged]
    kept = sorted(scored, key=lambda s: -s[0])[:max_spans]
    return [Span(start, end, score) for score, start, end in sorted(kept, key=lambda s: s[1])]
