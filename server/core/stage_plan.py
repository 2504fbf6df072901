"""A search's re-ranking plan, made once per request before any work: each stage's mode and depth, and
its model resolved (the cross-encoder's bundle manifest; late interaction's from the collection's stored
token vectors). A REQUIRED stage this server cannot run fails the request here (FAILED_PRECONDITION); a
BEST_EFFORT one is planned as unavailable and degrades, saying why. The cascade (cascade.py) runs the plan;
the budget planner (budget.py) sizes it against a latency budget."""

from __future__ import annotations

from dataclasses import dataclass

from server.core.budget import BudgetPlan
from server.core.tokens import ENABLE_HINT, TokenPlan
from sieve_core.config import Settings
from sieve_core.errors import FailedPrecondition
from sieve_core.models.bundle import BundleError
from sieve_core.models.registry import PAIR_SCORES, ModelKindError, ModelRegistry
from sieve_core.types import SearchSettings, Stage, StageMode

CROSS_ENCODER_EXPORT_HINT = (
    "export one with `sieve models export cross-encoder --source CHECKPOINT_DIR --out {dir}/NAME` and set "
    "SIEVE_CROSS_ENCODER_MODEL=NAME"
)


@dataclass(frozen=True)
class StageModel:
    name: str  # bundle name, as the worker task receives it
    label: str  # what the stage report shows
    cache_id: str  # BundleManifest.cache_id: revision + serving settings


@dataclass
class StagePlan:
    """What the request, the collection and the server together ask of one re-ranking stage, with its
    model resolved once per request (`unavailable` says why there is none: the stage degrades)."""

    stage: Stage
    mode: StageMode
    keep: int
    model: StageModel | None = None
    unavailable: str = ""
    tokens: TokenPlan | None = None  # late interaction: how the collection stores its token vectors
    budget: BudgetPlan | None = None  # a request with a latency budget: what the planner gave the stage


class StagePlanner:
    """Resolves a request's re-ranking stages against this server's models and the collection."""

    def __init__(self, settings: Settings, models: ModelRegistry) -> None:
        self.settings = settings
        self.models = models  # only manifests are read here: the workers run the re-rankers

    def cross_encoder_model(self, name: str | None) -> StageModel:
        """The named cross-encoder; FailedPrecondition naming the fix when there is none."""
        hint = CROSS_ENCODER_EXPORT_HINT.format(dir=self.settings.models_dir)
        if name is None:
            raise FailedPrecondition(f"no cross_encoder model is configured on this server; {hint}")
        try:
            manifest = self.models.manifest(name, PAIR_SCORES)
        except ModelKindError as exc:
            raise FailedPrecondition(str(exc)) from None
        except BundleError as exc:
            raise FailedPrecondition(
                f"cross_encoder model {name!r} is not available ({exc}); {hint}"
            ) from None
        return StageModel(name, manifest.model_id, manifest.cache_id)

    def plan(
        self,
        settings: SearchSettings,
        embedding_model: str,
        top_k: int,
        *,
        collection: str = "",
        tokens: TokenPlan | None = None,
    ) -> list[StagePlan]:
        """The stages a search runs, their models resolved once. A REQUIRED stage this server has no model
        for (or, late interaction, a collection that stores no token vectors of it) fails the request here,
        before any work (FAILED_PRECONDITION); a BEST_EFFORT one degrades."""
        plans = [
            StagePlan(
                Stage.LATE_INTERACTION, settings.late_interaction, settings.late_interaction_keep or top_k
            ),
            StagePlan(Stage.CROSS_ENCODER, settings.cross_encoder, settings.cross_encoder_keep or top_k),
        ]
        for plan in plans:
            if not plan.mode.enabled:
                continue
            if plan.stage == Stage.LATE_INTERACTION:
                self._plan_tokens(plan, settings, embedding_model, collection, tokens)
                continue
            try:
                plan.model = self.cross_encoder_model(settings.cross_encoder_model)
            except FailedPrecondition as exc:
                if plan.mode == StageMode.REQUIRED:
                    raise
                plan.unavailable = exc.message
        return plans

    def _plan_tokens(
        self,
        plan: StagePlan,
        settings: SearchSettings,
        embedding_model: str,
        collection: str,
        tokens: TokenPlan | None,
    ) -> None:
        """Late interaction runs from the collection's stored token vectors: they must exist, and be the
        asked-for model's."""
        asked = settings.late_interaction_model or embedding_model
        if tokens is None:
            unavailable = f"collection {collection!r} stores no token vectors; {ENABLE_HINT}"
        elif asked != tokens.model:
            unavailable = (
                f"collection {collection!r} stores the token vectors of {tokens.model!r}, not of {asked!r}; "
                f"ask for late_interaction_model {tokens.model!r} (or leave it unset)"
            )
        else:
            plan.model = StageModel(tokens.model, tokens.label, tokens.cache_id)
            plan.tokens = tokens
            return
        if plan.mode == StageMode.REQUIRED:
            raise FailedPrecondition(unavailable)
        plan.unavailable = unavailable
