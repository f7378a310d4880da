"""Phrasing families: a task's templates crossed with surface styles (wrappers, casing, typos, context, turns).

A *phrasing family* is one (template, style) pair; its id is `template_id * N_STYLES + style_id`. Styles change
only the template's own words, never the filled-in fields (numbers, words, reviews stay intact), so the gold
answer still holds. Each style draws its wrapper text from a small pool with the example's seeded rng.

Held-out phrasing: a family is *held out* (never used by the train or dev split) when its template is one of
the task's last `n_test_only` templates or its style is one of `HELD_OUT_STYLES`, whose wrapper texts appear in
no training style. With 10 templates (2 held out) and 9 styles (2 held out) a task has 90 families: 56 for
training, 34 held out.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

_FIELD = re.compile(r"(\{[^{}]*\})")


def _outside_fields(template: str, fn: Callable[[str], str]) -> str:
    """Apply `fn` to the template's text between `{field}` placeholders only."""
    return "".join(part if _FIELD.fullmatch(part) else fn(part) for part in _FIELD.split(template))


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _lower(template: str, rng: random.Random) -> str:
    out = _outside_fields(template, str.lower)
    return out.rstrip("?.!") if rng.random() < 0.5 else out


def _upper(template: str, rng: random.Random) -> str:
    return _outside_fields(template, str.upper)


def _typo_word(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def _typos(template: str, rng: random.Random) -> str:
    """One or two typos in template words of 4+ letters (never inside a placeholder)."""
    parts = _FIELD.split(template)
    spots = [(p, m.start()) for p, part in enumerate(parts) if not _FIELD.fullmatch(part)
             for m in re.finditer(r"[A-Za-z]{4,}", part)]
    if not spots:
        return template
    for p, start in sorted(rng.sample(spots, min(len(spots), rng.choice((1, 2)))), key=lambda s: -s[1]):
        word = re.match(r"[A-Za-z]+", parts[p][start:])[0]  # type: ignore[index]
        parts[p] = parts[p][:start] + _typo_word(word, rng) + parts[p][start + len(word):]
    return "".join(parts)


def _pick(pool: tuple[str, ...]) -> Callable[[str, random.Random], str]:
    def wrap(template: str, rng: random.Random) -> str:
        return rng.choice(pool).replace("<P>", template)

    return wrap


_GREETINGS = tuple(f"{g}<P>" for g in _escape(
    "Hi! |Hello, |Hey. |Please: |Quick question. |Good morning! |Hi there, can you help? |Help me out: "
).split("|"))
_SUFFIXES = tuple(f"<P>{s}" for s in _escape(
    " Answer with just the result.| Just the answer, please.| Thanks!| Reply briefly.| Be concise.|"
    " No explanation needed.| Thank you in advance.| Keep it short."
).split("|"))
_CONTEXT = tuple(f"{c} <P>" for c in _escape(
    "I'm doing my homework.|This is for a spreadsheet at work.|My colleague asked me this and I'm not sure.|"
    "I'm checking my notes before a meeting.|For a small script I'm writing:|Settling a bet with a friend.|"
    "Here's a task for you.|I'm practising for a quiz."
).split("|"))
_TURNS = (
    "User: <P>\nAssistant:", "Q: <P>\nA:", "Question: <P>\nAnswer:", "[user] <P>",
    "Human: <P>", "> <P>", "Task: <P>", "Input: <P>\nOutput:",
)
# Held out: none of these texts is used by a training style.
_AFTERWORDS = tuple(f"{a}" for a in (
    "<P> (Asking for a friend; keep it short.)", "Here's my question -- <P> -- thanks in advance!",
    "<P>\n\nOnly the answer, no working.", "Okay, next one. <P>", "Sorry to bother you again. <P> Cheers.",
    "<P> I'll copy your reply straight into a form.", "Me again! <P>", "Could you do this one for me? <P>",
))

STYLES: tuple[tuple[str, Callable[[str, random.Random], str]], ...] = (
    ("plain", lambda t, r: t),
    ("lower case", _lower),
    ("greeting", _pick(_GREETINGS)),
    ("suffix", _pick(_SUFFIXES)),
    ("context", _pick(_CONTEXT)),
    ("typos", _typos),
    ("chat turn", _pick(_TURNS)),
    # held out
    ("upper case", _upper),
    ("afterword", _pick(_AFTERWORDS)),
)
N_STYLES = len(STYLES)
HELD_OUT_STYLES = frozenset({N_STYLES - 2, N_STYLES - 1})


def family_id(template_id: int, style_id: int) -> int:
    return template_id * N_STYLES + style_id


def split_family(family: int) -> tuple[int, int]:
    """(template_id, style_id) of a family id."""
    return divmod(family, N_STYLES)


def styled(template: str, style_id: int, rng: random.Random) -> str:
    """`template` in style `style_id` (still a template: placeholders untouched, literal braces escaped)."""
    return STYLES[style_id][1](template, rng)
