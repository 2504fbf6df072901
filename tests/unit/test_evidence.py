"""Evidence spans: token offsets stored with the token vectors (SVTK version 3), read back per row, and
turned into a hit's spans from MaxSim's argmax. Real tokenizer and encoder (all-MiniLM-L6-v2)."""

from __future__ import annotations

import numpy as np
import pytest

from sieve_core.evidence import MAX_SPANS, evidence_spans, evidence_spans_many, lexical_spans
from sieve_core.late_interaction import BestMatches, maxsim_blobs
from sieve_core.models.bi_encoder import BiEncoderRunner
from sieve_core.token_codec import decode_spans, decode_tokens, encode_tokens, read_header, span_values
from sieve_core.token_format import TokenFormat, compress, pool_tokens_with_members, prepare_query
from tests.conftest import MODEL, MODELS_DIR, require_bundle
from tests.corpus import DOCS

# Code points outside the BMP and accents before the words, so UTF-8 bytes, UTF-16 units and code points
# all differ.
TEXT = "😀 Café naïve: Vitamin D deficiency is associated with an increased risk of bone fractures. 🦴"


@pytest.fixture(scope="module")
def runner() -> BiEncoderRunner:
    require_bundle()
    return BiEncoderRunner(MODELS_DIR / MODEL)


def test_offsets_are_code_points_one_per_token_row(runner: BiEncoderRunner) -> None:
    rows = runner.token_vectors([TEXT])[0]
    offsets = runner.token_offsets([TEXT])[0]
    assert offsets.shape == (len(rows), 2)
    pieces = [TEXT[a:b] for a, b in offsets]
    assert "Vitamin" in pieces and "fractures" in pieces
    # Code points, not UTF-8 bytes: the emoji (an [UNK] token) is one character, so "Café" starts at 2.
    assert pieces[:2] == ["😀", "Café"] and tuple(offsets[1]) == (2, 6)


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_every_token_is_in_exactly_one_row(runner: BiEncoderRunner, pool: int) -> None:
    rows = runner.token_vectors([TEXT])[0]
    pooled, members = pool_tokens_with_members(rows, pool)
    assert len(members) == len(pooled)
    flat = np.sort(np.concatenate(members))
    np.testing.assert_array_equal(flat, np.arange(len(rows)))
    # Each pooled row is its members' re-normalised mean.
    for row, group in zip(pooled, members, strict=True):
        mean = rows[group].sum(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)


@pytest.mark.parametrize("fmt", [TokenFormat(pool_factor=1), TokenFormat(), TokenFormat(projection_dims=128)])
def test_spans_round_trip_and_leave_the_rows_alone(runner: BiEncoderRunner, fmt: TokenFormat) -> None:
    rows = runner.token_vectors([TEXT])[0]
    offsets = runner.token_offsets([TEXT])[0]
    plain, with_spans = compress(rows, fmt), compress(rows, fmt, offsets)
    info = read_header(with_spans)
    assert with_spans[4] == 3 and info.spans_bytes == len(with_spans) - len(plain)
    np.testing.assert_array_equal(decode_tokens(with_spans), decode_tokens(plain))
    spans = decode_spans(with_spans)
    _, members = pool_tokens_with_members(rows, fmt.pool_factor)
    assert spans == [
        sorted(tuple(offsets[i]) for i in group if offsets[i][1] > offsets[i][0]) for group in members
    ]
    assert decode_spans(with_spans, [2, 0]) == [spans[2], spans[0]]
    # Older blobs (versions 1 and 2) are still read, and have no spans.
    assert decode_spans(plain) == [[] for _ in range(read_header(plain).n_tokens)]


def test_a_corrupt_spans_section_is_refused(runner: BiEncoderRunner) -> None:
    rows = runner.token_vectors([TEXT])[0]
    blob = compress(rows, TokenFormat(), runner.token_offsets([TEXT])[0])
    with pytest.raises(ValueError, match="trailing|truncated"):
        read_header(blob[:-1])
    with pytest.raises(ValueError, match="trailing"):
        read_header(blob + b"\0")
    with pytest.raises(ValueError, match="rows of spans"):
        encode_tokens(rows[:3], spans=[[(0, 1)]])


