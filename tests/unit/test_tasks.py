"""The task suite: deterministic generators, disjoint splits, test-only phrasings and sound scorers (no model)."""

from __future__ import annotations

import json

import pytest

from router.calibration import OUT_OF_DOMAIN_PROMPTS
from training.tasks import TASKS, Task, normalize, split_of
from training.tasks.lexicon import ANTONYM_PAIRS, EN_ES, EN_FR
from training.tasks.numeric import number_to_words
from training.tasks.ood import OOD_PROMPTS
from training.tasks.sql import EMPLOYEES, run_query

HELD_IN = {"arithmetic", "sort_numbers", "iso_date", "sentiment", "json_extract", "unit_convert", "text_to_sql",
           "translate_fr", "number_words", "antonym"}
HELD_OUT = {"time_24h", "words_to_number", "translate_es", "largest_number", "date_weekday", "translate_fr_en"}
TEMPLATED = sorted(name for name, t in TASKS.items() if t.kind != "ood")
# Tasks whose item space is large enough for disjoint splits (the lexicon tasks share words by design).
SPLIT = sorted(name for name in TEMPLATED if TASKS[name].split_items)
N = 300

WRONG = {
    "arithmetic": "12345678",
    "sort_numbers": "99999, 1",
    "iso_date": "1899-01-01",
    "sentiment": None,  # flipped label, below
    "json_extract": '{"name": "Nobody", "age": 1, "city": "Nowhere"}',
    "unit_convert": "123456789 km",
    "text_to_sql": "SELECT id FROM employees WHERE id = -1",
    "translate_fr": "xyzzy",
    "number_words": "minus one",
    "antonym": "xyzzy",
    "time_24h": "25:61",
    "words_to_number": "-1",
    "translate_es": "xyzzy",
    "largest_number": "-1",
    "date_weekday": "Funday",
    "translate_fr_en": "xyzzy",
}


def test_registry_kinds() -> None:
    assert {n for n, t in TASKS.items() if t.kind == "held_in"} == HELD_IN
    assert {n for n, t in TASKS.items() if t.kind == "held_out"} == HELD_OUT
    assert {n for n, t in TASKS.items() if t.kind == "ood"} == {"ood"}
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task.description.strip() and task.description.endswith(".")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic(name: str) -> None:
    task = TASKS[name]
    for split in ("train", "dev", "test"):
        assert task.generate(split, 50, seed=3) == task.generate(split, 50, seed=3)
    assert task.generate("train", 50, seed=3) != task.generate("train", 50, seed=4)
    assert len(task.generate("dev", 37, seed=0)) == 37


@pytest.mark.parametrize("name", TEMPLATED)
def test_phrasings(name: str) -> None:
    task = TASKS[name]
    assert len(task.phrasings) >= 8
    assert len(task.test_only_ids) >= 2
    assert len(set(task.phrasings)) == len(task.phrasings)


@pytest.mark.parametrize("name", TEMPLATED)
def test_test_only_phrasings(name: str) -> None:
    task = TASKS[name]
    for split in ("train", "dev"):
        ids = {e.phrasing_id for e in task.generate(split, N, seed=0)}
        assert not ids & task.test_only_ids, split
    test_ids = {e.phrasing_id for e in task.generate("test", N, seed=0)}
    assert test_ids & task.test_only_ids  # the test split does use them


# A task's shared vocabulary (Task.shared_item) is in every split by design; these answers mark it.
_SMALL_WORDS = {number_to_words(n) for n in range(20)}
SHARED_ANSWER = {"number_words": lambda answer: answer in _SMALL_WORDS,
                 "unit_convert": lambda answer: answer.endswith((" min", " h"))}


