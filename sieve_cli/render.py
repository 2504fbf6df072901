"""How the `sieve` command shows the API's answers as tables: collections, and a search's hits with every
stage's score, its evidence highlighted, and one row per stage.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import sieve
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sieve_cli.api_options import as_dict


def console() -> Console:
    # Piped output is not cut to rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def show_collections_table(collections: list[sieve.Collection]) -> None:
    table = Table("name", "model", "metric", "dims", "documents", "generation", "defaults", "created")
    for c in collections:
        defaults = ", ".join(
            f"{k}={str(v).removeprefix('STAGE_MODE_').lower()}" for k, v in as_dict(c.defaults).items()
        )
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created_at.seconds))
        table.add_row(
            c.name,
            c.embedding_model_id or c.embedding_model,
            enum_name(sieve.Metric, c.metric, "METRIC_"),
            str(c.dimensions),
            str(c.document_count),
            str(c.generation),
            defaults or "-",
            created,
        )
    console().print(table)


EVIDENCE_STYLE = "bold yellow"
SNIPPET_CONTEXT = 30  # characters of text shown around each evidence span


def highlighted(text: str, spans: Any) -> Text:
    """The text with its evidence spans styled (offsets are code points: Python str indices)."""
    out = Text(text.replace("\n", " "))
    for span in spans:
        out.stylize(EVIDENCE_STYLE, span.start, span.end)
    return out


def snippet(text: str, spans: Any, context: int = SNIPPET_CONTEXT) -> Text:
    """The evidence spans with some text around each, windows that touch merged, gaps shown as '…'."""
    windows: list[list[int]] = []
    for span in spans:
        lo, hi = max(0, span.start - context), min(len(text), span.end + context)
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], hi)
        else:
            windows.append([lo, hi])
    out = Text()
    for lo, hi in windows:
        out.append("…" if lo > 0 else "")
        piece = highlighted(
            text[lo:hi], [type(s)(start=s.start - lo, end=s.end - lo) for s in spans if lo <= s.start < hi]
        )
        out.append_text(piece)
    if windows and windows[-1][1] < len(text):
        out.append("…")
    return out


def show_search(response: sieve.SearchResponse, round_trip_ms: float, out: Console | None = None) -> None:
    """Two tables: the hits with every stage's score (and rank), then one row per stage."""
    out = out or console()
    ran = [s.stage for s in response.stages if s.status != sieve.StageStatus.STAGE_STATUS_SKIPPED]
    hits = Table(title="hits (stage columns: score and rank in that stage)", title_justify="left")
    hits.add_column("#", justify="right", no_wrap=True, min_width=2)
    hits.add_column("id", no_wrap=True, min_width=4)
    hits.add_column("score", justify="right", no_wrap=True, min_width=7)
    for stage in ran:
        name = enum_name(sieve.Stage, stage, "STAGE_")
        hits.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 11))
    hits.add_column("text", overflow="ellipsis", no_wrap=True, max_width=70)
    for rank, hit in enumerate(response.hits, 1):
        by_stage = {s.stage: s for s in hit.stage_scores}
        cells = [f"{by_stage[s].score:.4f} (#{by_stage[s].rank + 1})" if s in by_stage else "-" for s in ran]
        hits.add_row(str(rank), hit.id, f"{hit.score:.4f}", *cells, highlighted(hit.text, hit.evidence))
    out.print(hits)
    with_evidence = [(rank, h) for rank, h in enumerate(response.hits, 1) if h.evidence and h.text]
    if with_evidence:
        out.print(f"evidence (the parts that matched the query, [{EVIDENCE_STYLE}]highlighted[/])")
        for rank, hit in with_evidence:
            out.print(Text(f"{rank:>3} {hit.id}: ").append_text(snippet(hit.text, hit.evidence)))

    stages = Table(title="stages", title_justify="left")
    for column in ("stage", "status", "in", "out", "ms", "method"):
        stages.add_column(column, no_wrap=True, justify="right" if column in ("in", "out", "ms") else "left")
    stages.add_column("model / reason", ratio=1)
    for s in response.stages:
        status = enum_name(sieve.StageStatus, s.status, "STAGE_STATUS_")
        style = {"degraded": "yellow", "skipped": "dim"}.get(status, "")
        stages.add_row(
            enum_name(sieve.Stage, s.stage, "STAGE_"),
            f"[{style}]{status}[/]" if style else status,
            str(s.candidates_in),
            str(s.candidates_out),
            f"{s.took_ms:.2f}",
            s.method or "-",
            "\n".join(
                x
                for x in (
                    s.model_id,
                    s.reason and f"[{style}]{s.reason}[/]",
                    s.plan and f"plan: {s.plan}",
                    s.candidates_cut_from and f"cut from {s.candidates_cut_from} candidates by the budget",
                )
                if x
            )
            or "-",
        )
    out.print(stages)
    out.print(
        f"generation {response.generation}; server {response.took_ms:.2f} ms, round trip {round_trip_ms:.2f} ms"
    )
