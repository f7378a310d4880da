"""The composites on disk, bounded in bytes: merge and gated composites share one budget, least recently used
evicted first. A request can make flock build a composite, so without a bound clients could fill the disk.

A composite in use is pinned: `use` pins it for the request that resolved it, `release` unpins it when that
request is done (answered, streamed to the end, or failed). Pinned composites are not evicted, so the budget
is exceeded only by what requests in flight use; a pin older than `pin_timeout_s` (a request that never
released it) no longer protects. A time window instead of pins let a burst of requests keep every recent
composite on disk: 2.3 GB over a 256 MB budget in `flock bench --composites 10000`. Eviction removes the
directory; `use` returns what it evicted, for the caller to unload from every backend.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class _Entry:
    path: Path
    size: int
    used: float
    pins: int = 0  # requests in flight that use it


class CompositeCache:
    def __init__(self, limit_bytes: int, *, pin_timeout_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.limit_bytes = limit_bytes
        self.pin_timeout_s = pin_timeout_s
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.bytes = 0
        self.built = 0
        self.evicted = 0

    def __contains__(self, cid: str) -> bool:
        return cid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def use(self, cid: str, path: Path, *, built: bool) -> list[str]:
        """Record a use of composite `cid` at `path` (just built, or found built) and pin it until `release`;
        evict beyond the budget and return the evicted ids."""
        with self._lock:
            entry = self._entries.pop(cid, None)
            if entry is None:
                entry = _Entry(path, dir_bytes(path), 0.0)
                self.bytes += entry.size
            entry.used = self.clock()
            entry.pins += 1
            self._entries[cid] = entry
            if built:
                self.built += 1
            return self._evict(keep=cid)

    def release(self, cid: str) -> None:
        """The request that `use` pinned `cid` for is done with it."""
        with self._lock:
            entry = self._entries.get(cid)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def _evict(self, keep: str) -> list[str]:
        evicted = []
        now = self.clock()
        for cid in list(self._entries):
            if self.bytes <= self.limit_bytes:
                break
            entry = self._entries[cid]
            if cid == keep or (entry.pins > 0 and now - entry.used < self.pin_timeout_s):
                continue
            del self._entries[cid]
            shutil.rmtree(entry.path, ignore_errors=True)
            self.bytes -= entry.size
            self.evicted += 1
            evicted.append(cid)
        return evicted
