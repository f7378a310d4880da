"""Placement: the LoRA affinity scorer (Gateway API Inference Extension: active 1.0, free slot 0.8, queued 0.6)
on flock's own bookkeeping, against rendezvous hashing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.backend import Adapter, BackendPool, Lease
from service.metrics import Metrics
from service.placement import ACTIVE, FREE_SLOT, QUEUED, lora_affinity, order


@dataclass
class B:
    url: str
    inflight: int = 0
    active: dict[str, int] = field(default_factory=dict)


def test_scores_follow_the_inference_extension():
    b = B("http://a", active={"x": 2, "y": 1})
    assert lora_affinity(b, "x", max_loras=2) == ACTIVE == 1.0
    assert lora_affinity(b, "z", max_loras=3) == FREE_SLOT == 0.8
    assert lora_affinity(b, "z", max_loras=2) == QUEUED == 0.6  # both slots busy: it waits for one
    assert lora_affinity(b, None, max_loras=2) == ACTIVE  # the base model needs no slot
    assert lora_affinity(B("http://a", active={"x": 0}), "z", max_loras=1) == FREE_SLOT  # idle entries hold none


def test_scorer_prefers_the_backend_holding_the_adapter_then_a_free_slot():
    holder, free, full = B("http://h", 3, {"x": 3}), B("http://f", 0, {}), B("http://q", 2, {"p": 1, "q": 1})
    kw = {"policy": "scorer", "max_loras": 2, "batch": 32, "spill_inflight": 64}
    assert order([full, free, holder], "x", **kw)[0] is holder  # active beats an idle free slot
    assert order([full, holder, free], "y", **kw)[:2] == [free, holder]  # free slot (idle) beats free slot (busy)
    assert order([full, holder, free], "y", **kw)[-1] is full  # queued last
    holder.inflight = 40  # over a batch busier: the idle backend with a free slot wins despite the adapter
    assert order([holder, free], "x", **kw)[0] is free


def test_scorer_ties_keep_rendezvous_affinity():
    """Backends alike (idle, nothing active): the adapter's rendezvous owner first, the same every time."""
    backends = [B(f"http://r{i}") for i in range(4)]
    for name in ("a", "b", "c", "d", "e"):
        scored = order(backends, name, policy="scorer", max_loras=8, batch=32, spill_inflight=64)
        hashed = order(backends, name, policy="rendezvous", max_loras=8, batch=32, spill_inflight=64)
        assert scored == hashed


@pytest.mark.parametrize("policy", ["rendezvous", "scorer"])
def test_leases_keep_the_active_count(policy):
    pool = BackendPool(["http://r0", "http://r1"], Metrics(), connect_timeout_s=1, read_timeout_s=5,
                       placement=policy, max_loras=1)
    for b in pool.backends:
        b.healthy = True
    first = pool.candidates(Adapter("x", Path("/x")))[0]
    leases = [Lease(first, "x"), Lease(first, "x")]
    assert first.active == {"x": 2} and first.inflight == 2
    if policy == "scorer":  # the other adapter goes where a slot is free
        assert pool.candidates(Adapter("y", Path("/y")))[0] is not first
        assert pool.candidates(Adapter("x", Path("/x")))[0] is first
    for lease in leases:
        lease.release()
        lease.release()  # once only
    assert first.active == {} and first.inflight == 0
