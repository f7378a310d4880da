"""Load ahead of need: each expert is loaded onto the backend that will serve it before a request asks for it.

Otherwise an expert's first request on a backend waits for vLLM's `load_lora_adapter`, which vLLM runs between
engine steps: under a full batch that is a step or more, while the request's client waits and its place in the
batch stays empty (docs/performance.md, many experts). Loaded ahead, vLLM only reads the adapter back from disk
inside a step if it has left its CPU LoRA cache since, which costs milliseconds.

One background task walks the pool whenever it may have something to do: at start, after a pool change, and when a
backend comes up (a restarted vLLM has lost its runtime adapters). It loads one adapter at a time, so a backend
serving traffic sees at most one extra utility call between its steps. Only rendezvous placement has an owner to
load onto; under the scorer an expert goes where its requests are sent.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from adapters.pool import ExpertPool
from service.backend import Adapter, BackendPool
from service.errors import APIError

log = logging.getLogger(__name__)
YIELD_EVERY = 256  # experts checked between yields to the event loop (a pass over 10,000 must not stall requests)


class Preloader:
    """Loads up to `limit` experts (in pool order) onto their owner backends, in the background."""

    def __init__(self, pool: ExpertPool, backends: BackendPool, limit: int):
        self.pool = pool
        self.backends = backends
        self.limit = limit
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.backends.placement == "rendezvous"

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())
            self.wake()

    def wake(self) -> None:
        """Something may need loading (the pool changed, a backend came up): walk the pool again soon."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.load_pass()
            except Exception:  # never let one bad pass end the task
                log.exception("loading experts ahead of need failed; retried on the next pool or backend change")

    async def load_pass(self) -> int:
        """Load every expert of the first `limit` that its owner backend does not hold yet; returns how many."""
        done = 0
        for i, expert in enumerate(self.pool.servable()[:self.limit]):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            adapter = Adapter(name=expert.name, path=expert.path)
            owners = self.backends.candidates(adapter)
            if not owners or not owners[0].healthy or owners[0].loaded.get(adapter.name) == adapter.path:
                continue
            if self.pool.get(expert.name) is not expert:
                continue  # removed or replaced since the pass began
            try:
                await self.backends.ensure_adapter(owners[0], adapter)
            except (APIError, aiohttp.ClientError, TimeoutError) as exc:
                # Not an expert's verdict: its first request loads it again and, if it fails then, quarantines it.
                log.warning("could not load expert %s onto %s ahead of need: %s", expert.name, owners[0].url, exc)
                continue
            done += 1
        if done:
            log.info("loaded %d experts onto their backends ahead of need", done)
        return done
