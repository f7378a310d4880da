"""The task suite behind the default expert library: data generators and exact scorers.

`TASKS` maps each task name to its `Task`. Held-in tasks get a trained expert, held-out tasks have none (they test
routing on unseen tasks), and `ood` holds general prompts whose right route is the base model.
"""

from __future__ import annotations

from training.tasks.base import SPLITS, Example, Item, Task, exact_match, normalize, split_of
from training.tasks.datetime_tasks import DATE_WEEKDAY, ISO_DATE, TIME_24H
from training.tasks.lexicon import ANTONYM, TRANSLATE_ES, TRANSLATE_FR, TRANSLATE_FR_EN
from training.tasks.numeric import (
    ARITHMETIC,
    LARGEST_NUMBER,
    NUMBER_WORDS,
    SORT_NUMBERS,
    UNIT_CONVERT,
    WORDS_TO_NUMBER,
)
from training.tasks.ood import OOD
from training.tasks.sql import TEXT_TO_SQL
from training.tasks.text_tasks import JSON_EXTRACT, SENTIMENT

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        ARITHMETIC, SORT_NUMBERS, ISO_DATE, SENTIMENT, JSON_EXTRACT, UNIT_CONVERT, TEXT_TO_SQL, TRANSLATE_FR,
        NUMBER_WORDS, ANTONYM,  # held in
        TIME_24H, WORDS_TO_NUMBER, TRANSLATE_ES, LARGEST_NUMBER, DATE_WEEKDAY, TRANSLATE_FR_EN,  # held out
        OOD,
    )
}
HELD_IN = tuple(name for name, t in TASKS.items() if t.kind == "held_in")
HELD_OUT = tuple(name for name, t in TASKS.items() if t.kind == "held_out")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = [
    "SPLITS", "TASKS", "HELD_IN", "HELD_OUT", "Example", "Item", "Task", "exact_match", "get_task", "normalize",
    "split_of",
]
