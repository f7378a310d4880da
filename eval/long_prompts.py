"""Routing of long prompts: task prompts (and general prompts) after 1k, 8k and 32k characters of unrelated text.

Two layouts: the context, a blank line, then the prompt (a pasted document, then the request), and the context
and the prompt in one paragraph. Measures, per context size, top-1 on held-in task prompts and the base-model
share of general prompts for what the router embeds of a long message (router/query.py): today's whole text
(the embedder reads its first 256 word pieces), tails of several lengths alone, and tails with their last
sentence (the served `routing_texts`, the better score of the two); and the served router's routing time
(Router.route, no cache, no remembered embedding: embed + score), p50 and p95.
"""

from __future__ import annotations

import random
import time

import numpy as np

from eval.testset import build_test_set
from router.decision import RoutingParams
from router.query import TAIL_CHARS, routing_text, routing_texts
from training.tasks import HELD_IN

SIZES = (0, 1_000, 8_000, 32_000)
TAILS = (128, 192, 256, 384)
LONG_SEED = 31

# Unrelated context: meeting notes, a travel log, a history paragraph. No task of the suite, no question.
CONTEXT_SENTENCES: tuple[str, ...] = (
    "The quarterly planning meeting ran long because the facilities team presented three options for the move.",
    "Most of the staff prefer the building near the river, although parking there is limited.",
    "We walked along the harbour in the early evening and watched the fishing boats come in.",
    "The old lighthouse was built in the nineteenth century and still guides ships past the reef.",
    "Marta suggested that we revisit the budget once the supplier confirms the delivery schedule.",
    "In the afternoon the rain cleared and the hills behind the village turned a deep green.",
    "The museum's new wing holds a collection of maps drawn by sailors who charted the northern coast.",
    "Several volunteers stayed behind to stack the chairs and sweep the hall after the concert.",
    "The committee agreed to publish the minutes on the intranet by the end of the week.",
    "Our guide explained how the monastery's library survived two fires and a flood.",
    "The bakery on the corner opens at six, and by seven there is usually a queue outside.",
    "During the long winter the villagers repaired nets, carved wood and told stories by the fire.",
    "The project timeline slipped by two weeks after the design review raised concerns about accessibility.",
    "A narrow path leads from the station through the orchards to the edge of the forest.",
    "The town council debated the new bicycle lanes for most of the evening.",
    "Our cabin had a small stove, two bunk beds and a window facing the lake.",
    "The records show that the bridge was rebuilt after the great storm and widened a decade later.",
    "Everyone agreed the onboarding sessions should be shorter and include more hands-on practice.",
    "The garden behind the library is planted with lavender, rosemary and a few old apple trees.",
    "On the second day we took the ferry to the island and hiked up to the ruined fort.",
)


def context(n_chars: int, rng: random.Random) -> str:
    """Unrelated prose of about `n_chars` characters, whole sentences."""
    out: list[str] = []
    length = 0
    while length < n_chars:
        s = rng.choice(CONTEXT_SENTENCES)
        out.append(s)
        length += len(s) + 1
    return " ".join(out)


LAYOUTS = {"blank line": "\n\n", "same paragraph": " "}


def long_prompts(n_per_task: int, size: int, seed: int = LONG_SEED,
                 separator: str = "\n\n") -> list[tuple[str, str | None, str]]:
    """(prompt, expected expert or None, task): held-in test prompts and ood prompts after `size` characters of
    unrelated text, then `separator`."""
    rng = random.Random(f"long|{size}|{seed}")
    out = []
    for ex in build_test_set(n_per_task, tasks=[*HELD_IN, "ood"]):
        prefix = context(size, rng) + separator if size else ""
        out.append((prefix + ex.prompt, ex.task if ex.task != "ood" else None, ex.task))
    return out


def _accuracy(tops: list[str | None], items: list[tuple[str, str | None, str]]) -> tuple[float, float]:
    task = [t == e for t, (_, e, k) in zip(tops, items) if k != "ood"]
    ood = [t is None for t, (_, _, k) in zip(tops, items) if k == "ood"]
    return float(np.mean(task)) if task else float("nan"), float(np.mean(ood)) if ood else float("nan")


async def evaluate_long_prompts(router, n_per_task: int = 10, sizes: tuple[int, ...] = SIZES) -> dict:
    method = router.method("global")
    params = RoutingParams(mode="global")
    index = router.index
    out: dict = {"sizes": list(sizes), "n_per_task": n_per_task, "served_tail_chars": TAIL_CHARS, "by_layout": {}}

    async def tops_of(candidates: list[tuple[str, ...]]) -> list[str | None]:
        flat = list(dict.fromkeys(t for c in candidates for t in c))
        vecs = dict(zip(flat, await router.embedder.embed_many(flat)))
        tops = []
        for c in candidates:
            scores = np.max([index.scores(vecs[t]) for t in c], axis=0)
            d = router.decide_scores(scores, method, params, index)
            tops.append(d.experts[0].name if d.experts else None)
        return tops

    timed: dict[tuple[str, int], list[str]] = {}
    for layout, separator in LAYOUTS.items():
        by_size: dict = {}
        for size in sizes:
            if size == 0 and layout != "blank line":
                continue
            items = long_prompts(n_per_task, size, separator=separator)
            prompts = [p for p, _, _ in items]
            row: dict = {"n": len(items), "chars_p50": int(np.median([len(p) for p in prompts]))}
            variants: dict[str, list[tuple[str, ...]]] = {"whole text (head 256 word pieces)": [(p,) for p in prompts]}
            variants.update({f"tail {n}": [(routing_text(p, n),) for p in prompts] for n in TAILS})
            variants.update({f"tail {n} + last sentence": [routing_texts(p, n) for p in prompts] for n in TAILS})
            for name, candidates in variants.items():
                top1, ood = _accuracy(await tops_of(candidates), items)
                row[name] = {"top1_held_in": top1, "ood_abstain": ood}
            by_size[str(size)] = row
            timed[(layout, size)] = prompts
            row["_items"] = items
        out["by_layout"][layout] = by_size
    # The served path, timed: Router.route on every prompt, no embedding remembered from before, the sizes
    # interleaved so that load from elsewhere on the machine falls on all of them alike.
    times: dict[tuple[str, int], list[float]] = {k: [] for k in timed}
    tops: dict[tuple[str, int], list[str | None]] = {k: [] for k in timed}
    router.forget_embeddings()
    for i in range(max(len(v) for v in timed.values())):
        for k, prompts in timed.items():
            t0 = time.perf_counter()
            result = await router.route(prompts[i], params)
            times[k].append((time.perf_counter() - t0) * 1000)
            tops[k].append(result.decision.experts[0].name if result.decision.experts else None)
    # Today's cost for comparison: one embedding of the whole text (the first 10 prompts of each size).
    for (layout, size), prompts in timed.items():
        row = out["by_layout"][layout][str(size)]
        whole = []
        for p in prompts[:10]:
            t0 = time.perf_counter()
            await router.embedder.embed(p)
            whole.append((time.perf_counter() - t0) * 1000)
        top1, ood = _accuracy(tops[(layout, size)], row.pop("_items"))
        row["served"] = {"top1_held_in": top1, "ood_abstain": ood,
                         "route_ms_p50": float(np.percentile(times[(layout, size)], 50)),
                         "route_ms_p95": float(np.percentile(times[(layout, size)], 95)),
                         "whole_text_embed_ms_p50": float(np.percentile(whole, 50))}
    return out
