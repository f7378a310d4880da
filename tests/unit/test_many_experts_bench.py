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


def test_chart_merges_runs_by_pool_size(tmp_path):
    from bench.many_experts import chart, merged

    big = {"date": "d1", "experts": 1000, "registration": {"1000": {"register_ms_p50": 704.0, "startup_warm_s": 102},
                                                           "10000": {"register_ms_p50": 1573.0, "startup_warm_s": 580}},
           "serving": {"ratio": 0.53, "many_tok_s": 44.8, "few_tok_s": 86.3, "adapter_load_ms_p50": 508,
                       "adapter_load_ms_p99": 43950}, "vllm_settings": {"max_loras": 8, "max_cpu_loras": 16}}
    small = {"date": "d2", "experts": 10, "router_ms_p50_at_10_experts": 0.005, "router_ms_p50_at_10000_experts": 0.13,
             "registration": {10: {"register_ms_p50": 400.0, "startup_warm_s": 9},
                              1000: {"register_ms_p50": 650.0, "startup_warm_s": 90}}}
    m = merged([big, small])
    assert sorted(m["registration"]) == [10, 1000, 10000]
    assert m["registration"][1000]["register_ms_p50"] == 650.0, "the later run's figure at the same size"
    assert m["routing"] == {10: 0.005, 10000: 0.13}
    assert m["serving"]["ratio"] == 0.53 and m["serving"]["experts"] == 1000
    assert m["dates"] == ["d1", "d2"]
    assert chart([big, small], tmp_path / "img" / "many.png")
    assert (tmp_path / "img" / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
