"""Per-token modes: `phatgoose`, `arrow` and `glider`. The global router picks the candidates; the engine mixes
them per token and per layer (adapters/gated_composite.py, adapters/engine/plugin.py, adapters/engine/gating.py).

Candidates are the experts with the needed gate signals, best global score first, as many as fit the backend's
LoRA rank (a gated composite has rank Σ r_e + C + 1). Like `global` and `merge`, these modes answer with the base
model when the best global score is below the abstain threshold: the local gates have no "none of us" option.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.decision import ExpertChoice, GateParams, RoutingParams
from router.index import ExpertIndex
from router.methods.base import MethodConfig, RoutingMethod, register


@dataclass(frozen=True)
class GateConfig(MethodConfig):
    top_k: int = 2  # experts mixed per token
    alpha: float = 0.0  # weight of the global score (glider): s = local + α·global
    max_candidates: int = 16  # candidates in one gated composite
    # glider: the top expert answers alone (no gate) when its global score beats the runner-up's by at least
    # this; the per-token mix is kept for the queries the global router is unsure of. None: always mix.
    solo_margin: float | None = None


class GatedRouting(RoutingMethod):
    config_type = GateConfig
    config: GateConfig
    local: str = "phatgoose"
    uses_global: bool = True

    def alpha(self, params: RoutingParams) -> float:
        """α, to two significant digits: every α a request may send is one more composite to build, so nearby
        values share one (3.14 and 3.1 are the same gate for any purpose a client has)."""
        if not self.uses_global:
            return 0.0
        return float(f"{float(params.alpha if params.alpha is not None else self.config.alpha):.2g}")

    def top_k(self, params: RoutingParams) -> int:
        return params.top_k or self.config.top_k

    def solo_margin(self, params: RoutingParams) -> float | None:
        if not self.uses_global:
            return None
        return params.solo_margin if params.solo_margin is not None else self.config.solo_margin

    def cache_params(self, params: RoutingParams) -> dict:
        out = {"alpha": self.alpha(params), "top_k": self.top_k(params)}
        margin = self.solo_margin(params)
        return out if margin is None else {**out, "solo_margin": margin}

    def choose(self, scores: np.ndarray, index: ExpertIndex, params: RoutingParams) -> list[ExpertChoice]:
        order = [i for i in index.top(scores, len(scores)) if self.local in index.gates.get(index.names[i], ())]
        if not order or scores[index.top(scores, 1)[0]] < index.threshold:
            return []
        margin = self.solo_margin(params)
        if margin is not None and (len(order) == 1 or scores[order[0]] - scores[order[1]] >= margin):
            # Sure: one expert, served as itself. The margin is taken over every expert with gates, not only
            # the kept candidates, so a runner-up that did not fit the rank budget still counts.
            return [ExpertChoice(name=index.names[order[0]], weight=1.0, score=round(float(scores[order[0]]), 6))]
        kept: list[int] = []
        rank = 1
        for i in order[: self.config.max_candidates]:
            rank += index.ranks.get(index.names[i], 0) + 1
            if kept and rank > self.config.max_rank:
                break
            kept.append(i)
        prior = np.exp(self.alpha(params) * (scores[kept] - scores[kept].max()))
        prior /= prior.sum()
        return [ExpertChoice(name=index.names[i], weight=round(float(w), 4), score=round(float(scores[i]), 6))
                for i, w in zip(kept, prior)]

    def gate(self, params: RoutingParams) -> GateParams:
        return GateParams(local=self.local, alpha=self.alpha(params), top_k=self.top_k(params))


@register
class PhatgooseRouting(GatedRouting):
    name = "phatgoose"
    local = "phatgoose"
    uses_global = False


@register
class ArrowRouting(GatedRouting):
    name = "arrow"
    local = "arrow"
    uses_global = False


@register
class GliderRouting(GatedRouting):
    name = "glider"
    local = "phatgoose"
    uses_global = True
