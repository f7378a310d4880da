"""Which backend serves a request for an adapter: the policies `BackendPool.candidates` orders backends by.

- `rendezvous`: each adapter has an owner among the healthy backends (highest hash of backend and adapter), so it
  stays hot on one replica; the owner is skipped only while saturated.
- `scorer`: the Kubernetes Gateway API Inference Extension's LoRA affinity scorer, on what each backend holds
  now by flock's own bookkeeping (its in-flight requests per adapter): adapter already active 1.0, a free
  adapter slot 0.8, otherwise the request queues for a slot 0.6; less load breaks near ties, and the rendezvous
  owner breaks exact ones (affinity where nothing else tells the backends apart).

`flock bench --placement` measures both (docs/performance.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, Protocol

PLACEMENTS = ("rendezvous", "scorer")
Placement = Literal["rendezvous", "scorer"]

ACTIVE, FREE_SLOT, QUEUED = 1.0, 0.8, 0.6


class BackendState(Protocol):
    url: str
    inflight: int
    active: dict[str, int]  # adapter name -> requests in flight on this backend


def rendezvous_weight(url: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}|{key}".encode(), digest_size=8).digest(), "big")


def lora_affinity(backend: BackendState, adapter: str | None, max_loras: int) -> float:
    """The Inference Extension's score of a backend for a request on `adapter` (None: the base model, which
    needs no slot)."""
    if adapter is None or backend.active.get(adapter, 0) > 0:
        return ACTIVE
    if sum(1 for n in backend.active.values() if n > 0) < max_loras:
        return FREE_SLOT
    return QUEUED


def order(backends: Sequence[BackendState], adapter: str | None, *, policy: Placement, max_loras: int,
          batch: int, spill_inflight: int) -> list:
    """`backends` in preference order for a request on `adapter` under `policy`. `batch`: the sequences a backend
    runs at once (its load is counted in batches); `spill_inflight`: when rendezvous leaves a saturated owner."""
    key = adapter or ""
    ranked = sorted(backends, key=lambda b: rendezvous_weight(b.url, key), reverse=True)
    if policy == "scorer":
        # Load in units of a full batch: a backend busier by a fifth of a batch loses one score step (0.2).
        def score(b: BackendState) -> float:
            return lora_affinity(b, adapter, max_loras) - b.inflight / max(batch, 1)

        return sorted(ranked, key=score, reverse=True)  # stable: the rendezvous order breaks ties
    if ranked and ranked[0].inflight >= spill_inflight:
        ranked.sort(key=lambda b: b.inflight)
    return ranked