def test_argmax_matches_the_scores(runner: BiEncoderRunner) -> None:
    texts = [TEXT, "The mitochondria is the powerhouse of the cell.", ""]
    blobs = [
        compress(r, TokenFormat(), o)
        for r, o in zip(runner.token_vectors(texts), runner.token_offsets(texts), strict=True)
    ]
    q = runner.token_vectors(["vitamin d and bone fractures"])[0]
    best: list[BestMatches | None] = [None] * len(blobs)
    scores = maxsim_blobs(q, blobs, best=best)
    assert best[2] is None and scores[2] == 0.0  # an empty text has no rows
    for blob, found, score in zip(blobs[:2], best[:2], scores[:2], strict=True):
        assert found is not None
        sims = q @ decode_tokens(blob).T
        np.testing.assert_array_equal(found.rows, sims.argmax(axis=1))
        assert found.sims.sum() == pytest.approx(score, rel=1e-4)


def test_evidence_lies_in_the_text_and_covers_the_query_words(runner: BiEncoderRunner) -> None:
    blob = compress(
        runner.token_vectors([TEXT])[0], TokenFormat(pool_factor=1), runner.token_offsets([TEXT])[0]
    )
    q = runner.token_vectors(["vitamin deficiency fractures"])[0]
    best: list[BestMatches | None] = [None]
    maxsim_blobs(q, [blob], best=best)
    assert best[0] is not None
    spans = evidence_spans(blob, best[0])
    assert 0 < len(spans) <= MAX_SPANS
    assert all(0 <= s.start < s.end <= len(TEXT) for s in spans)
    assert [s.start for s in spans] == sorted(s.start for s in spans)
    shown = " ".join(TEXT[s.start : s.end].lower() for s in spans)
    assert "vitamin" in shown and "fractures" in shown
    # Adjacent matched tokens are one span: "Vitamin D deficiency" is not three.
    assert not any(b.start - a.end <= 1 for a, b in zip(spans, spans[1:], strict=False))


def test_a_blob_without_spans_gives_no_evidence(runner: BiEncoderRunner) -> None:
    blob = compress(runner.token_vectors([TEXT])[0], TokenFormat())
    best: list[BestMatches | None] = [None]
    maxsim_blobs(runner.token_vectors(["vitamin"])[0], [blob], best=best)
    assert best[0] is not None and evidence_spans(blob, best[0]) == []


def test_special_tokens_without_text_are_left_out_of_the_spans() -> None:
    # ColBERT documents keep [CLS], [D] and [SEP] rows, whose offsets are (0, 0); pooling may put them
    # in a cluster with real tokens, after them in token order.
    rows = np.eye(6, 8, dtype=np.float32)
    rows[5] = rows[4]  # [SEP] pools with token 4, whose text starts later: (12, 15) then (0, 0)
    offsets = np.array([[0, 0], [0, 3], [4, 7], [8, 11], [12, 15], [0, 0]])
    blob = compress(rows, TokenFormat(pool_factor=2), offsets)
    spans = decode_spans(blob)
    assert [s for row in spans for s in row] and all(b > a for row in spans for a, b in row)
    assert sorted(s for row in spans for s in row) == [(0, 3), (4, 7), (8, 11), (12, 15)]


# -- a whole reply's evidence at once ------------------------------------------------------------------------

REPLY_TEXTS = [TEXT, *DOCS.values(), "Vitamin D, vitamin D3 and calcium: bone density in older adults " * 6]
REPLY_QUERIES = ["vitamin d and bone fractures", "does aspirin prevent heart attacks", "café risk"]


def _reply(runner: BiEncoderRunner, fmt: TokenFormat, query: str) -> list[tuple[bytes, BestMatches]]:
    """Every text's blob (with spans) and MaxSim's argmax for the query: what a reply's hits carry."""
    blobs = [
        compress(r, fmt, o)
        for r, o in zip(runner.token_vectors(REPLY_TEXTS), runner.token_offsets(REPLY_TEXTS), strict=True)
    ]
    best: list[BestMatches | None] = [None] * len(blobs)
    maxsim_blobs(prepare_query(runner.token_vectors([query])[0], fmt), blobs, best=best)
    return [(blob, found) for blob, found in zip(blobs, best, strict=True) if found is not None]


