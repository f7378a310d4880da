"""The many-experts bench's helpers: distinct synthetic cards, the Zipf draw and the histogram quantile it reads
from the gateway's metrics."""

from __future__ import annotations

import random
from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.many_experts import card_fields, histogram_quantile, zipf_names


def test_synthetic_cards_are_distinct_at_ten_thousand():
    cards = [card_fields(i) for i in range(10_000)]
    assert len({c["name"] for c in cards}) == len({c["description"] for c in cards}) == 10_000
    assert all(len(set(c["examples"])) == 32 for c in cards[:50])


def test_zipf_draw_follows_one_over_rank():
    names = [f"x{i}" for i in range(1000)]
    draws = Counter(zipf_names(names, 200_000, random.Random(0)))
    (top, n1), (_, n2) = draws.most_common(2)
    harmonic = sum(1 / k for k in range(1, 1001))
    assert abs(n1 / 200_000 - 1 / harmonic) < 0.01 and abs(n1 / n2 - 2) < 0.2


def test_histogram_quantile_reads_prometheus_buckets():
    registry = CollectorRegistry()
    h = Histogram("flock_adapter_load_seconds", "x", ["backend"], buckets=(0.1, 1, 10), registry=registry)
    for v in [0.05] * 50 + [0.5] * 49 + [5]:
        h.labels("a").observe(v)
    text = generate_latest(registry).decode()
    assert 0.0 < histogram_quantile(text, "flock_adapter_load_seconds", 0.5) <= 0.1
    assert 0.1 < histogram_quantile(text, "flock_adapter_load_seconds", 0.9) <= 1
    assert 1 < histogram_quantile(text, "flock_adapter_load_seconds", 0.995) <= 10
