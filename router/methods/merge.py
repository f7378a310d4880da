"""`merge`: the top-k experts, weighted by a softmax of their global scores, served as one composite LoRA.

Weights are rounded to `weight_step` so that nearby queries share a composite instead of building one each;
experts beyond the backend's max LoRA rank (the composite's rank is the sum of theirs) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.decision import ExpertChoice, RoutingParams
from router.index import ExpertIndex
from router.methods.base import MethodConfig, RoutingMethod, register


@dataclass(frozen=True)
class MergeConfig(MethodConfig):
    top_k: int = 2  # experts combined
    temperature: float = 0.05  # softmax temperature turning global scores into weights
    weight_step: float = 0.05  # weights are rounded to this step so composites are reused across queries


@register
class MergeRouting(RoutingMethod):
    name = "merge"
    config_type = MergeConfig
    config: MergeConfig

    def top_k(self, params: RoutingParams) -> int:
        return params.top_k or self.config.top_k

    def cache_params(self, params: RoutingParams) -> dict:
        return {"top_k": self.top_k(params)}

    def choose(self, scores: np.ndarray, index: ExpertIndex, params: RoutingParams) -> list[ExpertChoice]:
        top = index.top(scores, self.top_k(params))
        if not top or scores[top[0]] < index.threshold:
            return []
        # The composite's rank is the sum of the experts' ranks: keep the best experts that fit the backend.
        kept: list[int] = []
        rank = 0
        for i in top:
            rank += index.ranks.get(index.names[i], 0)
            if kept and rank > self.config.max_rank:
                break
            kept.append(i)
        top = kept
        step = self.config.weight_step
        chosen = scores[top]
        weights = np.exp((chosen - chosen.max()) / self.config.temperature)
        weights /= weights.sum()
        weights = np.round(weights / step) * step
        keep = [(i, w) for i, w in zip(top, weights) if w > 0]
        total = sum(w for _, w in keep)
        return [
            ExpertChoice(name=index.names[i], weight=round(float(w / total), 4), score=round(float(scores[i]), 6))
            for i, w in keep
        ]
