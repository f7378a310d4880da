"""The evaluation set: `n_per_task` test-split examples of every held-in, held-out and the ood task."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from training.tasks import HELD_IN, HELD_OUT, TASKS, get_task

EVAL_SEED = 7  # fixed: every run evaluates the same prompts
OOD_TASK = "ood"


@dataclass(frozen=True)
class EvalExample:
    task: str
    kind: str  # held_in | held_out | ood
    prompt: str
    answer: str
    phrasing_id: int
    test_only: bool  # phrased with a template never used in train/dev (task.test_only_ids)

    def to_json(self) -> dict:
        return asdict(self)


def default_tasks() -> list[str]:
    return [*HELD_IN, *HELD_OUT, *([OOD_TASK] if OOD_TASK in TASKS else [])]


def build_test_set(n_per_task: int, seed: int = EVAL_SEED, tasks: list[str] | None = None) -> list[EvalExample]:
    out: list[EvalExample] = []
    for name in tasks or default_tasks():
        task = get_task(name)
        test_only = task.test_only_ids
        for ex in task.generate("test", n_per_task, seed):
            out.append(EvalExample(task=name, kind=task.kind, prompt=ex.prompt, answer=ex.answer,
                                   phrasing_id=ex.phrasing_id, test_only=ex.phrasing_id in test_only))
    return out


def describe(examples: list[EvalExample]) -> dict:
    """Counts per task (all, test-only phrasings), for results.json."""
    n = Counter(e.task for e in examples)
    only = Counter(e.task for e in examples if e.test_only)
    kinds = {e.task: e.kind for e in examples}
    return {t: {"kind": kinds[t], "n": n[t], "n_test_only_phrasings": only.get(t, 0)} for t in n}
