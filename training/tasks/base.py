"""Shared machinery of the task suite: examples, splits, phrasings and the default scorer.

A task draws *items* (the underlying thing to solve: a number triple, a date, a word) from a seeded
`random.Random` and renders each as a user prompt through one of its phrasing templates. Items are assigned to
a split by a stable hash of their key, so train, dev and test never share an item when the item space is large;
tasks over a small fixed lexicon set `split_items=False` and share items across splits (said where they do).
The last `n_test_only` phrasings are reserved for the test split; train and dev only use the others. The test
split draws from all phrasings, so `Example.phrasing_id in task.test_only_ids` picks out unseen phrasings.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SPLITS = ("train", "dev", "test")
Kind = Literal["held_in", "held_out", "ood"]

# Fraction of the item space (by key hash, out of 100) that goes to each split.
_SPLIT_CUTS = {"train": (0, 80), "dev": (80, 90), "test": (90, 100)}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    phrasing_id: int


@dataclass(frozen=True)
class Item:
    """One underlying instance: `key` decides its split, `fields` fill a phrasing template."""

    key: str
    fields: dict
    answer: str


def normalize(text: str) -> str:
    """Strip, keep the first line, lowercase, drop trailing periods/whitespace and wrapping quotes."""
    text = text.strip()
    text = text.splitlines()[0] if text else ""
    text = text.strip().lower().rstrip(". \t")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"`":
        text = text[1:-1].strip()
    return text


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def split_of(task_name: str, key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{task_name}|{key}".encode()).digest()[:8], "big") % 100
    for split, (lo, hi) in _SPLIT_CUTS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    description: str
    phrasings: tuple[str, ...]
    sampler: Callable[[random.Random], Item]
    scorer: Callable[[str, str], bool] = exact_match
    n_test_only: int = 2
    # False for small fixed lexicons: every split draws from all items (only the phrasings differ).
    split_items: bool = True

    @property
    def test_only_ids(self) -> frozenset[int]:
        return frozenset(range(len(self.phrasings) - self.n_test_only, len(self.phrasings)))

    def phrasing_ids(self, split: str) -> range:
        if split == "test":
            return range(len(self.phrasings))
        return range(len(self.phrasings) - self.n_test_only)

    def generate(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`, the same for the same (split, n, seed); distinct prompts where possible."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        ids = self.phrasing_ids(split)
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        max_attempts = 200 * n + 10_000
        while len(out) < n:
            attempts += 1
            if attempts > max_attempts * 2:
                raise RuntimeError(f"task {self.name}: cannot draw {n} {split} examples")
            item = self.sampler(rng)
            if self.split_items and split_of(self.name, item.key) != split:
                continue
            pid = rng.choice(ids)
            prompt = self.phrasings[pid].format(**item.fields)
            # Prefer distinct prompts; after many tries (small item spaces) allow repeats.
            if prompt in seen and attempts < max_attempts:
                continue
            seen.add(prompt)
            out.append(Example(prompt=prompt, answer=item.answer, phrasing_id=pid))
        return out

    def score(self, prediction: str, answer: str) -> bool:
        try:
            return bool(self.scorer(prediction, answer))
        except Exception:  # a scorer must never crash an evaluation on odd model output
            return False


_NUM_RE = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$|^[+-]?\.\d+$")


def parse_number(text: str):
    """A Decimal from '2,500', '2500.0', '-3', '.5'; None if `text` is not a plain number."""
    from decimal import Decimal, InvalidOperation

    text = text.strip()
    if not _NUM_RE.match(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def format_number(value) -> str:
    """Canonical number text: no exponent, no thousands separators, no trailing zeros ('2500', '0.25')."""
    from decimal import Decimal

    d = Decimal(value)
    if d == d.to_integral_value():
        return str(int(d))
    text = format(d.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
