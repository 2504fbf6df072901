"""Plain domain types shared by the server core and the workers. No protobuf here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Stage(enum.IntEnum):
    """Cascade stages, in order. Values match sieve.v1.Stage."""

    RETRIEVE = 1  # dense retrieval (the bi-encoder's vector and the vector index)
    LATE_INTERACTION = 2
    CROSS_ENCODER = 3
    LEXICAL = 4  # BM25 over the full-text index (lexical or hybrid retrieval)
    FUSION = 5  # the dense and lexical lists fused (hybrid retrieval)


class RetrievalMode(enum.IntEnum):
    """Values match sieve.v1.Retrieval; 0 means 'use the default'."""

    UNSPECIFIED = 0
    DENSE = 1
    LEXICAL = 2
    HYBRID = 3

    @property
    def dense(self) -> bool:
        return self in (RetrievalMode.DENSE, RetrievalMode.HYBRID)

    @property
    def lexical(self) -> bool:
        return self in (RetrievalMode.LEXICAL, RetrievalMode.HYBRID)


class FusionMethod(enum.IntEnum):
    """Values match sieve.v1.Fusion; 0 means 'use the default'."""

    UNSPECIFIED = 0
    RRF = 1
    WEIGHTED = 2


class StageMode(enum.IntEnum):
    """Values match sieve.v1.StageMode; 0 means 'use the default'."""

    UNSPECIFIED = 0
    OFF = 1
    BEST_EFFORT = 2
    REQUIRED = 3

    @property
    def enabled(self) -> bool:
        """The stage runs: BEST_EFFORT or REQUIRED (UNSPECIFIED left after every default is applied is OFF)."""
        return self in (StageMode.BEST_EFFORT, StageMode.REQUIRED)


class StageStatus(enum.IntEnum):
    """Values match sieve.v1.StageStatus."""

    COMPLETED = 1
    DEGRADED = 2
    SKIPPED = 3


class TimeLimit(enum.Enum):
    """Whether time (the call's deadline or the request's latency budget) kept a stage from running: a
    flag on the stage report for the server's own decisions; clients read the report's reason."""

    NONE = "none"
    SKIPPED = "skipped"  # never started: the budget's plan left it out, or no time was left for it
    STOPPED = "stopped"  # started, then stopped when the time ran out: the previous order stands


class SearchTier(enum.IntEnum):
    """Values match sieve.v1.SearchTier: named latency budgets with depths (server/core/budget.py)."""

    UNSPECIFIED = 0
    FAST = 1
    BALANCED = 2
    BEST = 3


METRICS = ("cosine", "ip", "l2")


@dataclass(frozen=True)
class SearchSettings:
    """Search settings; None / UNSPECIFIED fields fall back to the next level (collection, server)."""

    retrieve_candidates: int | None = None
    ef_search: int | None = None
    late_interaction: StageMode = StageMode.UNSPECIFIED
    late_interaction_keep: int | None = None
    cross_encoder: StageMode = StageMode.UNSPECIFIED
    cross_encoder_keep: int | None = None
    late_interaction_model: str | None = None
    cross_encoder_model: str | None = None
    latency_budget_ms: int | None = None
    tier: SearchTier = SearchTier.UNSPECIFIED
    retrieval: RetrievalMode = RetrievalMode.UNSPECIFIED
    fusion: FusionMethod = FusionMethod.UNSPECIFIED
    rrf_k: int | None = None
    dense_weight: float | None = None

    def over(self, base: SearchSettings) -> SearchSettings:
        """These settings, with unset fields taken from `base`."""

        def pick(mine, theirs, unset=None):
            return theirs if mine == unset else mine

        return SearchSettings(
            retrieve_candidates=pick(self.retrieve_candidates, base.retrieve_candidates),
            ef_search=pick(self.ef_search, base.ef_search),
            late_interaction=pick(self.late_interaction, base.late_interaction, StageMode.UNSPECIFIED),
            late_interaction_keep=pick(self.late_interaction_keep, base.late_interaction_keep),
            cross_encoder=pick(self.cross_encoder, base.cross_encoder, StageMode.UNSPECIFIED),
            cross_encoder_keep=pick(self.cross_encoder_keep, base.cross_encoder_keep),
            late_interaction_model=pick(self.late_interaction_model, base.late_interaction_model),
            cross_encoder_model=pick(self.cross_encoder_model, base.cross_encoder_model),
            latency_budget_ms=pick(self.latency_budget_ms, base.latency_budget_ms),
            tier=pick(self.tier, base.tier, SearchTier.UNSPECIFIED),
            retrieval=pick(self.retrieval, base.retrieval, RetrievalMode.UNSPECIFIED),
            fusion=pick(self.fusion, base.fusion, FusionMethod.UNSPECIFIED),
            rrf_k=pick(self.rrf_k, base.rrf_k),
            dense_weight=pick(self.dense_weight, base.dense_weight),
        )


@dataclass(frozen=True)
class TokenStorageSpec:
    """A collection's token-vector options at creation (0: the server default / none)."""

    pool_factor: int = 0
    projection_dims: int = 0
    codec: str = ""  # "": the server default (int4); else "int4", "int8" or "fp16"


