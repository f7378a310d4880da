"""The expert index: one unit vector per expert and the abstain threshold.

An expert's vector is either its description's embedding or the centroid of its card's example queries
(`EXPERT_VECTORS`); `flock eval` measures both side by side, and the centroid routes far better on the default
library (see eval/results.md), so it is the default wherever a card carries examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from router.spelling import Speller

DEFAULT_THRESHOLD = 0.3  # used when the pool's cards carry no examples to calibrate on
EXPERT_VECTORS = ("centroid", "description")


def unit_rows(m: np.ndarray) -> np.ndarray:
    return (m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def expert_vectors(kind: str, descriptions: np.ndarray, example_vectors: list[np.ndarray]) -> np.ndarray:
    """One unit row per expert: `description` embeddings, or for `centroid` the normalised mean of the expert's
    description and example embeddings (the description counts as one more example: with a handful of examples
    it keeps the centroid from hugging their wording; with the library's 32 it weighs 1/33)."""
    if kind not in EXPERT_VECTORS:
        raise ValueError(f"expert vector kind must be one of {EXPERT_VECTORS}, not {kind!r}")
    if kind == "description" or len(descriptions) == 0:
        return descriptions.astype(np.float32)
    rows = [np.concatenate([d[None], ex]).mean(axis=0) for d, ex in zip(descriptions, example_vectors)]
    return unit_rows(np.stack(rows))


@dataclass
class ExpertIndex:
    names: list[str]
    vectors: np.ndarray  # (experts, dim), L2-normalised rows
    threshold: float = DEFAULT_THRESHOLD
    pool_version: str = ""
    ranks: dict[str, int] = field(default_factory=dict)
    gates: dict[str, frozenset[str]] = field(default_factory=dict)  # local gate kinds each expert has stored
    speller: Speller | None = None  # typo repair to these experts' card words (router/spelling.py); None: off

    def texts(self, turns: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        """What is embedded of each turn's texts under this index: its typos repaired (router/spelling.py)."""
        if self.speller is None:
            return turns
        return tuple(tuple(self.speller.correct(t) for t in turn) for turn in turns)

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


def in_domain_best(kind: str, descriptions: np.ndarray, example_vectors: list[np.ndarray],
                   vectors: np.ndarray) -> np.ndarray:
    """Best expert score of every card example, for calibrating the abstain threshold. With centroids, an
    example is scored against its own expert's centroid computed WITHOUT it (leave-one-out): otherwise every
    example sits inside its own centroid, scores higher than unseen queries of the task ever will, and pushes
    the threshold up until real queries abstain."""
    rows = []
    for j, ex in enumerate(example_vectors):
        if not len(ex):
            continue
        scores = ex @ vectors.T  # (n_j, experts)
        if kind == "centroid":
            total = descriptions[j] + ex.sum(axis=0)
            loo = unit_rows(total[None] - ex)  # (n_j, dim): centroid of the others and the description
            scores[:, j] = (ex * loo).sum(axis=1)
        rows.append(scores.max(axis=1))
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.float32)


def own_scores(kind: str, description: np.ndarray, examples: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Each example's score against its own expert: with centroids, the centroid computed WITHOUT it (see
    in_domain_best); with descriptions, the description's vector."""
    if not len(examples):
        return np.zeros(0, dtype=np.float32)
    if kind == "centroid":
        loo = unit_rows((description + examples.sum(axis=0))[None] - examples)
        return (examples * loo).sum(axis=1)
    return examples @ vector


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
    # Every candidate at once (sorted sides and binary search): O(n log n) where a loop over the candidates is
    # O(n^2), some 40 s at 1,000 experts of 32 examples. The same figures as that loop, to the last bit.
    ins, outs = np.sort(in_domain_best), np.sort(out_domain_best)
    in_at_or_above = len(ins) - np.searchsorted(ins, candidates, side="left")
    out_below = np.searchsorted(outs, candidates, side="left")
    correct = in_at_or_above / len(ins) + out_below / len(outs)
    if len(values) > 1:  # a midpoint's nearest values are the two it lies between
        margin = np.minimum(np.abs(values[:-1] - candidates), np.abs(values[1:] - candidates))
    else:
        margin = np.zeros(1)
    best = np.flatnonzero(correct == correct.max())
    return float(candidates[best[np.argmax(margin[best])]])
