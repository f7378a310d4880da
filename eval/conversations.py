"""Seeded multi-turn conversations from the task suite, for conversation-aware routing (`flock eval`).

A conversation opens with a held-in task prompt (or, one time in eight, a general ood prompt) and goes on for
1-3 more user turns, each one of:

* **follow-up**: the same task on a new item, phrased as a fragment that names no task ("And 'early'?",
  "Same for 12 * 7.", a bare value, ...): the right route is the conversation's current expert;
* **switch to a task**: a full prompt of another held-in task: its expert;
* **switch to general chat**: an ood prompt: the base model.

Follow-ups come only after a task turn. Splits: `dev` conversations draw dev-split items, train/dev phrasings,
the first `DEV_STYLES` follow-up styles and the general prompts of router/calibration.py that the router does
not hold as anchors (`DEV_GENERAL_TURNS`): what weights and margins may be fitted on. `test` conversations draw
test-split items, every phrasing, every style (the last `TEST_ONLY_STYLES` test-only) and training/tasks/ood.py's
prompts. Assistant turns carry the task's reference answer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from router.calibration import DEV_GENERAL_TURNS
from router.conversation import ConversationConfig, step
from router.decision import RoutingParams
from router.query import Query
from training.tasks import HELD_IN, TASKS
from training.tasks.base import Item
from training.tasks.ood import OOD_PROMPTS

CONVERSATION_SEED = 23

# The value a follow-up names: the item's own variable part, as a user would retype it.
VALUES: dict[str, Callable[[dict], str]] = {
    "arithmetic": lambda f: f"{f['a']} {f['sym']} {f['b']}",
    "sort_numbers": lambda f: f["csv"],
    "iso_date": lambda f: f["date"],
    "sentiment": lambda f: f"\"{f['review']}\"",
    "json_extract": lambda f: f"\"{f['text']}\"",
    "unit_convert": lambda f: f"{f['qty']} in {f['unit']}",
    "text_to_sql": lambda f: f["question"],
    "translate_fr": lambda f: f"'{f['word']}'",
    "number_words": lambda f: str(f["n"]),
    "antonym": lambda f: f"'{f['word']}'",
}

# Follow-up styles: {v} is the value. The last TEST_ONLY_STYLES are never used in dev conversations.
STYLES: tuple[str, ...] = (
    "And {v}?",
    "Same for {v}.",
    "Now {v}.",
    "What about {v}?",
    "{v}",
    "Do it again with {v}.",
    "How about {v}?",
    "Next one: {v}",
    "Also {v}, please.",
    "And for {v}?",
    "Okay, now {v}",
    # test only
    "Great. Another one: {v}",
    "Now try {v}",
    "thanks! and {v}?",
)
TEST_ONLY_STYLES = 3
DEV_STYLES = len(STYLES) - TEST_ONLY_STYLES


@dataclass(frozen=True)
class Turn:
    kind: str  # first | follow_up | switch_task | switch_ood
    user: str
    expected: str | None  # expert name, None for the base model
    task: str  # the task the turn asks for ("ood" for general chat)
    style: int | None = None  # follow-ups: index into STYLES
    answer: str = ""


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]

    def messages(self, upto: int) -> list[dict]:
        """The chat messages a client sends for turn `upto` (0-based): every earlier exchange, then that turn."""
        out: list[dict] = []
        for t in self.turns[:upto]:
            out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer or "OK."}]
        out.append({"role": "user", "content": self.turns[upto].user})
        return out

    def to_json(self) -> dict:
        return {"turns": [asdict(t) for t in self.turns]}


def _item(task: str, split: str, rng: random.Random) -> Item:
    t = TASKS[task]
    for _ in range(10_000):
        item = t.sampler(rng)
        if t.in_split(item, split, rng):
            return item
    raise RuntimeError(f"no {split} item for {task}")


def _task_turn(task: str, split: str, rng: random.Random, kind: str) -> Turn:
    t = TASKS[task]
    item = _item(task, split, rng)
    pid = rng.choice(t.phrasing_ids("test" if split == "test" else "train"))
    return Turn(kind=kind, user=t.render(pid, item.fields, rng), expected=task, task=task,
                answer=item.answer)


def _follow_up(task: str, split: str, rng: random.Random) -> Turn:
    item = _item(task, split, rng)
    style = rng.randrange(len(STYLES) if split == "test" else DEV_STYLES)
    return Turn(kind="follow_up", user=STYLES[style].format(v=VALUES[task](item.fields)), expected=task, task=task,
                style=style, answer=item.answer)


def build_conversations(n: int, split: str = "test", seed: int = CONVERSATION_SEED) -> list[Conversation]:
    """`n` conversations of 2-4 user turns; the same for the same (n, split, seed)."""
    if split not in ("dev", "test"):
        raise ValueError("split must be 'dev' or 'test'")
    rng = random.Random(f"conversations|{split}|{seed}")
    general = OOD_PROMPTS if split == "test" else DEV_GENERAL_TURNS
    tasks = list(HELD_IN)
    out = []
    for c in range(n):
        if c % 8 == 7:
            turns = [Turn(kind="first", user=rng.choice(general), expected=None, task="ood", answer="Sure.")]
        else:
            turns = [_task_turn(tasks[c % len(tasks)], split, rng, "first")]
        for _ in range(rng.randint(1, 3)):
            current = turns[-1].task if turns[-1].expected is not None else None
            r = rng.random()
            if current is not None and r < 0.6:
                turns.append(_follow_up(current, split, rng))
            elif r < 0.8 or current is None:
                other = rng.choice([t for t in tasks if t != current])
                turns.append(_task_turn(other, split, rng, "switch_task"))
            else:
                turns.append(Turn(kind="switch_ood", user=rng.choice(general), expected=None, task="ood",
                                  answer="Sure."))
        out.append(Conversation(tuple(turns)))
    return out


def conversation_summary(records: list[dict]) -> dict:
    """Accuracy by turn kind from records {kind, expected, top, style}; switches = task and ood switches."""

    def acc(rs: list[dict]) -> float | None:
        return sum(r["top"] == r["expected"] for r in rs) / len(rs) if rs else None

    by_kind = {k: [r for r in records if r["kind"] == k] for k in ("first", "follow_up", "switch_task", "switch_ood")}
    switches = by_kind["switch_task"] + by_kind["switch_ood"]
    styles = sorted({r["style"] for r in by_kind["follow_up"]})
    return {
        "follow_up": acc(by_kind["follow_up"]),
        "follow_up_test_only_styles": acc([r for r in by_kind["follow_up"] if r["style"] >= DEV_STYLES]),
        "switch": acc(switches),
        "switch_task": acc(by_kind["switch_task"]),
        "switch_ood": acc(by_kind["switch_ood"]),
        "first": acc(by_kind["first"]),
        "follow_up_by_style": {STYLES[s]: acc([r for r in by_kind["follow_up"] if r["style"] == s]) for s in styles},
        "n": {k: len(v) for k, v in by_kind.items()},
    }


# The keep weights served before 2026-12-03 (fitted with L2 0.1 on dev conversations without typo repair, before
# the task suite's 90 phrasing families): measured beside the served ones.
PREVIOUS_KEEP: tuple[tuple[float, float, float, float], float] = ((8.8, -7.43, 8.98, 7.89), -3.2)


# --- measuring ------------------------------------------------------------------------------------------
def mechanisms(served: ConversationConfig) -> dict[str, ConversationConfig]:
    """The mechanisms measured side by side: today's single-turn routing, the history blended into the query
    embedding, keeping the previous turn's expert unless the last message clears a switch margin, that plus
    the follow-up test with the weights served before, and the served one (the follow-up test for turns that
    name no task)."""
    return {
        "last message only": ConversationConfig(mechanism="last"),
        f"blend (w={served.blend_weight:g})": ConversationConfig(mechanism="blend", blend_weight=served.blend_weight),
        "sticky, margin only": replace(served, keep_weights=(0.0, 0.0, 0.0, 0.0), keep_bias=1.0),
        "sticky + follow-up test, weights before (L2 0.1)": replace(served, keep_weights=PREVIOUS_KEEP[0],
                                                                   keep_bias=PREVIOUS_KEEP[1]),
        "sticky + follow-up test (served)": served,
    }


async def route_conversations(router, conversations: list[Conversation], config: ConversationConfig,
                              params: RoutingParams | None = None) -> list[dict]:
    """Every turn after the first routed through `Router.route` as the gateway routes a chat (`service.query`:
    the last user message with the earlier user turns), under `config`. One record per turn."""
    saved = router.conversation
    router.conversation = config
    records = []
    try:
        for c in conversations:
            for k, t in enumerate(c.turns):
                t0 = time.perf_counter()
                result = await router.route(Query(t.user, [x.user for x in c.turns[:k]]), params)
                ms = (time.perf_counter() - t0) * 1000
                experts = result.decision.experts
                records.append({"kind": t.kind, "expected": t.expected, "task": t.task, "style": t.style,
                                "top": experts[0].name if experts else None, "ms": ms,
                                "stages_ms": {s: v * 1000 for s, v in result.stages.items()}})
    finally:
        router.conversation = saved
    return records


async def evaluate_conversations(router, n: int, *, split: str = "test", seed: int = CONVERSATION_SEED) -> dict:
    """Follow-up and switch accuracy of every mechanism on `n` seeded conversations of `split`."""
    conversations = build_conversations(n, split, seed)
    out: dict = {"n_conversations": n, "split": split, "seed": seed,
                 "turns": sum(len(c.turns) for c in conversations), "mechanisms": {}}
    served = router.conversation
    for name, config in mechanisms(served).items():
        router.forget_embeddings()  # each mechanism embeds every turn once, as the replica serving the chats would
        records = await route_conversations(router, conversations, config)
        summary = conversation_summary(records)
        later = [r["ms"] for r in records if r["kind"] != "first"]  # earlier turns remembered, the last one new
        summary["route_ms_p50"] = float(np.percentile(later, 50)) if later else None
        summary["route_ms_p95"] = float(np.percentile(later, 95)) if later else None
        summary["config"] = config.cache_params()
        out["mechanisms"][name] = summary
    out["served"] = served.cache_params()
    out["history_cost"] = await history_cost(router, conversations)
    out["examples"] = [c.to_json() for c in conversations[:3]]
    return out


async def history_cost(router, conversations: list[Conversation]) -> dict:
    """What reading the earlier turns costs, Router.route ms p50/p95 over the conversations' last turns (3 or
    4 turns): `single` the last message alone; `warm` the chat after its earlier turns were routed on this
    replica (their embeddings remembered: only the last message is embedded); `cold` the chat on a replica
    that never saw it (every turn embedded, together in one micro-batch)."""
    times: dict[str, list[float]] = {"single": [], "warm": [], "cold": []}
    for c in conversations:
        if len(c.turns) < 3:
            continue
        users = [t.user for t in c.turns]
        query = Query(users[-1], users[:-1])
        for kind in ("single", "warm", "cold"):
            router.forget_embeddings()
            if kind == "warm":
                for k in range(len(users) - 1):
                    await router.route(Query(users[k], users[:k]))
            t0 = time.perf_counter()
            await router.route(users[-1] if kind == "single" else query)
            times[kind].append((time.perf_counter() - t0) * 1000)
    return {k: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "n": len(v)}
            for k, v in times.items() if v}


# --- fitting the follow-up test (dev conversations only) ----------------------------------------------
def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 0.1, steps: int = 50) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method (weights, bias); `l2` on the weights only."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w[:-1], float(w[-1])


async def fit_follow_up_test(router, n: int = 300, seed: int = CONVERSATION_SEED,
                             base: ConversationConfig | None = None, l2: float = 1.0,
                             use: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> ConversationConfig:
    """The keep weights of the sticky mechanism, fitted on `n` dev conversations: at every turn the switch
    rules leave open (after a turn routed to an expert, the turn's own best is not that expert or is below the
    threshold, and it clears no switch margin), one sample (the four cosines, follow-up or not)."""
    from router.conversation import keep_features

    base = base or router.conversation
    conversations = build_conversations(n, "dev", seed)
    texts = sorted({t.user for c in conversations for t in c.turns})
    index, anchors = router.index, router.anchors
    # Embedded as the router embeds them: typos repaired (router/spelling.py).
    vecs = dict(zip(texts, await router.embedder.embed_many([index.texts(((t,),))[0][0] for t in texts])))
    xs, ys = [], []
    always = replace(base, keep_weights=(0.0, 0.0, 0.0, 0.0), keep_bias=1.0)
    for c in conversations:
        state = previous = None
        for t in c.turns:
            v = vecs[t.user]
            own = index.vectors @ v
            if state is not None and previous is not None:
                p = int(np.argmax(state))
                best = int(np.argmax(own))
                open_ = (state[p] >= index.threshold and not (best == p and own[best] >= index.threshold)
                         and not (own[best] >= index.threshold + base.switch_margin
                                  and own[best] - own[p] >= base.switch_gap))
                if open_:
                    xs.append(keep_features(own, p, v, previous, anchors))
                    ys.append(1.0 if t.kind == "follow_up" else 0.0)
                state = step(state, own, v, previous, index.threshold, anchors, always)
            else:
                state = own
            previous = v
    mask = np.array(use)
    w_used, b = _logistic(np.array(xs, dtype=np.float64)[:, mask], np.array(ys), l2)
    w = np.zeros(len(mask))
    w[mask] = w_used
    return replace(base, keep_weights=tuple(round(float(x), 2) for x in w), keep_bias=round(b, 2))
