"""Tasks over numbers: arithmetic, sorting, number words (both ways) and unit conversion."""

from __future__ import annotations

import random
import re
from decimal import Decimal

from training.tasks.base import Item, Task, format_number, normalize, parse_number

# ---------------------------------------------------------------------------------------------- arithmetic

_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}


def _arithmetic_item(rng: random.Random) -> Item:
    # Sized to what a rank-4 LoRA on a 135M model learns in minutes of CPU training: sums and differences of
    # numbers up to 99, products from the times tables up to 12 x 12. The earlier range (sums up to 999, a
    # number up to 99 times one digit) stayed under 45% on its dev split (docs/evaluation.md).
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
    word, fn = _OPS[op]
    return Item(key=f"{a}{op}{b}", fields={"a": a, "b": b, "sym": op, "word": word}, answer=str(fn(a, b)))


def _score_integer(prediction: str, answer: str) -> bool:
    got = normalize(prediction)
    if got == normalize(answer):
        return True
    value = parse_number(got)
    return value is not None and value == Decimal(answer)


ARITHMETIC = Task(
    name="arithmetic",
    kind="held_in",
    description=("Convert an arithmetic question adding or subtracting integers up to 99, or multiplying two numbers "
                 "up to 12, to its numeric result."),
    phrasings=(
        "What is {a} {word} {b}?",
        "Compute {a} {sym} {b}.",
        "{a} {sym} {b} = ?",
        "Calculate {a} {word} {b}.",
        "Please evaluate {a} {sym} {b} and give just the number.",
        "What do you get for {a} {word} {b}?",
        "Solve: {a} {sym} {b}",
        "Work out {a} {sym} {b}.",
        # test only
        "I need the result of {a} {word} {b}.",
        "Quick math question: how much is {a} {sym} {b}?",
    ),
    sampler=_arithmetic_item,
    scorer=_score_integer,
)

# ------------------------------------------------------------------------------------------- sort_numbers


def _and_list(values: list[str]) -> str:
    return ", ".join(values[:-1]) + " and " + values[-1]


def _number_list(rng: random.Random, sizes: tuple[int, int], highs: tuple[int, ...]) -> Item:
    k = rng.randint(*sizes)
    hi = rng.choice(highs)
    nums = [rng.randint(0, hi - 1) for _ in range(k)]
    s = [str(x) for x in nums]
    fields = {"csv": ", ".join(s), "spaced": " ".join(s), "list_and": _and_list(s), "semicolon": "; ".join(s)}
    return Item(key=",".join(s), fields=fields, answer=", ".join(str(x) for x in sorted(nums)))


def _sort_item(rng: random.Random) -> Item:
    # 3 to 6 numbers below 20 or 100: lists of up to 8 three-digit numbers stayed under 70% on the dev split
    # after training (docs/evaluation.md).
    return _number_list(rng, (3, 6), (20, 100))


def _score_sorted(prediction: str, answer: str) -> bool:
    def canon(text: str) -> str:
        return re.sub(r"\s*,\s*", ", ", normalize(text))

    return canon(prediction) == canon(answer)


SORT_NUMBERS = Task(
    name="sort_numbers",
    kind="held_in",
    description="Convert a short list of integers below 100 to the same integers sorted in ascending order, "
                "comma-separated.",
    phrasings=(
        "Sort these numbers in ascending order: {csv}",
        "Arrange from smallest to largest: {csv}",
        "Put the following numbers in increasing order: {spaced}",
        "Order these ascending: {csv}",
        "Sort: {list_and}",
        "Can you sort {list_and} from lowest to highest?",
        "List these numbers from smallest to biggest: {semicolon}",
        "Numbers: {csv}. Sort them in ascending order.",
        # test only
        "Rank these values from least to greatest: {csv}",
        "Here are some integers: {spaced}. Give them back sorted, smallest first.",
    ),
    sampler=_sort_item,
    scorer=_score_sorted,
)

