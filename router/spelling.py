"""Typo repair before embedding: a misspelt task word is put back to the word the pool's cards use.

MiniLM's word pieces break on a typo ("atnonym" is read as `at ##non ##ym`, nothing like "antonym"), and the
query's score on its expert falls below the abstain threshold: most of the unseen-style prompts the router
missed were typos (docs/routing.md, "Unseen styles"). No threshold, expert vector or kNN variant measured
there recovers them; putting the word back does.

The words a typo is repaired to (`targets`) are the pool's own: the words of the cards' descriptions and
examples (4 letters or more) that the embedder's vocabulary holds as one word, or that the cards use at least
`MIN_CARD_USES` times (task words such as "antonym" that the vocabulary splits; a typo a card shows on purpose
is used once or twice and is not a target). A query word is repaired only when it is not a target and not a
whole word of the embedder's vocabulary (so real words are left alone), and one edit (a letter dropped, added,
changed or two letters swapped) turns it into a target; the target the cards use most wins.

Built from the cards when the index is built (per visible set: one tenant's card words never repair another
tenant's queries). Per query: a set lookup per word, and ~50 n candidate lookups for each unknown word of n
letters; the texts embedded are at most router.query.TAIL_CHARS characters, so the cost is bounded whatever
the prompt's length.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

WORD = re.compile(r"[A-Za-z]+")
MIN_LETTERS = 4  # shorter words have too many one-edit neighbours to repair safely
MIN_CARD_USES = 3
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def one_edit(word: str) -> set[str]:
    """Every string one edit away from `word`: a letter deleted, two neighbours swapped, one replaced or one
    inserted (Damerau-Levenshtein distance 1)."""
    out: set[str] = set()
    for i in range(len(word) + 1):
        a, b = word[:i], word[i:]
        if b:
            out.add(a + b[1:])
            for c in _LETTERS:
                out.add(a + c + b[1:])
        if len(b) > 1:
            out.add(a + b[1] + b[0] + b[2:])
        for c in _LETTERS:
            out.add(a + c + b)
    out.discard(word)
    return out


@dataclass(frozen=True)
class Speller:
    """Repairs words one edit away from a card word (see the module docstring)."""

    targets: dict[str, int] = field(default_factory=dict)  # word -> uses in the cards
    known: frozenset[str] = frozenset()  # whole words of the embedder's vocabulary: never repaired

    @classmethod
    def from_cards(cls, texts: Iterable[str], known: frozenset[str] = frozenset()) -> Speller:
        return cls.from_uses(word_uses(texts), known)

    @classmethod
    def from_uses(cls, uses: Counter[str], known: frozenset[str] = frozenset()) -> Speller:
        """From the cards' word counts (`word_uses`, summed over the cards)."""
        return cls({w: n for w, n in uses.items() if n >= MIN_CARD_USES or w in known}, known)

    def word(self, word: str) -> str:
        """`word` repaired, or unchanged."""
        low = word.lower()
        if len(low) < MIN_LETTERS or low in self.targets or low in self.known:
            return word
        found = [c for c in one_edit(low) if c in self.targets]
        if not found:
            return word
        return max(found, key=lambda c: (self.targets[c], c))  # the most used; ties by spelling (deterministic)

    def correct(self, text: str) -> str:
        """`text` with every repairable word repaired (the embedder is uncased: the repair is lower case)."""
        if not self.targets:
            return text
        return WORD.sub(lambda m: self.word(m.group(0)), text)


def word_uses(texts: Iterable[str]) -> Counter[str]:
    """How often each word of 4 letters or more occurs in `texts`, lower-cased (kept per card by the router, so a
    pool change counts only the cards that came in)."""
    return Counter(w for t in texts for w in WORD.findall(t.lower()) if len(w) >= MIN_LETTERS)


def vocabulary_words(tokenizer: object) -> frozenset[str]:
    """The whole alphabetic words of a tokenizer's vocabulary (empty for an embedder without one: every word
    that is not a target may then be repaired)."""
    vocab = getattr(tokenizer, "vocab", None)
    if not isinstance(vocab, dict):
        return frozenset()
    return frozenset(w for w in vocab if w.isalpha() and w.islower())
