"""`flock bench --composites`: its requests are ones the gateway accepts, and its verdict tells growth from a
plateau."""

from __future__ import annotations

import random

from bench.composites import MARGIN, Sample, flat, random_body
from router.decision import RoutingParams


def test_random_bodies_are_valid_routing_requests_across_the_whole_alpha_range():
    rng = random.Random(0)
    bodies = [random_body(rng) for _ in range(2000)]
    for body in bodies:
        RoutingParams.model_validate(body["routing"])  # raises on anything the gateway would refuse
    alphas = [b["routing"]["alpha"] for b in bodies if "alpha" in b["routing"]]
    assert min(alphas) < 0.2 and max(alphas) > 500  # log-uniform over 0.1 .. 1000
    assert {b["routing"]["mode"] for b in bodies} == {"merge", "glider", "arrow", "phatgoose"}


def series(rss: list[float], disk: list[float]) -> list[Sample]:
    return [Sample(i * 100, i, r, d, i, 0) for i, (r, d) in enumerate(zip(rss, disk, strict=True))]


def test_a_plateau_is_flat_and_growth_is_not():
    plateau = flat(series([900, 1000, 1010, 1005, 1008, 1012], [100, 300, 280, 300, 290, 300]), 256)
    assert plateau["rss_flat"] and plateau["disk_flat"]
    assert plateau["disk_first_half_max_mib"] == 300 and plateau["disk_budget_mib"] == 256
    growing = flat(series([900, 1000, 1100, 1200, 1300, 1400], [100, 200, 300, 400, 500, 600]), 256)
    assert not growing["rss_flat"] and not growing["disk_flat"]
    edge = flat(series([1000, 1000, 1000 * MARGIN], [1, 1, 1]), 256)
    assert edge["rss_flat"]
