"""Word-level tasks over fixed lexicons: translate_fr (held in), translate_es and translate_fr_en (held out),
antonym (held in).

The lexicons are small (a few hundred entries), so these tasks set `split_items=False`: train, dev and test
share words and differ only in phrasing (the last two phrasings are test-only). A dev/test score therefore
measures recall of trained words under new phrasings, not generalisation to unseen words.
"""

from __future__ import annotations

import random
from pathlib import Path

from training.tasks.base import Item, Task, normalize

DATA = Path(__file__).resolve().parent / "data"


def _rows(name: str) -> list[str]:
    """Non-empty, non-comment lines of a data file."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


LEXICON: tuple[tuple[str, str, str], ...] = tuple(
    tuple(line.split("|")) for line in _rows("translations.txt")  # type: ignore[misc]
)
EN_FR = {en: fr for en, fr, _ in LEXICON}
EN_ES = {en: es for en, _, es in LEXICON}

# French to English: only French words with a single English source, so the answer is unambiguous.
_FR_COUNT: dict[str, int] = {}
for _en, _fr, _ in LEXICON:
    _FR_COUNT[_fr] = _FR_COUNT.get(_fr, 0) + 1
FR_EN = {fr: en for en, fr, _ in LEXICON if _FR_COUNT[fr] == 1}

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = tuple(
    tuple(line.split()) for line in _rows("antonyms.txt")  # type: ignore[misc]
)
ANTONYMS = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}


def _fold(text: str) -> str:
    return normalize(text).replace("œ", "oe").replace("’", "'")


def _score_word(prediction: str, answer: str) -> bool:
    got = _fold(prediction)
    want = _fold(answer)
    # Tolerate a leading article ("le chien", "el perro", "to sell").
    for article in ("le ", "la ", "l'", "les ", "un ", "une ", "el ", "los ", "las ", "una ", "to "):
        if got.startswith(article) and not want.startswith(article) and got[len(article):].strip() == want:
            return True
    return got == want


def _lexicon_sampler(mapping: dict[str, str]):
    words = sorted(mapping)

    def sample(rng: random.Random) -> Item:
        word = rng.choice(words)
        return Item(key=word, fields={"word": word}, answer=mapping[word])

    return sample


TRANSLATE_FR = Task(
    name="translate_fr",
    kind="held_in",
    description="Convert an English word to its French translation.",
    phrasings=(
        "Translate '{word}' into French.",
        "What is the French word for {word}?",
        "How do you say {word} in French?",
        "French translation of '{word}'?",
        "Give the French for: {word}",
        "English to French: {word}",
        "Translate this word to French: {word}",
        "In French, '{word}' is what?",
        # test only
        "I'm writing to a pen pal in Paris. Which French word means '{word}'?",
        "Render the English word '{word}' in French.",
    ),
    sampler=_lexicon_sampler(EN_FR),
    scorer=_score_word,
    split_items=False,
)

TRANSLATE_ES = Task(
    name="translate_es",
    kind="held_out",
    description="Convert an English word to its Spanish translation.",
    phrasings=(
        "Translate '{word}' into Spanish.",
        "What is the Spanish word for {word}?",
        "How do you say {word} in Spanish?",
        "Spanish translation of '{word}'?",
        "Give the Spanish for: {word}",
        "English to Spanish: {word}",
        "Translate this word to Spanish: {word}",
        "In Spanish, '{word}' is what?",
        # test only
        "I'm visiting Madrid next week. Which Spanish word means '{word}'?",
        "Render the English word '{word}' in Spanish.",
    ),
    sampler=_lexicon_sampler(EN_ES),
    scorer=_score_word,
    split_items=False,
)

ANTONYM = Task(
    name="antonym",
    kind="held_in",
    description="Convert an English word to its antonym, the word with the opposite meaning.",
    phrasings=(
        "What is the opposite of '{word}'?",
        "Give an antonym for {word}.",
        "Antonym of {word}?",
        "What word means the opposite of {word}?",
        "Opposite: {word}",
        "Name the antonym of '{word}'.",
        "Which word is the opposite of {word}?",
        "Word: {word}. Give its antonym.",
        # test only
        "I'm writing a poem and need the reverse of '{word}'. What word is its opposite?",
        "Flip the meaning of '{word}': what is its antonym?",
    ),
    sampler=_lexicon_sampler(ANTONYMS),
    scorer=_score_word,
    split_items=False,
)

TRANSLATE_FR_EN = Task(
    name="translate_fr_en",
    kind="held_out",
    description="Convert a French word to its English translation.",
    phrasings=(
        "Translate the French word '{word}' into English.",
        "What is the English word for the French '{word}'?",
        "What does the French word {word} mean in English?",
        "French to English: {word}",
        "Give the English for the French word: {word}",
        "English translation of the French '{word}'?",
        "Translate this French word to English: {word}",
        "In English, the French word '{word}' is what?",
        # test only
        "My pen pal in Paris wrote '{word}'. What is that in English?",
        "Render the French word '{word}' in English.",
    ),
    sampler=_lexicon_sampler(FR_EN),
    scorer=_score_word,
    split_items=False,
)
