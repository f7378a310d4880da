"""Shared machinery of the task suite: examples, splits, phrasings and the default scorer.

A task draws *items* (the underlying thing to solve: a number triple, a date, a word) from a seeded
`random.Random` and renders each as a user prompt through one of its phrasing templates. Items are assigned to
a split by a stable hash of their key, so train, dev and test never share an item when the item space is large;
tasks over a small fixed lexicon set `split_items=False` and share items across splits (said where they do), and
`shared_item` marks the few items of a large space that are vocabulary every split needs.
Each prompt comes from a *phrasing family*: one of the task's templates in one of the surface styles of
`training.tasks.phrasing` (wrappers, casing, typos, context, chat turns). Families with one of the last
`n_test_only` templates or a held-out style are reserved for the test split; train and dev only use the others.
The test split draws from all families, so `Example.phrasing_id in task.test_only_ids` picks out unseen
phrasings, and `task.generate("test", n, seed, held_out_only=True)` draws from the held-out families alone.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from training.tasks.phrasing import HELD_OUT_STYLES, N_STYLES, split_family, styled

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
    # False: templates are used as written (one family per template, no styles).
    styles: bool = True
    # Items every split draws although split_items is on: a vocabulary the task cannot be learned without
    # (number words 0-19: "twelve" cannot be inferred from the other numbers, so holding it out tests nothing).
    shared_item: Callable[[Item], bool] | None = None

    def in_split(self, item: Item, split: str, rng: random.Random) -> bool:
        """Whether `split` may draw `item`. A shared item passes as often as a split's share of the keys (a
        fresh draw each time), so shared items keep the sampler's proportions in every split."""
        if not self.split_items:
            return True
        if self.shared_item is not None and self.shared_item(item):
            lo, hi = _SPLIT_CUTS[split]
            return lo <= rng.randrange(100) < hi
        return split_of(self.name, item.key) == split

    @property
    def n_styles(self) -> int:
        return N_STYLES if self.styles else 1

    @property
    def n_families(self) -> int:
        return len(self.phrasings) * self.n_styles

    def is_held_out(self, family: int) -> bool:
        """True when the family's template is test-only or its style is a held-out style."""
        template, style = split_family(family) if self.styles else (family, 0)
        return template >= len(self.phrasings) - self.n_test_only or (self.styles and style in HELD_OUT_STYLES)

    @property
    def test_only_ids(self) -> frozenset[int]:
        return frozenset(f for f in range(self.n_families) if self.is_held_out(f))

    def phrasing_ids(self, split: str, held_out_only: bool = False) -> list[int]:
        if held_out_only:
            return sorted(self.test_only_ids)
        if split == "test":
            return list(range(self.n_families))
        return [f for f in range(self.n_families) if not self.is_held_out(f)]

    def render(self, family: int, fields: dict, rng: random.Random) -> str:
        """The prompt of phrasing family `family` with `fields` filled in."""
        if not self.styles:
            return self.phrasings[family].format(**fields)
        template, style = split_family(family)
        return styled(self.phrasings[template], style, rng).format(**fields)

    def generate(self, split: str, n: int, seed: int, held_out_only: bool = False) -> list[Example]:
        """`n` examples of `split`, the same for the same (split, n, seed); distinct prompts where possible.

        `held_out_only` (test split only): draw from the held-out phrasing families alone."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if held_out_only and split != "test":
            raise ValueError("held-out phrasings belong to the test split only")
        tag = "|held_out" if held_out_only else ""
        rng = random.Random(f"{self.name}|{split}|{seed}{tag}")
        ids = self.phrasing_ids(split, held_out_only)
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        max_attempts = 200 * n + 10_000
        while len(out) < n:
            attempts += 1
            if attempts > max_attempts * 2:
                raise RuntimeError(f"task {self.name}: cannot draw {n} {split} examples")
            item = self.sampler(rng)
            if not self.in_split(item, split, rng):
                continue
            pid = rng.choice(ids)
            prompt = self.render(pid, item.fields, rng)
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
