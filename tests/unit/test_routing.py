"""Routing methods, threshold calibration and cache keys (unit level: vectors are made by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from router.cache import cache_key, normalise_query
from router.decision import RoutingParams
from router.index import DEFAULT_THRESHOLD, ExpertIndex, calibrate_threshold, expert_vectors
from router.methods import create_method, method_names


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def index() -> ExpertIndex:
    return ExpertIndex(names=["a", "b", "c"], vectors=np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)]),
                       threshold=0.5)


def test_registry_has_builtin_methods():
    assert {"global", "merge"} <= set(method_names())
    with pytest.raises(KeyError, match="unknown routing mode"):
        create_method("nope")


def test_global_top1_and_abstain(index):
    method = create_method("global")
    chosen = method.choose(index.scores(unit(0.2, 1, 0.1)), index, RoutingParams())
    assert [(c.name, c.weight) for c in chosen] == [("b", 1.0)]
    tie = method.choose(index.scores(unit(1, 1, 1)), index, RoutingParams())  # 0.577 >= 0.5: still routed
    assert len(tie) == 1 and abs(tie[0].score - 3**-0.5) < 1e-5

def test_global_abstains_below_threshold(index):
    index.threshold = 0.9
    assert create_method("global").choose(index.scores(unit(1, 1, 0.2)), index, RoutingParams()) == []


def test_merge_weights(index):
    method = create_method("merge", top_k=2, temperature=0.1, weight_step=0.05)
    chosen = method.choose(index.scores(unit(1, 0.8, 0)), index, RoutingParams())
    assert [c.name for c in chosen] == ["a", "b"]
    assert abs(sum(c.weight for c in chosen) - 1) < 1e-6
    assert chosen[0].weight > chosen[1].weight > 0
    assert all(abs(c.weight / 0.05 - round(c.weight / 0.05)) < 1e-6 for c in chosen)  # quantised: reusable
    one = method.choose(index.scores(unit(1, 0.8, 0)), index, RoutingParams(top_k=1))
    assert [(c.name, c.weight) for c in one] == [("a", 1.0)]


def test_calibration_separates():
    t = calibrate_threshold(np.array([0.5, 0.6, 0.45]), np.array([0.1, 0.2, 0.3]))
    assert 0.3 < t < 0.45
    assert calibrate_threshold(np.array([]), np.array([0.1])) == DEFAULT_THRESHOLD


def test_cache_key_parts():
    assert normalise_query("  Hello\n  WORLD ") == "hello world"
    k = cache_key("pool1", "merge", {"top_k": 2}, "Hello world")
    assert k == cache_key("pool1", "merge", {"top_k": 2}, "  hello   WORLD")
    assert k != cache_key("pool2", "merge", {"top_k": 2}, "hello world")
    assert k != cache_key("pool1", "merge", {"top_k": 3}, "hello world")
    assert k != cache_key("pool1", "global", {}, "hello world")
    assert "hello" not in k  # query text never stored in the key


def test_merge_keeps_experts_that_fit_the_max_rank(index):
    index.ranks = {"a": 8, "b": 8, "c": 8}
    method = create_method("merge", top_k=3, temperature=1.0, weight_step=0.05, max_rank=16)
    chosen = method.choose(index.scores(unit(1, 0.9, 0.8)), index, RoutingParams())
    assert [c.name for c in chosen] == ["a", "b"]


def test_expert_vectors_centroid_and_description():
    descriptions = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    examples = [np.stack([unit(0, 0, 1), unit(0, 1, 1)]), np.zeros((0, 3), dtype=np.float32)]
    centroid = expert_vectors("centroid", descriptions, examples)
    # expert 0: the normalised mean of its description and examples; expert 1 has no examples: its description
    assert np.allclose(centroid[0], unit(1, 0.7071, 1.7071), atol=1e-4)
    assert np.allclose(centroid[1], descriptions[1])
    assert np.allclose(np.linalg.norm(centroid, axis=1), 1)
    assert np.array_equal(expert_vectors("description", descriptions, examples), descriptions)
    with pytest.raises(ValueError, match="expert vector kind"):
        expert_vectors("nope", descriptions, examples)


def test_gated_modes_pick_candidates_with_gates_within_the_rank_budget():
    vectors = np.stack([unit(1, 0, 0), unit(0.9, 0.1, 0), unit(0.8, 0.3, 0), unit(0, 0, 1)])
    index = ExpertIndex(names=["a", "b", "c", "d"], vectors=vectors, threshold=0.5,
                        ranks={"a": 4, "b": 4, "c": 4, "d": 4},
                        gates={"a": frozenset({"arrow", "phatgoose"}), "b": frozenset({"arrow", "phatgoose"}),
                               "c": frozenset({"arrow"}), "d": frozenset({"arrow", "phatgoose"})})
    scores = index.scores(unit(1, 0.05, 0))
    glider = create_method("glider", alpha=100.0, top_k=2, max_rank=11)  # room for 2 rank-4 candidates: 2·5 + 1
    chosen = glider.choose(scores, index, RoutingParams())
    assert [c.name for c in chosen] == ["a", "b"]  # c has no PHATGOOSE gates; d does not fit
    assert abs(sum(c.weight for c in chosen) - 1) < 1e-3 and chosen[0].weight > chosen[1].weight
    assert glider.gate(RoutingParams(alpha=3.0, top_k=1)).model_dump() == {"local": "phatgoose", "alpha": 3.0,
                                                                            "top_k": 1}
    arrow = create_method("arrow", top_k=2, max_rank=64)
    chosen = arrow.choose(scores, index, RoutingParams(alpha=50.0))
    assert [c.name for c in chosen] == ["a", "b", "c", "d"] and len({c.weight for c in chosen}) == 1  # α ignored
    assert arrow.cache_params(RoutingParams(alpha=50.0)) == {"alpha": 0.0, "top_k": 2}
    assert create_method("phatgoose").choose(index.scores(unit(0, 1, 0)), index, RoutingParams()) == []  # abstain


def test_glider_answers_alone_when_the_global_margin_is_wide_and_mixes_otherwise():
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    gates = {n: frozenset({"phatgoose"}) for n in "abc"}
    index = ExpertIndex(names=["a", "b", "c"], vectors=vectors, threshold=0.5, ranks={n: 4 for n in "abc"},
                        gates=gates)
    glider = create_method("glider", alpha=10.0, top_k=2, solo_margin=0.3)
    sure = index.scores(unit(1, 0.2, 0))  # a 0.98, b 0.20: margin 0.78
    unsure = index.scores(unit(1, 0.8, 0))  # a 0.78, b 0.62: margin 0.16
    assert [(c.name, c.weight) for c in glider.choose(sure, index, RoutingParams())] == [("a", 1.0)]
    mixed = glider.choose(unsure, index, RoutingParams())
    assert [c.name for c in mixed][:2] == ["a", "b"] and len(mixed) > 1
    # a request's own margin wins over the config; it is part of the cache key; without one glider always mixes
    assert len(glider.choose(sure, index, RoutingParams(solo_margin=1.0))) > 1
    assert glider.cache_params(RoutingParams()) == {"alpha": 10.0, "top_k": 2, "solo_margin": 0.3}
    assert len(create_method("glider", alpha=10.0).choose(sure, index, RoutingParams())) > 1
    # the local-only modes ignore it (no global term to be sure with)
    assert len(create_method("phatgoose").choose(sure, index, RoutingParams(solo_margin=0.1))) > 1


def test_calibration_scores_each_example_against_its_centroid_without_it():
    from router.index import in_domain_best, unit_rows

    descriptions = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    examples = [np.stack([unit(1, 1, 0), unit(1, 0, 1)]), np.zeros((0, 3), dtype=np.float32)]
    vectors = expert_vectors("centroid", descriptions, examples)
    best = in_domain_best("centroid", descriptions, examples, vectors)
    loo0 = unit_rows((descriptions[0] + examples[0][1])[None])[0]  # example 0 against description + example 1
    assert np.isclose(best[0], max(examples[0][0] @ loo0, examples[0][0] @ vectors[1]))
    assert best[0] < examples[0][0] @ vectors[0]  # lower than against the centroid that contains it
    plain = in_domain_best("description", descriptions, examples, descriptions)
    assert np.allclose(plain, (examples[0] @ descriptions.T).max(axis=1))
