"""The composites' disk budget (least recently used out first, recent ones protected) and the per-key cap on
new composites."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.composite_cache import CompositeCache
from service.errors import APIError
from service.limits import BuildLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def composite(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.mkdir()
    (path / "adapter_model.safetensors").write_bytes(b"x" * size)
    return path


def test_least_recently_used_goes_first(tmp_path):
    clock = Clock()
    cache = CompositeCache(250, protect_s=5, clock=clock)
    for name in "abc":
        clock.t += 10
        assert cache.use(name, composite(tmp_path, name, 100), built=True) == ([] if name != "c" else ["a"])
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
    assert (cache.bytes, cache.built, cache.evicted, len(cache)) == (200, 3, 1, 2)
    clock.t += 10
    cache.use("b", tmp_path / "b", built=False)  # b used again: c is now the oldest
    clock.t += 10
    assert cache.use("d", composite(tmp_path, "d", 100), built=True) == ["c"]
    assert "b" in cache and "c" not in cache and cache.built == 4


def test_recently_used_composites_are_not_evicted(tmp_path):
    """A composite may be between being built and being loaded by a backend: the budget waits for it."""
    clock = Clock()
    cache = CompositeCache(150, protect_s=5, clock=clock)
    cache.use("a", composite(tmp_path, "a", 100), built=True)
    clock.t += 1
    assert cache.use("b", composite(tmp_path, "b", 100), built=True) == []
    assert cache.bytes == 200  # over budget while a is protected
    clock.t += 10
    assert cache.use("b", tmp_path / "b", built=False) == ["a"]
    assert cache.bytes == 100


def test_build_limiter_per_key_and_window():
    clock = Clock()
    limiter = BuildLimiter(2, clock=clock)
    limiter.take("k1")
    limiter.take("k1")
    with pytest.raises(APIError) as exc:
        limiter.take("k1")
    assert exc.value.status == 429 and exc.value.code == "composite_rate_limited"
    limiter.take("k2")  # another key has its own share
    clock.t += 61
    limiter.take("k1")  # a minute later
    BuildLimiter(0).take("k1")  # 0: no limit
