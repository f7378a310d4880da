"""The expert index: one unit vector per expert (its description embedding) and the abstain threshold."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_THRESHOLD = 0.3  # used when the pool's cards carry no examples to calibrate on


@dataclass
class ExpertIndex:
    names: list[str]
    vectors: np.ndarray  # (experts, dim), L2-normalised rows
    threshold: float = DEFAULT_THRESHOLD
    pool_version: str = ""
    ranks: dict[str, int] = field(default_factory=dict)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Cosine similarity of a unit query vector with every expert."""
        if not self.names:
            return np.zeros(0, dtype=np.float32)
        return self.vectors @ query

    def top(self, scores: np.ndarray, k: int) -> list[int]:
        k = min(k, len(scores))
        if k <= 0:
            return []
        idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return sorted(idx.tolist(), key=lambda i: -scores[i])


def calibrate_threshold(in_domain_best: np.ndarray, out_domain_best: np.ndarray) -> float:
    """Threshold on the best expert score that best separates in-domain from out-of-domain queries.

    Scans the midpoints between sorted scores and keeps the one with the best balanced accuracy (the two
    sides weigh the same however many prompts each has); ties go to the widest gap. Without in-domain
    examples there is nothing to calibrate and the default is kept.
    """
    if len(in_domain_best) == 0 or len(out_domain_best) == 0:
        return DEFAULT_THRESHOLD
    values = np.sort(np.concatenate([in_domain_best, out_domain_best]))
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    best, best_key = DEFAULT_THRESHOLD, (-1.0, -1.0)
    for t in candidates:
        correct = float((in_domain_best >= t).mean() + (out_domain_best < t).mean())
        margin = float(min(np.abs(values - t)))
        if (correct, margin) > best_key:
            best, best_key = float(t), (correct, margin)
    return best
