"""`global`: the single expert whose description is closest to the query; the base model below threshold."""

from __future__ import annotations

import numpy as np

from router.decision import ExpertChoice, RoutingParams
from router.index import ExpertIndex
from router.methods.base import RoutingMethod, register


@register
class GlobalRouting(RoutingMethod):
    name = "global"

    def choose(self, scores: np.ndarray, index: ExpertIndex, params: RoutingParams) -> list[ExpertChoice]:
        top = index.top(scores, 1)
        if not top or scores[top[0]] < index.threshold:
            return []
        return [ExpertChoice(name=index.names[top[0]], weight=1.0, score=round(float(scores[top[0]]), 6))]
