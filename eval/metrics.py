"""The arithmetic of the benchmark, on plain records (dicts), so it is tested without any model or server.

A *routing record* has: task, kind, test_only, top (the top expert's name, None when the base model answers)
and optionally latency_ms. A *generation record* adds correct (bool), error (str or None) and gateway_ms.
Means over tasks are macro means (each task weighs the same); the ood task is never part of an accuracy mean
(its scorer accepts anything: it only measures abstaining).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

BASE = "base"  # the label of "no expert" in distributions


def mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def p50(values: Iterable[float | None]) -> float | None:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.percentile(np.asarray(values), 50)) if values else None


def top_expert(experts: list[dict]) -> str | None:
    """The expert with the largest weight (the first on a tie); None for an empty list (the base model)."""
    if not experts:
        return None
    best = experts[0]
    for e in experts[1:]:
        if (e.get("weight") or 0) > (best.get("weight") or 0):
            best = e
    return best["name"]


def per_task_accuracy(records: list[dict]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        hits[r["task"]].append(bool(r["correct"]))
    return {t: sum(v) / len(v) for t, v in hits.items()}


def tasks_mean(per_task: dict[str, float], tasks: Iterable[str]) -> float | None:
    return mean(per_task[t] for t in tasks if t in per_task)


def pct_of_oracle(value: float | None, oracle: float | None) -> float | None:
    """`value` as a percentage of the oracle's (None when either is missing or the oracle scores 0)."""
    if value is None or oracle is None or oracle <= 0:
        return None
    return 100.0 * value / oracle


def abstain_rate(records: list[dict]) -> float | None:
    """Share of records the router sent to the base model."""
    return mean(1.0 if r["top"] is None else 0.0 for r in records) if records else None


def top1_accuracy(records: list[dict]) -> float | None:
    """Share of records whose top expert is the record's own task."""
    return mean(1.0 if r["top"] == r["task"] else 0.0 for r in records) if records else None


def distribution(labels: Iterable[str | None]) -> dict[str, float]:
    """{label: share}, largest first; None counts as 'base'."""
    counts = Counter(BASE if x is None else x for x in labels)
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))} if total else {}


def routing_summary(records: list[dict], held_in: Iterable[str], held_out: Iterable[str]) -> dict:
    """Top-1 on held-in tasks (all, test-only phrasings, seen phrasings, per task), false abstains on held-in,
    ood abstain rate, where each held-out task goes, and the latency p50 when records carry latency_ms."""
    held_in, held_out = set(held_in), set(held_out)
    hi = [r for r in records if r["task"] in held_in]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    return {
        "top1_held_in": top1_accuracy(hi),
        "top1_held_in_test_only": top1_accuracy([r for r in hi if r["test_only"]]),
        "top1_held_in_seen_phrasings": top1_accuracy([r for r in hi if not r["test_only"]]),
        "top1_per_task": {t: top1_accuracy(by_task[t]) for t in sorted(held_in) if by_task.get(t)},
        "held_in_abstain": abstain_rate(hi),
        "ood_abstain": abstain_rate([r for r in records if r["kind"] == "ood"]),
        "held_out_distribution": {t: distribution(r["top"] for r in by_task[t])
                                  for t in sorted(held_out) if by_task.get(t)},
        "held_out_abstain": abstain_rate([r for r in records if r["task"] in held_out]),
        "latency_ms_p50": p50(r.get("latency_ms") for r in records),
        "n": len(records),
    }


def mode_summary(records: list[dict], held_in: Iterable[str], held_out: Iterable[str], *, routed: bool) -> dict:
    """Everything one generation mode scores: per-task accuracy, held-in / held-out means, routing (routed
    modes only) and the gateway's own time before forwarding (x-flock-gateway-ms) p50."""
    held_in, held_out = list(held_in), list(held_out)
    scored = [r for r in records if r["kind"] != "ood"]
    per_task = per_task_accuracy(scored)
    hi_only = [r for r in scored if r["task"] in held_in and r["test_only"]]
    hi_seen = [r for r in scored if r["task"] in held_in and not r["test_only"]]
    only_per_task = per_task_accuracy(hi_only)
    out = {
        "accuracy_per_task": per_task,
        # The two goals per expert: its test split in training's phrasing families, and families never trained on.
        "held_in_by_phrasing": {"seen": per_task_accuracy(hi_seen), "test_only": only_per_task,
                                "n_seen": dict(Counter(r["task"] for r in hi_seen)),
                                "n_test_only": dict(Counter(r["task"] for r in hi_only))},
        "held_in_mean": tasks_mean(per_task, held_in),
        "held_in_mean_test_only_phrasings": tasks_mean(only_per_task, held_in) if hi_only else None,
        "held_out_mean": tasks_mean(per_task, held_out),
        "gateway_ms_p50": p50(r.get("gateway_ms") for r in records),
        "errors": sum(1 for r in records if r.get("error")),
        "cached": sum(1 for r in records if r.get("cached")),
        "n": len(records),
        "routing": routing_summary(records, held_in, held_out) if routed else None,
    }
    return out


def add_relative(summaries: dict[str, dict]) -> None:
    """% of oracle (held-in mean / oracle held-in mean) and held-out mean minus base, for every mode."""
    oracle = (summaries.get("oracle") or {}).get("held_in_mean")
    base_out = (summaries.get("base") or {}).get("held_out_mean")
    for s in summaries.values():
        s["pct_of_oracle"] = pct_of_oracle(s.get("held_in_mean"), oracle)
        ho = s.get("held_out_mean")
        s["held_out_vs_base"] = None if ho is None or base_out is None else ho - base_out