@dataclass(frozen=True)
class TokenStorageInfo:
    """How a collection stores token vectors, and how many documents still wait for theirs."""

    pool_factor: int
    projection_dims: int
    description: str  # e.g. "int4, pool 2"
    model_id: str  # the model whose token vectors are stored
    pending: int
    codec: str = "int4"


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    embedding_model: str = ""
    metric: str = ""
    defaults: SearchSettings = field(default_factory=SearchSettings)
    text_language: str = ""  # the full-text analyzer's language ('': English)
    token_storage: TokenStorageSpec | None = None  # given: store token vectors in this format


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    embedding_model: str
    embedding_model_id: str
    metric: str
    dimensions: int
    defaults: SearchSettings
    document_count: int
    generation: int
    created_at: float
    text_language: str = "english"
    token_storage: TokenStorageInfo | None = None


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    key: str
    equals: str


@dataclass(frozen=True)
class SearchQuery:
    collection: str
    query: str
    top_k: int = 0
    filter: tuple[Condition, ...] = ()
    settings: SearchSettings = field(default_factory=SearchSettings)
    omit_documents: bool = False
    min_generation: int = 0  # read your writes: wait until the index shows this generation
    query_vector: tuple[float, ...] = ()  # search by this vector instead of the query's embedding


@dataclass
class StageScore:
    stage: Stage
    score: float
    rank: int


@dataclass(frozen=True)
class Span:
    """Part of a hit's text that matched: [start, end) in Unicode code points of the text."""

    start: int
    end: int
    score: float


@dataclass
class Hit:
    id: str
    score: float
    text: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stage_scores: list[StageScore] = field(default_factory=list)
    key: int = 0  # the stored version's key (its token vectors are filed under it); not sent to clients
    evidence: list[Span] = field(default_factory=list)
    loaded: bool = True  # text and metadata read (retrieval reads them only for the hits likely sent)
    # Late interaction's argmax for this hit with its stored blob, kept until the hit is sent (evidence is
    # worked out only for the hits a reply carries); not sent to clients.
    matches: tuple[bytes, Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class StageReport:
    stage: Stage
    status: StageStatus
    reason: str = ""
    candidates_in: int = 0
    candidates_out: int = 0
    took_ms: float = 0.0
    model_id: str = ""
    method: str = ""
    # Late interaction, for metrics: where the documents' token vectors came from ("store"), the bytes
    # read, how many candidates had none yet (pending), and where the query's came from.
    token_source: str = ""
    token_bytes: int = 0
    tokens_pending: int = 0
    query_token_source: str = ""
    # Latency budget: the planner's decision for this stage, and how many candidates it would have
    # scored when the budget cut them (0: not cut).
    plan: str = ""
    candidates_cut_from: int = 0
    time_limit: TimeLimit = TimeLimit.NONE  # DEGRADED because time ran out (not sent: the reason says so)
    # Re-ranking stages: the top k (ids in order) differs from the input's; how many are new in it.
    top_k_changed: bool = False
    top_k_new: int = 0


@dataclass
class SearchResult:
    hits: list[Hit]
    stages: list[StageReport]
    generation: int
    took_ms: float


@dataclass
class SearchUpdate:
    """One message of a streamed search: the ranking after `stage`, the reports so far."""

    result: SearchResult
    stage: Stage
    final: bool
    deadline_reached: bool = False


@dataclass(frozen=True)
class WriteResult:
    generation: int
    count: int
    not_found: int = 0