@pytest.mark.parametrize("fmt", [TokenFormat(pool_factor=1), TokenFormat(), TokenFormat(projection_dims=128)])
@pytest.mark.parametrize("query", REPLY_QUERIES)
def test_a_replys_evidence_at_once_equals_each_hits_own(
    runner: BiEncoderRunner, fmt: TokenFormat, query: str
) -> None:
    matches = _reply(runner, fmt, query)
    # Hits of every kind in one reply: a blob without spans (stored before offsets were), and a hit whose
    # query tokens all found nothing similar (no evidence), among ordinary ones.
    plain = compress(runner.token_vectors([TEXT])[0], fmt)
    _, found = _reply(runner, fmt, query)[0]
    nothing = BestMatches(found.rows, -np.abs(found.sims))
    matches = [*matches[:2], (plain, found), matches[2], (matches[3][0], nothing), *matches[4:]]
    expected = [evidence_spans(blob, best) for blob, best in matches]
    assert evidence_spans_many(matches) == expected  # spans and scores, exactly
    assert expected[2] == [] and expected[4] == [] and sum(map(bool, expected)) == len(matches) - 2
    assert evidence_spans_many(matches, max_spans=2) == [evidence_spans(b, m, 2) for b, m in matches]
    assert evidence_spans_many([]) == []


def test_a_replys_evidence_leaves_out_spans_of_special_tokens() -> None:
    rows = np.eye(6, 8, dtype=np.float32)
    rows[5] = rows[4]  # [SEP] (no text) pools with token 4
    offsets = np.array([[0, 0], [0, 3], [4, 7], [8, 11], [12, 15], [0, 0]])
    blob = compress(rows, TokenFormat(pool_factor=2), offsets)
    best: list[BestMatches | None] = [None]
    maxsim_blobs(np.eye(6, 8, dtype=np.float32), [blob], best=best)
    assert best[0] is not None
    spans = evidence_spans_many([(blob, best[0])])
    assert spans == [evidence_spans(blob, best[0])] and spans[0]
    assert all(s.end > s.start for s in spans[0])


def test_span_values_are_each_blobs_spans_in_turn(runner: BiEncoderRunner) -> None:
    rows, offsets = runner.token_vectors(REPLY_TEXTS[:3]), runner.token_offsets(REPLY_TEXTS[:3])
    blobs = [compress(rows[0], TokenFormat(), offsets[0]), compress(rows[1], TokenFormat())]
    blobs.append(compress(rows[2], TokenFormat(pool_factor=1), offsets[2]))
    values, firsts = span_values(blobs)
    assert len(firsts) == 4 and firsts[0] == 0 and firsts[-1] == len(values)
    assert firsts[2] == firsts[1]  # the blob without spans owns no values
    for k in (0, 2):
        # Per row: its member count, then (start delta, length) pairs: decode_spans, flattened.
        flat = []
        for members in decode_spans(blobs[k]):
            flat.append(len(members))
            previous = 0
            for start, end in members:
                flat += [start - previous, end - start]
                previous = start
        assert values[firsts[k] : firsts[k + 1]].tolist() == flat


