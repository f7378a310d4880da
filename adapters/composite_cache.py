"""The composites on disk, bounded in bytes: merge and gated composites share one budget, least recently used
evicted first. A request can make flock build a composite, so without a bound clients could fill the disk.

Entries used in the last `protect_s` seconds are not evicted (a request may be between building its composite and
the backend loading it), so the budget can be exceeded for that long. Eviction removes the directory; `use`
returns what it evicted, for the caller to unload from every backend.
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


class CompositeCache:
    def __init__(self, limit_bytes: int, *, protect_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.limit_bytes = limit_bytes
        self.protect_s = protect_s
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
        """Record a use of composite `cid` at `path` (just built, or found built); evict beyond the budget and
        return the evicted ids."""
        with self._lock:
            entry = self._entries.pop(cid, None)
            if entry is None:
                entry = _Entry(path, dir_bytes(path), 0.0)
                self.bytes += entry.size
            entry.used = self.clock()
            self._entries[cid] = entry
            if built:
                self.built += 1
            return self._evict(keep=cid)

    def _evict(self, keep: str) -> list[str]:
        evicted = []
        now = self.clock()
        for cid in list(self._entries):
            if self.bytes <= self.limit_bytes:
                break
            entry = self._entries[cid]
            if cid == keep or now - entry.used < self.protect_s:
                continue
            del self._entries[cid]
            shutil.rmtree(entry.path, ignore_errors=True)
            self.bytes -= entry.size
            self.evicted += 1
            evicted.append(cid)
        return evicted
