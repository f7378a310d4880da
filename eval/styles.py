"""A second single-turn test set in styles no card shows, and abstain calibrations compared on it.

Prompts of the held-in tasks and general prompts, wrapped: a greeting or "Quick question:" before, "thanks!"
after, the request inside a longer sentence, quotes, a typo, all lower case, a preamble about the asker. Dev
prompts (dev-split items, train/dev phrasings, the calibration prompts of router/calibration.py) get the
`DEV_WRAPPERS`; test prompts (test split, training/tasks/ood.py's prompts) the `TEST_WRAPPERS`, none shared.

Calibrations, all on the served index's expert vectors and the same query embeddings; every fitted one is
fitted on the wrapped dev prompts, never on test:

* `Router.route, one prompt at a time (served)`: the served path itself;
* `global threshold + typo repair (served, batch-embedded)`: the same decision rule on the prompts embedded
  in batches: typos repaired to the cards' words (router/spelling.py), then the threshold calibrated on the
  cards' examples vs general prompts;
* `global threshold, no typo repair (before)`: the same threshold on the prompts as written;
* `dev threshold + typo repair`: typos repaired, one threshold refitted on dev;
* `global threshold (dev)`: one threshold refitted on dev;
* `per-expert thresholds (dev)`: a threshold per expert, on the queries it is the best expert of;
* `threshold + top-2 margin (dev)`: abstain also when the best two experts are within a margin;
* `kNN (k=5)`: the nearest card examples and general prompts vote (no fitting);
* `logistic (dev)`: a softmax regression over the expert scores, the base model as one more class;
* `kNN expert, dev threshold`: abstain as `global threshold (dev)`, else the expert the nearest card examples
  vote for.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from router.calibration import OUT_OF_DOMAIN_PROMPTS
from router.index import calibrate_threshold
from training.tasks import HELD_IN, TASKS
from training.tasks.ood import OOD_PROMPTS

STYLE_SEED = 41


def _lower(p: str) -> str:
    return p.lower().rstrip("?.!")


def _typo(p: str, rng: random.Random) -> str:
    words = p.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not idx:
        return p
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


Wrapper = Callable[[str, random.Random], str]
DEV_WRAPPERS: dict[str, Wrapper] = {
    "hi there": lambda p, r: f"Hi there! {p}",
    "please": lambda p, r: f"{p} Please.",
    "could you": lambda p, r: f"Could you help me with this? {p}",
    "lower case": lambda p, r: _lower(p),
    "typo": _typo,
    "context": lambda p, r: f"I'm preparing for an exam tomorrow. {p}",
}
TEST_WRAPPERS: dict[str, Wrapper] = {
    "quick question": lambda p, r: f"Quick question: {p}",
    "thanks": lambda p, r: f"{p.rstrip('.')}, thanks!",
    "in a sentence": lambda p, r: f"My friend and I disagree on this one, so tell me: {p} What do you say?",
    "quotes": lambda p, r: f"\"{p}\"",
    "all lower case, typo": lambda p, r: _typo(_lower(p), r),
    "preamble": lambda p, r: f"I'm working on a side project over the weekend and got stuck. {p}",
}


def styled_set(split: str, n_per_task: int, seed: int = STYLE_SEED) -> list[tuple[str, str | None, str]]:
    """(prompt, expected expert or None, wrapper) for every held-in task and general prompts."""
    wrappers = TEST_WRAPPERS if split == "test" else DEV_WRAPPERS
    rng = random.Random(f"styles|{split}|{seed}")
    out: list[tuple[str, str | None, str]] = []
    for task in HELD_IN:
        for ex in TASKS[task].generate(split, n_per_task, seed):
            name = rng.choice(list(wrappers))
            out.append((wrappers[name](ex.prompt, rng), task, name))
    general = list(OOD_PROMPTS if split == "test" else OUT_OF_DOMAIN_PROMPTS)
    for i in range(n_per_task * 2):
        name = rng.choice(list(wrappers))
        out.append((wrappers[name](general[i % len(general)], rng), None, name))
    return out


# --- calibrations -----------------------------------------------------------------------------------------
def _best(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1)
    return order[:, 0], np.take_along_axis(scores, order[:, :2], axis=1)


def _balanced(pred: list[int | None], expected: list[int | None]) -> float:
    task = [p == e for p, e in zip(pred, expected) if e is not None]
    ood = [p is None for p, e in zip(pred, expected) if e is None]
    return (float(np.mean(task)) if task else 0.0) + (float(np.mean(ood)) if ood else 0.0)


def predict_threshold(scores: np.ndarray, threshold: float | np.ndarray, margin: float = 0.0) -> list[int | None]:
    top, two = _best(scores)
    t = threshold[top] if isinstance(threshold, np.ndarray) else np.full(len(top), threshold)
    gap = two[:, 0] - (two[:, 1] if two.shape[1] > 1 else 0)
    return [int(i) if s >= th and g >= margin else None for i, s, th, g in zip(top, two[:, 0], t, gap)]


def fit_per_expert(scores: np.ndarray, expected: list[int | None], fallback: float) -> np.ndarray:
    top, two = _best(scores)
    out = np.full(scores.shape[1], fallback)
    for e in range(scores.shape[1]):
        mine = top == e
        pos = two[mine & np.array([x == e for x in expected]), 0]
        neg = two[mine & np.array([x is None for x in expected]), 0]
        if len(pos) and len(neg):
            out[e] = calibrate_threshold(pos, neg)
    return out


def fit_margin(scores: np.ndarray, expected: list[int | None], threshold: float) -> float:
    best, best_m = -1.0, 0.0
    for m in np.arange(0.0, 0.21, 0.01):
        acc = _balanced(predict_threshold(scores, threshold, float(m)), expected)
        if acc > best + 1e-9:
            best, best_m = acc, float(m)
    return best_m


def knn_predict(queries: np.ndarray, points: np.ndarray, labels: list[int | None], k: int = 5) -> list[int | None]:
    sims = queries @ points.T
    out: list[int | None] = []
    for row in sims:
        nearest = np.argsort(-row)[:k]
        votes: dict[int | None, float] = {}
        for j in nearest:
            votes[labels[j]] = votes.get(labels[j], 0.0) + float(row[j])
        out.append(max(votes, key=lambda x: votes[x]))
    return out


def fit_softmax(scores: np.ndarray, expected: list[int | None], steps: int = 500, lr: float = 0.5,
                l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression from the expert scores to expert-or-base (class E = the base model)."""
    n, e = scores.shape
    y = np.array([x if x is not None else e for x in expected])
    w, b = np.zeros((e, e + 1)), np.zeros(e + 1)
    onehot = np.eye(e + 1)[y]
    for _ in range(steps):
        z = scores @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = p - onehot
        w -= lr * (scores.T @ g / n + l2 * w)
        b -= lr * g.mean(axis=0)
    return w, b


