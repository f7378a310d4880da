"""Phrasing families: ≥ 30 per task, seeded, fields untouched, held-out families disjoint from training ones."""

from __future__ import annotations

import random
import re

import pytest

from training.tasks import TASKS
from training.tasks.phrasing import HELD_OUT_STYLES, N_STYLES, STYLES, split_family, styled

TEMPLATED = sorted(name for name, t in TASKS.items() if t.kind != "ood")
N = 400


@pytest.mark.parametrize("name", TEMPLATED)
def test_at_least_30_families_and_a_held_out_share(name: str) -> None:
    task = TASKS[name]
    assert task.n_families >= 30
    training = set(task.phrasing_ids("train"))
    held_out = set(task.test_only_ids)
    assert len(training) >= 30 and len(held_out) >= 10
    assert training.isdisjoint(held_out) and training | held_out == set(range(task.n_families))


@pytest.mark.parametrize("name", TEMPLATED)
def test_train_and_dev_never_use_held_out_families(name: str) -> None:
    task = TASKS[name]
    for split in ("train", "dev"):
        fams = {e.phrasing_id for e in task.generate(split, N, seed=1)}
        assert fams.isdisjoint(task.test_only_ids), split
        assert len(fams) >= 30, split  # the variety is really drawn from
        assert {split_family(f)[1] for f in fams} == set(range(N_STYLES)) - HELD_OUT_STYLES
    held = task.generate("test", 200, seed=1, held_out_only=True)
    assert {e.phrasing_id for e in held} <= task.test_only_ids
    assert {split_family(e.phrasing_id)[1] for e in held} & HELD_OUT_STYLES  # held-out styles are used
    with pytest.raises(ValueError):
        task.generate("train", 5, seed=1, held_out_only=True)


@pytest.mark.parametrize("name", TEMPLATED)
def test_generators_are_deterministic_with_a_seed(name: str) -> None:
    task = TASKS[name]
    assert task.generate("test", 60, seed=5, held_out_only=True) == task.generate("test", 60, 5, held_out_only=True)
    assert task.generate("train", 60, seed=5) == task.generate("train", 60, seed=5)
    assert task.generate("train", 60, seed=5) != task.generate("train", 60, seed=6)


@pytest.mark.parametrize("name", TEMPLATED)
def test_held_out_prompts_never_appear_in_training(name: str) -> None:
    task = TASKS[name]
    train = {e.prompt for e in task.generate("train", 2000, seed=0)}
    held = [e.prompt for e in task.generate("test", 200, seed=0, held_out_only=True)]
    assert not train & set(held)


def test_styles_change_only_the_template_words() -> None:
    template = "Translate '{word}' into French, please: {word}!"
    rng = random.Random(0)
    for style in range(N_STYLES):
        for _ in range(30):
            out = styled(template, style, rng)
            assert out.count("{word}") == 2, (STYLES[style][0], out)  # placeholders intact
            assert out.format(word="Chien") .count("Chien") == 2
    assert styled(template, 0, rng) == template
    assert styled(template, [n for n, _ in STYLES].index("upper case"), rng).startswith("TRANSLATE '{word}'")


def test_typos_and_casing_really_vary_the_surface() -> None:
    rng = random.Random(3)
    template = "Please convert {qty} into {unit} for me."
    typo = [n for n, _ in STYLES].index("typos")
    outs = {styled(template, typo, rng) for _ in range(50)}
    assert len(outs) > 10 and template not in outs
    assert all(re.search(r"\{qty\}.*\{unit\}", o) for o in outs)


def test_fields_reach_the_prompt_unchanged() -> None:
    task = TASKS["arithmetic"]
    for e in task.generate("train", 300, seed=2):
        nums = re.findall(r"\d+", e.prompt)
        assert len(nums) == 2, e.prompt  # no typo or casing touched the numbers