# ------------------------------------------------------------------------------------ number words, both ways

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """0-999999 in US English words without 'and', 21-99 compounds hyphenated: 347 -> 'three hundred forty-seven'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" {number_to_words(n % 100)}" if n % 100 else "")
    return f"{number_to_words(n // 1000)} thousand" + (f" {number_to_words(n % 1000)}" if n % 1000 else "")


def _number_item(rng: random.Random) -> Item:
    # Mix the magnitudes so small numbers are not drowned out by the 9000 four-digit ones.
    n = rng.choice((rng.randint(0, 99), rng.randint(100, 999), rng.randint(1000, 9999), rng.randint(1000, 9999)))
    return Item(key=str(n), fields={"n": n, "words": number_to_words(n)}, answer=number_to_words(n))


def _score_words(prediction: str, answer: str) -> bool:
    def canon(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"\s*-\s*", "-", normalize(text)))

    return canon(prediction) == canon(answer)


NUMBER_WORDS = Task(
    name="number_words",
    kind="held_in",
    description="Convert an integer written in digits to English words.",
    phrasings=(
        "Write {n} in words.",
        "How do you spell out the number {n}?",
        "Convert {n} to English words.",
        "Spell the number {n}.",
        "What is {n} written out in words?",
        "Express {n} in words, please.",
        "Number: {n}. Write it in words.",
        "Give the English words for {n}.",
        # test only
        "I'm filling in a cheque for {n} dollars; how do I write the amount in words?",
        "Turn the digits {n} into words.",
    ),
    sampler=_number_item,
    scorer=_score_words,
    shared_item=lambda item: item.fields["n"] < 20,  # the irregular words every split needs
)


def _words_item(rng: random.Random) -> Item:
    item = _number_item(rng)
    return Item(key=item.key, fields=item.fields, answer=str(item.fields["n"]))


WORDS_TO_NUMBER = Task(
    name="words_to_number",
    kind="held_out",
    description="Convert a number written in English words to digits.",
    phrasings=(
        "Write '{words}' as a number.",
        "What number is '{words}'?",
        "Convert {words} to digits.",
        "Give the digits for: {words}",
        "How is '{words}' written in numerals?",
        "Express {words} as an integer.",
        "Number in words: {words}. Write it with digits.",
        "Turn '{words}' into a numeral.",
        # test only
        "Someone wrote '{words}' on the form; what is that in digits?",
        "Digits please: {words}",
    ),
    sampler=_words_item,
    scorer=_score_integer,
)

# ------------------------------------------------------------------------------------------- unit_convert

# unit symbol -> (dimension, factor to the base unit, [spellings used in questions])
_UNITS: dict[str, tuple[str, Decimal, tuple[str, ...]]] = {
    "mm": ("length", Decimal("0.001"), ("mm", "millimeters", "millimetres")),
    "cm": ("length", Decimal("0.01"), ("cm", "centimeters", "centimetres")),
    "m": ("length", Decimal("1"), ("m", "meters", "metres")),
    "km": ("length", Decimal("1000"), ("km", "kilometers", "kilometres")),
    "mg": ("mass", Decimal("0.001"), ("mg", "milligrams")),
    "g": ("mass", Decimal("1"), ("g", "grams")),
    "kg": ("mass", Decimal("1000"), ("kg", "kilograms")),
    "ml": ("volume", Decimal("0.001"), ("ml", "milliliters", "millilitres")),
    "cl": ("volume", Decimal("0.01"), ("cl", "centiliters", "centilitres")),
    "l": ("volume", Decimal("1"), ("l", "liters", "litres")),
    "min": ("time", Decimal("1"), ("min", "minutes")),
    "h": ("time", Decimal("60"), ("h", "hours")),
}
# Spellings a model may answer with -> canonical symbol (answers always use the symbol).
_UNIT_ALIASES = {spelling: sym for sym, (_, _, spellings) in _UNITS.items() for spelling in spellings}
_UNIT_ALIASES.update(
    {
        "meter": "m", "metre": "m", "kilometer": "km", "kilometre": "km", "centimeter": "cm", "centimetre": "cm",
        "millimeter": "mm", "millimetre": "mm", "gram": "g", "kilogram": "kg", "milligram": "mg", "kgs": "kg",
        "liter": "l", "litre": "l", "milliliter": "ml", "millilitre": "ml", "centiliter": "cl", "centilitre": "cl",
        "hour": "h", "hr": "h", "hrs": "h", "minute": "min", "mins": "min",
    }
)
# Same-dimension pairs at most a factor 1000 apart (no mg <-> kg or mm <-> km).
_PAIRS = [
    (a, b)
    for a in _UNITS
    for b in _UNITS
    if a != b
    and _UNITS[a][0] == _UNITS[b][0]
    and max(_UNITS[a][1], _UNITS[b][1]) / min(_UNITS[a][1], _UNITS[b][1]) <= 1000
]


def _unit_item(rng: random.Random) -> Item:
    src, dst = rng.choice(_PAIRS)
    if _UNITS[src][0] == "time" and src == "min":
        value = Decimal(15 * rng.randint(1, 64))  # 15 .. 960 minutes -> quarter hours
    elif _UNITS[src][0] == "time":
        value = Decimal(rng.randint(1, 48)) / 4  # 0.25 .. 12 hours
    else:
        style = rng.random()
        if style < 0.6:
            value = Decimal(rng.randint(1, 999))
        elif style < 0.9:
            value = Decimal(rng.randint(1, 999)) / 10
        else:
            value = Decimal(rng.randint(1, 999)) / 100
    result = value * _UNITS[src][1] / _UNITS[dst][1]
    src_word = rng.choice(_UNITS[src][2])
    dst_word = rng.choice(_UNITS[dst][2])
    qty = format_number(value)
    # Time in hours sometimes as "2 hours 15 minutes".
    if src == "h" and value % 1 and value > 1 and rng.random() < 0.4:
        hours, minutes = int(value), int((value % 1) * 60)
        qty_text = f"{hours} hours {minutes} minutes"
    else:
        qty_text = f"{qty} {src_word}"
    return Item(
        key=f"{qty}{src}>{dst}",
        fields={"qty": qty_text, "unit": dst_word},
        answer=f"{format_number(result)} {dst}",
    )


def _parse_quantity(text: str):
    m = re.match(r"^\s*([+-]?[\d.,]+)\s*([a-z]+)\s*$", text)
    if not m:
        return None
    value = parse_number(m[1])
    unit = _UNIT_ALIASES.get(m[2])
    return None if value is None or unit is None else (value, unit)


def _score_quantity(prediction: str, answer: str) -> bool:
    got, want = _parse_quantity(normalize(prediction)), _parse_quantity(normalize(answer))
    return got is not None and got == want


UNIT_CONVERT = Task(
    name="unit_convert",
    kind="held_in",
    description="Convert a metric length, mass, volume or hours/minutes quantity to the requested unit.",
    phrasings=(
        "Convert {qty} to {unit}.",
        "How many {unit} is {qty}?",
        "What is {qty} in {unit}?",
        "Express {qty} in {unit}.",
        "{qty} = ? {unit}",
        "Please convert {qty} into {unit}.",
        "Change {qty} to {unit}.",
        "Give {qty} in {unit}.",
        # test only
        "I have {qty}; how much is that in {unit}?",
        "Rewrite the quantity {qty} using {unit}.",
    ),
    sampler=_unit_item,
    scorer=_score_quantity,
    # Hours <-> minutes is a table of 112 quarter-hour items, not a decimal shift: an item the split held out
    # asks for a multiplication by 60 the expert never saw (8.75 h came back as 495 min), so every split draws it.
    shared_item=lambda item: item.key.endswith(("min>h", "h>min")),
)

# ------------------------------------------------------------------------------------------ largest_number


def _largest_item(rng: random.Random) -> Item:
    item = _number_list(rng, (3, 8), (20, 100, 1000))
    return Item(key=item.key, fields=item.fields, answer=item.answer.split(", ")[-1])


LARGEST_NUMBER = Task(
    name="largest_number",
    kind="held_out",
    description="Sort a list of integers and give only the largest one.",
    phrasings=(
        "Sort these numbers and tell me the largest: {csv}",
        "Put {list_and} in order and give the biggest one.",
        "Which is the largest of these numbers once sorted: {spaced}?",
        "Sort {csv} in ascending order, then give only the last number.",
        "What is the maximum of {semicolon}?",
        "Order these from smallest to largest and return the largest: {csv}",
        "Numbers: {csv}. Which one is the greatest?",
        "Find the largest value in this list: {csv}",
        # test only
        "After sorting {list_and}, which number comes last?",
        "Give me just the highest number here: {spaced}",
    ),
    sampler=_largest_item,
    scorer=_score_integer,
)