def predict_softmax(scores: np.ndarray, w: np.ndarray, b: np.ndarray) -> list[int | None]:
    cls = np.argmax(scores @ w + b, axis=1)
    return [int(c) if c < scores.shape[1] else None for c in cls]


async def evaluate_styles(router, n_per_task: int = 20) -> dict:
    index = router.index
    names = list(index.names)
    pos = {n: i for i, n in enumerate(names)}
    sets = {split: styled_set(split, n_per_task) for split in ("dev", "test")}
    emb = {split: await router.embedder.embed_many([p for p, _, _ in s]) for split, s in sets.items()}
    scores = {split: emb[split] @ index.vectors.T for split in sets}
    speller = index.speller
    repaired = {split: [speller.correct(p) if speller is not None else p for p, _, _ in s] for split, s in sets.items()}
    fixed = {split: (await router.embedder.embed_many(repaired[split])) @ index.vectors.T for split in sets}
    expected = {split: [pos.get(e) if e is not None else None for _, e, _ in s] for split, s in sets.items()}
    # kNN points: the cards' examples (their expert) and the calibration general prompts (the base model).
    examples = [(x, pos[e.name]) for e in router.pool.experts() if e.name in pos for x in e.card.examples]
    points = await router.embedder.embed_many([x for x, _ in examples] + list(OUT_OF_DOMAIN_PROMPTS))
    point_labels: list[int | None] = [i for _, i in examples] + [None] * len(OUT_OF_DOMAIN_PROMPTS)

    dev_s, dev_y = scores["dev"], expected["dev"]
    top, two = _best(dev_s)
    dev_pos = two[[y is not None and t == y for t, y in zip(top, dev_y)], 0]
    dev_neg = two[[y is None for y in dev_y], 0]
    global_dev = float(calibrate_threshold(dev_pos, dev_neg))
    top_f, two_f = _best(fixed["dev"])
    fixed_dev = float(calibrate_threshold(two_f[[y is not None and t == y for t, y in zip(top_f, dev_y)], 0],
                                          two_f[[y is None for y in dev_y], 0]))
    per_expert = fit_per_expert(dev_s, dev_y, global_dev)
    margin = fit_margin(dev_s, dev_y, global_dev)
    w, b = fit_softmax(dev_s, dev_y)
    # The served path itself, one prompt at a time through Router.route (the int8 embedder quantises activations
    # per batch, so a prompt embedded alone scores a little differently from the same prompt in a batch).
    routed: dict[str, list[int | None]] = {split: [] for split in sets}
    for split, items in sets.items():
        for p, _, _ in items:
            experts = (await router.route(p)).decision.experts
            routed[split].append(pos.get(experts[0].name) if experts else None)
    methods: dict[str, Callable[[str], list[int | None]]] = {
        "Router.route, one prompt at a time (served)": lambda s: routed[s],
        "global threshold + typo repair (served, batch-embedded)": lambda s: predict_threshold(fixed[s],
                                                                                              index.threshold),
        "global threshold, no typo repair (before)": lambda s: predict_threshold(scores[s], index.threshold),
        "dev threshold + typo repair": lambda s: predict_threshold(fixed[s], fixed_dev),
        "global threshold (dev)": lambda s: predict_threshold(scores[s], global_dev),
        "per-expert thresholds (dev)": lambda s: predict_threshold(scores[s], per_expert),
        "threshold + top-2 margin (dev)": lambda s: predict_threshold(scores[s], global_dev, margin),
        "kNN (k=5)": lambda s: knn_predict(emb[s], points, point_labels),
        "logistic (dev)": lambda s: predict_softmax(scores[s], w, b),
        "kNN expert, dev threshold": lambda s: [
            None if t is None else k for t, k in zip(predict_threshold(scores[s], global_dev),
                                                     knn_predict(emb[s], points[:len(examples)],
                                                                 point_labels[:len(examples)]))],
    }
    out: dict = {"n_per_task": n_per_task, "fitted": {"global_dev": global_dev, "repaired_dev": fixed_dev,
                                                      "margin": margin,
                                                      "per_expert": dict(zip(names, per_expert.tolist()))},
                 "methods": {}}
    for name, predict in methods.items():
        row = {}
        for split in ("dev", "test"):
            pred = predict(split)
            y = expected[split]
            task = [p == e for p, e in zip(pred, y) if e is not None]
            ood = [p is None for p, e in zip(pred, y) if e is None]
            row[split] = {"top1_held_in": float(np.mean(task)), "ood_abstain": float(np.mean(ood))}
        out["methods"][name] = row
    by_wrapper = {}
    served = routed["test"]
    for wname in TEST_WRAPPERS:
        idx = [i for i, (_, e, wr) in enumerate(sets["test"]) if wr == wname and e is not None]
        by_wrapper[wname] = float(np.mean([served[i] == expected["test"][i] for i in idx])) if idx else None
    out["served_top1_by_test_wrapper"] = by_wrapper
    out["repaired"] = {split: sum(p != r for (p, _, _), r in zip(sets[split], repaired[split])) for split in sets}
    return out
