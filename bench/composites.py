"""`flock bench --composites N`: whether what clients can make flock build stays bounded.

N routed requests with random modes (merge and the per-token modes), α and top_k, against `flock serve` on the
default library and an instant fake backend (bench/fake_backend.py: no model, so the run is about the gateway's
composites, not generation). Every `sample_every` requests it samples the gateway's RSS, the bytes under its
composites directory and the composite counters. The goal (issue 17): disk and resident memory flat: disk within
no growth (the second half's peak within a small margin of the first half's), and the disk peak beside its
budget (`FLOCK_COMPOSITES_MAX_MB`).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from adapters.composite_cache import dir_bytes
from bench.many_experts import metric_samples, rss_mib
from bench.stack import gateway_env, say
from router.decision import ALWAYS_MIX
from service.processes import ManagedProcess, free_port, redis_command, wait_http, wait_redis
from service.settings import Settings

MODES = ("merge", "glider", "arrow", "phatgoose")
PROMPTS = ("What is 17 times 23?", "Convert 5 km to miles.", "Sort these: 9, 2, 7.", "Translate 'bonjour'.",
           "What is the opposite of 'early'?", "Write 42 in words.", "Extract the city from: I live in Oslo.",
           "How many days are in 3 weeks?", "Is this review positive: 'great food'?", "SELECT names of staff.")
MARGIN = 1.10  # a second half's peak may exceed the first half's by this factor and still count as flat


@dataclass
class Sample:
    requests: int
    seconds: float
    rss_mib: float
    disk_mib: float
    built: float
    evicted: float


def tree_mib(path: Path) -> float:
    return dir_bytes(path) / 2**20 if path.exists() else 0.0


def counter(metrics: str, name: str) -> float:
    return sum(metric_samples(metrics, name).values())


def random_body(rng: random.Random) -> dict:
    """A routed request a client could send: any per-token or merge mode, α log-uniform over its whole range."""
    routing: dict = {"mode": rng.choice(MODES), "top_k": rng.randint(1, 4)}
    if routing["mode"] == "glider":  # always mixed: each α is a composite to build
        routing.update(alpha=round(10 ** rng.uniform(-1, 3), 6), solo_margin=ALWAYS_MIX)
    return {"model": "auto", "max_tokens": 1, "routing": routing,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}


def flat(samples: list[Sample], budget_mib: float) -> dict:
    """The verdict: RSS and disk are flat when their peak over the second half of the run is no more than
    MARGIN times their peak over the first half. Disk may pass its budget by the composites requests in flight
    use (pinned: adapters/composite_cache.py)."""
    half = max(len(samples) // 2, 1)
    first, second = samples[:half], samples[half:] or samples[:half]
    out: dict = {"disk_budget_mib": budget_mib}
    for what in ("rss_mib", "disk_mib"):
        a, b = max(getattr(s, what) for s in first), max(getattr(s, what) for s in second)
        key = what.removesuffix("_mib")
        out[f"{key}_first_half_max_mib"], out[f"{key}_second_half_max_mib"] = a, b
        out[f"{key}_flat"] = b <= MARGIN * a
    return out


async def run(settings: Settings, library: Path, work: Path, n: int, *, concurrency: int = 4,
              samples_wanted: int = 20, seed: int = 0) -> dict:
    """`concurrency` clients, each with an API key of its own (the cap on new composites is per key)."""
    fake_port, gw_port, redis_port = free_port(), free_port(), free_port()
    procs = [
        ManagedProcess("fake backend", [sys.executable, "-m", "uvicorn", "bench.fake_backend:app", "--port",
                                        str(fake_port), "--log-level", "warning"], log_file=work / "fake.log"),
        ManagedProcess("redis-server", redis_command(redis_port, work)),
    ]
    state = work / "composites-state"
    env = gateway_env(settings, library=library, backend=f"http://127.0.0.1:{fake_port}",
                      redis_url=f"redis://127.0.0.1:{redis_port}/0", state_dir=state, port=gw_port)
    keys = [f"bench-composites-{i}" for i in range(concurrency)]
    env["FLOCK_API_KEYS"] = ",".join(keys)
    procs.append(ManagedProcess("gateway", [sys.executable, "-m", "cli", "serve"], env, log_file=work / "gw.log"))
    rng = random.Random(seed)
    sample_every = max(n // samples_wanted, 1)
    statuses: dict[str, int] = {}
    samples: list[Sample] = []
    try:
        for p in procs:
            p.start()
        wait_redis(redis_port)
        url = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{url}/ready", 180, procs[-1], "gateway")
        gw_pid = procs[-1].proc.pid  # type: ignore[union-attr]
        composites = Settings(state_dir=state).composites_dir
        start, sent = time.monotonic(), 0
        async with httpx.AsyncClient(timeout=120) as client:
            async def sample() -> None:
                metrics = (await client.get(f"{url}/metrics", headers={"authorization": f"Bearer {keys[0]}"})).text
                samples.append(Sample(sent, round(time.monotonic() - start, 1), rss_mib(gw_pid),
                                      tree_mib(composites), counter(metrics, "flock_composites_built_total"),
                                      counter(metrics, "flock_composites_evicted_total")))

            async def worker(key: str, count: int) -> None:
                nonlocal sent
                for _ in range(count):
                    r = await client.post(f"{url}/v1/chat/completions", json=random_body(rng),
                                          headers={"authorization": f"Bearer {key}"})
                    outcome = "200" if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"
                    statuses[outcome] = statuses.get(outcome, 0) + 1
                    sent += 1

            await sample()
            for done in range(0, n, sample_every):
                batch = min(sample_every, n - done)
                await asyncio.gather(*(worker(key, batch // concurrency + (i < batch % concurrency))
                                       for i, key in enumerate(keys)))
                await sample()
                s = samples[-1]
                say(f"  {s.requests:>6} requests, {s.seconds:>6.0f} s: RSS {s.rss_mib:.0f} MiB, composites "
                    f"{s.disk_mib:.0f} MiB on disk, {s.built:.0f} built, {s.evicted:.0f} evicted")
            ready = (await client.get(f"{url}/ready")).json()
    finally:
        for p in reversed(procs):
            p.stop()
    # The gateway's budget (service/gateway.py composite_budget) for a pool that is the library, as here.
    budget = settings.composites_max_mb or max(4 * tree_mib(library), 256)
    out = {"requests": n, "concurrency": concurrency, "statuses": dict(sorted(statuses.items())),
           "samples": [asdict(s) for s in samples], "pool_experts": ready["pool"]["experts"]}
    out.update(flat(samples[1:], budget))  # the first sample is before any request
    return out


def table(result: dict) -> str:
    rows = [("requests (statuses)", f"{result['requests']:,} ({result['statuses']})"),
            ("gateway RSS, first half / second half max", f"{result['rss_first_half_max_mib']:.0f} / "
             f"{result['rss_second_half_max_mib']:.0f} MiB: {'flat' if result['rss_flat'] else 'GROWING'}"),
            ("composites on disk, first half / second half max (budget)", f"{result['disk_first_half_max_mib']:.0f} / "
             f"{result['disk_second_half_max_mib']:.0f} MiB ({result['disk_budget_mib']:.0f}): "
             f"{'flat' if result['disk_flat'] else 'GROWING'}"),
            ("composites built / evicted", f"{result['samples'][-1]['built']:.0f} / "
             f"{result['samples'][-1]['evicted']:.0f}")]
    return "\n".join(f"| {k} | {v} |" for k, v in [("figure", "value"), ("---", "---"), *rows])
