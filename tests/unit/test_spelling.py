"""Typo repair before embedding (router/spelling.py): which words are repaired and to what, and that the router
embeds, keys and decides on the repaired text, per visible set (a tenant's card words repair only its own
queries)."""

from __future__ import annotations

import numpy as np
import pytest

from adapters.tenants import SHARED
from router.index import ExpertIndex
from router.router import Router
from router.spelling import Speller, one_edit, vocabulary_words
from tests.unit.test_conversation import EXPERTS, CountingBatcher, router_with
from tests.unit.test_tenants import A, B, HashEmbedder, lora, make_pool

CARDS = ["Give an antonym for hot.", "What is the antonym of early?", "Name the antonym of 'send'.",
         "Whaat is the opposite word of big?", "Sort these numbers: 3, 1, 2."]


def test_one_edit_covers_a_dropped_added_changed_and_swapped_letter():
    edits = one_edit("word")
    assert {"wrd", "wordd", "ward", "wrod"} <= edits and "word" not in edits
    assert "wdro" not in edits  # two edits away


@pytest.mark.parametrize("typo, fixed", [("atnonym", "antonym"), ("antonnym", "antonym"), ("antoym", "antonym"),
                                         ("Anronym", "antonym"), ("wrod", "word"), ("numbres", "numbers")])
def test_a_word_one_edit_from_a_card_word_is_repaired(typo, fixed):
    speller = Speller.from_cards(CARDS, known=frozenset({"word", "numbers", "sort", "opposite"}))
    assert speller.word(typo) == fixed


def test_real_words_short_words_and_a_cards_own_typo_are_left_alone():
    speller = Speller.from_cards(CARDS, known=frozenset({"word", "what", "cats", "opposite"}))
    assert speller.word("cats") == "cats"  # a whole word of the embedder's vocabulary, though one edit from...
    assert speller.word("wat") == "wat"  # too short to repair safely
    # "whaat" is in a card once: not a target (a typo a card shows on purpose), and still repaired to "what".
    assert "whaat" not in speller.targets and speller.word("whaat") == "what"
    assert speller.word("zebra") == "zebra"  # nothing one edit away
    assert speller.correct("Give an atnonym for 'cold', please!") == "Give an antonym for 'cold', please!"
    assert Speller().correct("atnonym") == "atnonym"  # no card words: nothing to repair to


def test_the_target_the_cards_use_most_wins():
    speller = Speller.from_cards(["sort it"] * 3 + ["short it"] * 5)
    assert speller.word("sohrt") == "short"
    assert speller.word("sorrt") == "sort"  # only "sort" is one edit away


def test_vocabulary_words_are_the_tokenizers_whole_lower_case_words():
    tok = type("T", (), {"vocab": {"word": 1, "##ing": 2, "[CLS]": 3, "Cat": 4, "42": 5}})()
    assert vocabulary_words(tok) == frozenset({"word"})
    assert vocabulary_words(None) == frozenset()


async def test_the_router_routes_a_misspelt_task_word_to_its_expert():
    typo = "give an atnonym word"
    on, off = CountingBatcher(), CountingBatcher()
    repaired = router_with(EXPERTS, on)
    repaired.index.speller = Speller.from_cards(["opposite antonym word meaning"] * 3)
    plain = router_with(EXPERTS, off)
    result = await repaired.route(typo)
    assert result.decision.experts[0].name == "antonym"
    assert on.texts == ["give an antonym word"]  # the repaired text is what is embedded
    assert "spelling" in result.stages
    # Without the repair the hashed word "atnonym" is not "antonym": the score on the expert is lower.
    s_off, _ = await plain.explain(typo)
    s_on, _ = await repaired.explain(typo)
    assert s_on["antonym"] > s_off["antonym"]


async def test_a_rebuilt_index_repairs_with_its_own_visible_sets_card_words(tmp_path):
    pool = make_pool(tmp_path)
    experts = tmp_path / "state" / "experts"
    pool.add(lora(tmp_path / "shared" / "cooking", "cooking", 1, ["boil an egg"] * 3))
    pool.add(lora(experts / "acme" / "maths", "acme-maths", 2, ["multiply these numbers"] * 3), tenant="acme",
             scope=A)
    router = Router(pool, HashEmbedder(), None, fixed_threshold=0.0)  # type: ignore[arg-type]
    await router.rebuild_index()
    assert router.view(A).speller.correct("mulitply boiil") == "multiply boil"  # type: ignore[union-attr]
    assert router.view(B).speller.correct("mulitply boiil") == "mulitply boil"  # type: ignore[union-attr]
    assert router.view(SHARED).speller.correct("mulitply") == "mulitply"  # type: ignore[union-attr]
    off = Router(pool, HashEmbedder(), None, fixed_threshold=0.0, spelling=False)  # type: ignore[arg-type]
    await off.rebuild_index()
    assert off.index.speller is None
    assert off.index.texts((("mulitply",),)) == (("mulitply",),)
    assert router.index.texts((("mulitply", "x"),)) == (("multiply", "x"),)


def test_an_index_without_a_speller_embeds_the_text_as_written():
    index = ExpertIndex(names=[], vectors=np.zeros((0, 4), dtype=np.float32))
    assert index.texts((("atnonym",),)) == (("atnonym",),)


async def test_a_pool_change_counts_the_words_of_the_new_cards_only(tmp_path):
    pool = make_pool(tmp_path)
    pool.add(lora(tmp_path / "shared" / "cooking", "cooking", 1, ["boil an egg"] * 3))
    router = Router(pool, HashEmbedder(), None, fixed_threshold=0.0)  # type: ignore[arg-type]
    await router.rebuild_index()
    before = dict(router._card_words)
    assert len(before) == 1
    pool.add(lora(tmp_path / "shared" / "maths", "maths", 2, ["multiply these numbers"] * 3))
    await router.rebuild_index()
    assert len(router._card_words) == 2
    (key, counted), = before.items()
    assert router._card_words[key] is counted  # kept, not counted again
    assert router.index.speller.correct("mulitply boiil") == "multiply boil"  # type: ignore[union-attr]
    pool.remove("cooking")
    await router.rebuild_index()
    assert key not in router._card_words and router.index.speller.correct("boiil") == "boiil"  # type: ignore[union-attr]