def test_a_reply_reads_all_its_hits_spans_in_one_pass(
    runner: BiEncoderRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply's evidence (server/core/search.py) decodes every scored hit's spans section in one call,
    not hit by hit (13 ms for a reply of 100 hits that way; bench/late_overhead.py)."""
    import sieve_core.evidence
    from server.core.search import _resolve_evidence
    from sieve_core.types import Hit, Stage, StageScore

    calls: list[int] = []
    real = sieve_core.evidence.span_values

    def counted(blobs):  # type: ignore[no-untyped-def]
        calls.append(len(blobs))
        return real(blobs)

    monkeypatch.setattr(sieve_core.evidence, "span_values", counted)
    matches = _reply(runner, TokenFormat(), REPLY_QUERIES[0])
    hits = []
    for i, m in enumerate(matches):
        hit = Hit(f"d{i}", 1.0, "", stage_scores=[StageScore(Stage.LATE_INTERACTION, 1.0, i)], key=i)
        hit.matches = m
        hits.append(hit)
    _resolve_evidence(hits, REPLY_QUERIES[0], None)
    assert calls == [len(matches)]
    assert [h.evidence for h in hits] == [evidence_spans(*m) for m in matches]


# -- lexical hits -------------------------------------------------------------------------------------------


def test_lexical_spans_merge_adjacent_terms_and_keep_the_best() -> None:
    weights = {"vitamin": 1.0, "d": 0.5, "bone": 2.0, "risk": 0.1}
    occurrences = [(0, 7, "vitamin"), (8, 9, "d"), (20, 24, "bone"), (30, 34, "risk"), (40, 44, "other")]
    spans = lexical_spans(occurrences, weights)
    # "Vitamin D" is one span worth both terms; a term the query does not hold is no evidence.
    assert [(s.start, s.end, s.score) for s in spans] == [(0, 9, 1.5), (20, 24, 2.0), (30, 34, 0.1)]
    best_two = lexical_spans(occurrences, weights, max_spans=2)
    assert [(s.start, s.end) for s in best_two] == [(0, 9), (20, 24)]  # the best, in text order


def test_lexical_occurrences_are_the_analysed_terms_in_code_points() -> None:
    from server.storage.fulltext import FullTextIndex

    index = FullTextIndex(None)
    index.apply([(1, TEXT), (2, "bone marrow"), (3, "nothing")], [], 1)
    index.flush()
    weights = index.term_weights("the deficiencies of bones, naïve")
    assert set(weights) == {"defici", "bone", "naïv"}  # stems; "the" and "of" are stop words
    assert weights["defici"] > weights["bone"]  # in one document of three vs two: rarer weighs more
    spans = lexical_spans(index.occurrences(TEXT, weights), weights)
    # Code points of the str, after an emoji and accents: byte offsets would cut these words apart.
    assert [TEXT[s.start : s.end] for s in spans] == ["naïve", "deficiency", "bone"]


def test_late_interaction_spans_win_and_lexical_ones_fill_in(runner: BiEncoderRunner) -> None:
    """A reply's evidence (server/core/search.py): late interaction's spans for a hit it scored, the lexical
    ones for a hit BM25 found that late interaction has no spans for (a blob stored without offsets)."""
    from server.core.search import _resolve_evidence
    from server.storage.fulltext import FullTextIndex
    from sieve_core.types import Hit, Stage, StageScore

    query = "vitamin deficiency fractures"
    index = FullTextIndex(None)
    index.apply([(1, TEXT), (2, "bone marrow")], [], 1)
    index.flush()
    rows, offsets = runner.token_vectors([TEXT])[0], runner.token_offsets([TEXT])[0]
    q = runner.token_vectors([query])[0]
    lexical = [StageScore(Stage.LEXICAL, 1.0, 0)]
    hits = []
    for blob in (compress(rows, TokenFormat(), offsets), compress(rows, TokenFormat())):
        best: list[BestMatches | None] = [None]
        maxsim_blobs(q, [blob], best=best)
        hit = Hit("d", 1.0, TEXT, stage_scores=list(lexical), key=1)
        hit.matches = (blob, best[0])
        hits.append(hit)
    found_lexically_only = Hit("d", 1.0, TEXT, stage_scores=list(lexical), key=1)
    _resolve_evidence([*hits, found_lexically_only], query, index)
    with_offsets, without, lexical_only = hits[0].evidence, hits[1].evidence, found_lexically_only.evidence
    assert with_offsets == evidence_spans(*hits[0].matches)  # type: ignore[misc]
    assert without and without == lexical_only  # the lexical spans fill in
    assert [TEXT[s.start : s.end] for s in lexical_only] == ["Vitamin", "deficiency", "fractures"]
