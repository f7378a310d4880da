"""Conversation-aware routing: which scores decide the last turn of a chat, given the user turns before it.

Stateless: everything comes from the messages the client sends (the last `HISTORY_TURNS` earlier user turns),
so any replica, before or after a restart, decides the same. The turns are folded oldest first; the state is
the score vector that decides the conversation so far (the one that chose its expert):

* the first turn read, and any turn after one the base model answered, is routed on its own;
* a turn whose own best expert is the conversation's expert is routed on its own (same expert, fresh scores);
* a turn that clearly names another task (its own best score clears the abstain threshold by `switch_margin`
  and the conversation's expert by `switch_gap`) is routed on its own: a switch;
* otherwise the turn is a follow-up or a switch to general chat, told apart by a logistic score of four
  cosines: the turn against the conversation's expert, its nearest general prompt (router/calibration.py),
  its nearest generic follow-up phrase (ditto) and the previous user turn. A follow-up keeps the state (the
  conversation's expert answers); anything else is routed on its own.

`mechanism="blend"` (the previous turns' embeddings added to the last one, weight `blend_weight` per turn of
distance) and `"last"` (today's single-turn routing) are kept for `flock eval`, which measures all three side by
side on seeded conversations; the weights and margins were fitted there on dev conversations only
(docs/routing.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Mechanism = Literal["sticky", "blend", "last"]


@dataclass(frozen=True)
class ConversationConfig:
    mechanism: Mechanism = "sticky"
    switch_margin: float = 0.05  # a switch's own best score clears the abstain threshold by this much...
    switch_gap: float = 0.20  # ...and the conversation's expert's score by this much
    # Follow-up vs general chat: z = w · (score on the conversation's expert, nearest general prompt,
    # nearest follow-up phrase, cosine with the previous user turn) + bias; z > 0 keeps the expert.
    # Fitted by eval.conversations.fit_follow_up_test on dev conversations (typos repaired, L2 1.0); margins and
    # the L2 weight chosen there (docs/routing.md).
    keep_weights: tuple[float, float, float, float] = (4.13, -2.54, 3.68, 3.18)
    keep_bias: float = -1.38
    blend_weight: float = 0.5

    def cache_params(self) -> dict:
        """What a conversation's decision depends on besides its turns (part of the decision-cache key)."""
        if self.mechanism == "last":
            return {"conv": "last"}
        if self.mechanism == "blend":
            return {"conv": "blend", "w": self.blend_weight}
        return {"conv": "sticky", "m": self.switch_margin, "g": self.switch_gap, "k": list(self.keep_weights),
                "b": self.keep_bias}


@dataclass(frozen=True)
class Anchors:
    """Reference embeddings the follow-up test compares a turn with (embedded with the index)."""

    general: np.ndarray  # (n, dim) general prompts: router.calibration.OUT_OF_DOMAIN_PROMPTS
    follow_ups: np.ndarray  # (m, dim) generic follow-up phrases: router.calibration.FOLLOW_UP_PHRASES


def nearest(anchors: np.ndarray, vector: np.ndarray) -> float:
    """Cosine of `vector` with its nearest anchor, an exact copy excluded (a calibration prompt sent as a query
    must not find itself)."""
    if len(anchors) == 0:
        return 0.0
    sims = anchors @ vector
    sims = sims[sims < 0.9999]
    return float(sims.max()) if len(sims) else 0.0


def keep_features(own: np.ndarray, expert: int, vector: np.ndarray, previous: np.ndarray,
                  anchors: Anchors) -> np.ndarray:
    return np.array([own[expert], nearest(anchors.general, vector), nearest(anchors.follow_ups, vector),
                     float(vector @ previous)], dtype=np.float32)


def fold(vectors: np.ndarray, scores: np.ndarray, threshold: float, anchors: Anchors,
         config: ConversationConfig) -> np.ndarray:
    """The score vector that decides the last user turn. `vectors`: unit embeddings of the user turns, oldest
    first; `scores`: each turn's own expert scores (turns x experts)."""
    if len(scores) == 0:
        return np.zeros(scores.shape[1:], dtype=np.float32)
    if config.mechanism == "last" or len(scores) == 1 or scores.shape[1] == 0:
        return scores[-1]
    if config.mechanism == "blend":  # weights of the scores: cosine is linear in the (unnormalised) query
        w = config.blend_weight ** np.arange(len(scores) - 1, -1, -1, dtype=np.float32)
        v = (w[:, None] * vectors).sum(axis=0)
        return (w[:, None] * scores).sum(axis=0) / max(float(np.linalg.norm(v)), 1e-12)
    state = scores[0]
    for i in range(1, len(scores)):
        state = step(state, scores[i], vectors[i], vectors[i - 1], threshold, anchors, config)
    return state


def step(state: np.ndarray, own: np.ndarray, vector: np.ndarray, previous: np.ndarray, threshold: float,
         anchors: Anchors, config: ConversationConfig) -> np.ndarray:
    """One turn of the sticky fold: the conversation's scores so far, this turn's own scores -> the new state."""
    p = int(np.argmax(state))
    if state[p] < threshold:  # the base model answered the conversation so far: nothing to keep
        return own
    best = int(np.argmax(own))
    if best == p and own[best] >= threshold:
        return own
    if own[best] >= threshold + config.switch_margin and own[best] - own[p] >= config.switch_gap:
        return own
    z = float(np.dot(config.keep_weights, keep_features(own, p, vector, previous, anchors))) + config.keep_bias
    return state if z > 0 else own