@pytest.mark.parametrize("name", SPLIT)
def test_splits_disjoint(name: str) -> None:
    task = TASKS[name]
    shared = SHARED_ANSWER.get(name, lambda answer: False)
    prompts = {s: {e.prompt for e in task.generate(s, N, seed=0) if not shared(e.answer)}
               for s in ("train", "dev", "test")}
    assert not prompts["train"] & prompts["dev"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["dev"] & prompts["test"]


# Tasks whose answer identifies the underlying item: their answers, not just prompts, must not cross splits.
@pytest.mark.parametrize("name", ["iso_date", "time_24h", "text_to_sql", "number_words", "words_to_number"])
def test_split_items_disjoint(name: str) -> None:
    task = TASKS[name]
    shared = SHARED_ANSWER.get(name, lambda answer: False)
    answers = {s: {e.answer for e in task.generate(s, N, seed=0) if not shared(e.answer)}
               for s in ("train", "dev", "test")}
    assert not answers["train"] & answers["dev"]
    assert not answers["train"] & answers["test"]
    assert not answers["dev"] & answers["test"]


@pytest.mark.parametrize("name", SPLIT)
def test_train_prompts_distinct(name: str) -> None:
    examples = TASKS[name].generate("train", 1000, seed=0)
    assert len({e.prompt for e in examples}) == 1000


@pytest.mark.parametrize("name", TEMPLATED)
def test_scorer_accepts_own_answers_and_rejects_wrong(name: str) -> None:
    task = TASKS[name]
    examples = task.generate("dev", 100, seed=0) + task.generate("test", 100, seed=0)
    for e in examples:
        assert e.answer and "\n" not in e.answer
        assert task.score(e.answer, e.answer), e
        assert task.score(f"  {e.answer}  \n(extra line)", e.answer), e
        if name == "sentiment":
            wrong = "negative" if e.answer == "positive" else "positive"
        else:
            wrong = WRONG[name]
        assert not task.score(wrong, e.answer), e
        assert not task.score("", e.answer), e


def test_normalize() -> None:
    assert normalize("  Positive.\nBecause...") == "positive"
    assert normalize("'chien'") == "chien"
    assert normalize("") == ""


def test_number_words_vocabulary_is_in_every_split() -> None:
    # 12 and 13 hash to the test split; an expert that never saw "twelve" answered "twenty-two".
    task = TASKS["number_words"]
    assert {split_of("number_words", str(n)) for n in (12, 13)} == {"test"}
    for split in ("train", "dev", "test"):
        answers = {e.answer for e in task.generate(split, 3000, seed=0)}
        assert {"twelve", "thirteen", "zero"} <= answers, split
    # ... and as often as any other item: 0-19 stay a small share of every split (the sampler draws 0-99 one
    # time in four), not the bulk of the small dev and test splits.
    for split in ("train", "test"):
        small = sum(len(e.answer.split()) == 1 and "-" not in e.answer for e in task.generate(split, 3000, seed=0))
        assert small / 3000 < 0.12, (split, small)
    train = {e.answer for e in task.generate("train", 3000, seed=0)}
    assert not train & {number_to_words(n) for n in range(20, 10_000) if split_of("number_words", str(n)) == "test"}


def test_unit_convert_time_table_is_in_every_split() -> None:
    # 8.75 h hashes to test; an expert that never saw it answered 495 min for 525 min.
    task = TASKS["unit_convert"]
    assert split_of("unit_convert", "8.75h>min") == "test"
    is_time = SHARED_ANSWER["unit_convert"]
    for split in ("train", "dev", "test"):
        examples = task.generate(split, 3000, seed=0)
        assert "525 min" in {e.answer for e in examples}, split
        # Kept at the sampler's share (2 of 20 unit pairs), not the bulk of the small splits.
        assert 0.07 < sum(is_time(e.answer) for e in examples) / 3000 < 0.13, split


def test_number_words() -> None:
    assert number_to_words(0) == "zero"
    assert number_to_words(21) == "twenty-one"
    assert number_to_words(347) == "three hundred forty-seven"
    assert number_to_words(1000) == "one thousand"
    assert number_to_words(2305) == "two thousand three hundred five"
    assert number_to_words(9999) == "nine thousand nine hundred ninety-nine"
    assert "and" not in number_to_words(101).split()


def test_specific_scorers() -> None:
    assert TASKS["arithmetic"].score("1,234", "1234")
    assert TASKS["sort_numbers"].score("1,2 ,3", "1, 2, 3")
    assert not TASKS["sort_numbers"].score("3, 2, 1", "1, 2, 3")
    uc = TASKS["unit_convert"]
    assert uc.score("2500 meters", "2500 m") and uc.score("2500.0 m", "2500 m") and uc.score("2,500 m.", "2500 m")
    assert not uc.score("2500 km", "2500 m") and not uc.score("2500", "2500 m")
    js = TASKS["json_extract"]
    ans = json.dumps({"name": "Ana Silva", "age": 34, "city": "Lima"})
    assert js.score('Sure! ```json\n{"city": "Lima", "name": "Ana Silva", "age": 34}\n```', ans)
    assert not js.score('{"name": "Ana Silva", "age": 35, "city": "Lima"}', ans)
    assert not js.score('{"name": "Ana Silva", "age": 34}', ans)
    assert not js.score("not json {", ans)
    fr = TASKS["translate_fr"]
    assert fr.score("Chien.", "chien") and fr.score("le chien", "chien") and fr.score("oeuf", "œuf")
    assert not fr.score("chat", "chien")


def test_text_to_sql_gold_queries_execute() -> None:
    task = TASKS["text_to_sql"]
    gold = {e.answer for s in ("train", "dev", "test") for e in task.generate(s, 400, seed=0)}
    assert len(gold) > 100
    for sql in gold:
        run_query(sql)  # raises on error
    assert len(EMPLOYEES) == 20


def test_text_to_sql_scoring() -> None:
    task = TASKS["text_to_sql"]
    gold = "SELECT name FROM employees WHERE department = 'HR'"
    assert task.score('```sql\nSELECT name FROM employees WHERE department = "HR"\nORDER BY name;\n```', gold)
    assert task.score("SELECT e.name FROM employees e WHERE e.department='HR';", gold)
    assert not task.score("SELECT name FROM employees", gold)
    assert not task.score("SELEC name FROM employees", gold)  # errors -> False
    assert not task.score("SELECT name FROM employees WHERE department = 'hr'", gold)
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    assert not task.score(runaway, "SELECT 1")
    # A destructive prediction cannot affect later scoring (each query gets a fresh database).
    assert not task.score("DROP TABLE employees", gold)
    assert task.score(gold, gold)


def test_lexicon_sizes() -> None:
    assert len(EN_FR) >= 200
    assert len(EN_ES) >= 150
    assert len(ANTONYM_PAIRS) >= 150
    words = [w for pair in ANTONYM_PAIRS for w in pair]
    assert len(words) == len(set(words))  # each word in one pair, so the antonym is unambiguous


def test_ood() -> None:
    task = TASKS["ood"]
    assert len(OOD_PROMPTS) >= 60
    assert len(set(OOD_PROMPTS)) == len(OOD_PROMPTS)
    calibration = {p.strip().lower() for p in OUT_OF_DOMAIN_PROMPTS}
    assert not {p.strip().lower() for p in OOD_PROMPTS} & calibration
    examples = task.generate("test", len(OOD_PROMPTS), seed=0)
    assert {e.prompt for e in examples} == set(OOD_PROMPTS)
    assert all(e.answer == "" and task.score("anything at all", e.answer) for e in examples)


def test_numeric_tasks_stay_in_the_ranges_their_descriptions_state():
    """arithmetic and sort_numbers were narrowed to what the library's experts learn (docs/evaluation.md);
    largest_number, held out, keeps the long lists of the earlier definition."""
    import random as _random

    from training.tasks.numeric import _arithmetic_item, _largest_item, _sort_item

    rng = _random.Random(0)
    for _ in range(2000):
        f = _arithmetic_item(rng).fields
        bound = 12 if f["sym"] == "*" else 99
        assert 0 <= f["a"] <= bound and 0 <= f["b"] <= bound
        nums = [int(x) for x in _sort_item(rng).fields["csv"].split(", ")]
        assert 3 <= len(nums) <= 6 and max(nums) < 100
    longest = max(len(_largest_item(rng).fields["csv"].split(", ")) for _ in range(500))
    assert longest == 8
