"""`flock bench --many-experts N`: what the number of experts costs.

- Registration: one more expert registered through the API when N are registered (and 10 x N when asked), and
  the gateway's start-up with N registered: cold (every card embedded) and warm (card vectors read from disk).
- Serving: Zipf traffic (exponent about 1) over N synthetic rank-8 experts with distinct cards, through
  `flock serve` on a real vLLM, against the same load over 8 experts, the two interleaved in one run; adapter
  load latency (the gateway's loads, CPU LoRA cache misses included) and host memory of gateway and vLLM.

Synthetic adapters are written under a temporary directory, never into the repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from service.settings import Settings

TOPICS = ("bread", "tax", "orbit", "violin", "tomato", "lease", "sprint", "glacier", "poetry", "chess", "vaccine",
          "router", "budget", "kayak", "opera", "wiring", "soap", "saddle", "ferment", "lichen", "mortgage", "sonar",
          "quilt", "pottery", "cipher", "tundra", "bonsai", "ballot", "compost", "magnet")
ASPECTS = ("history", "repair", "pricing", "safety", "design", "law", "science", "tools", "teaching", "trade",
           "myths", "careers", "statistics", "ethics", "maintenance", "recipes", "rules", "sizes", "colours",
           "storage", "testing", "transport", "insurance", "slang", "festivals", "records", "puzzles", "diseases",
           "export", "weather", "software", "fashion", "music", "sports")
ASKS = ("How does {t} {a} work?", "Explain {t} {a} to a beginner.", "What are common mistakes in {t} {a}?",
        "Give me three facts about {t} {a}.", "Compare two approaches to {t} {a}.", "What changed in {t} {a} lately?",
        "Where can I learn {t} {a}?", "Summarise {t} {a} in one line.")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def card_fields(i: int, examples: int = 32) -> dict:
    """A distinct card for synthetic expert i: its own pair of topic words (and a number where pairs repeat)."""
    t, a = TOPICS[i % len(TOPICS)], ASPECTS[(i // len(TOPICS)) % len(ASPECTS)]
    tag = "" if i < len(TOPICS) * len(ASPECTS) else f" series {i // (len(TOPICS) * len(ASPECTS))}"
    return {"name": f"x{i:05d}", "description": f"Answers questions about {t} {a}{tag}.",
            "examples": [ASKS[j % len(ASKS)].format(t=t, a=a) + (f" Case {j}{tag}." if j >= len(ASKS) else tag)
                         for j in range(examples)]}


def write_adapter(settings: Settings, path: Path, seed: int) -> Path:
    """A rank-8 q/v LoRA (no card: the bench gives cards through the pool file or the API)."""
    from adapters.validate import ModelShape
    from training.synthetic import write_random_lora

    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    return write_random_lora(path, shape=shape, base_name=settings.base_model_name, seed=seed, rank=8, alpha=16,
                             strength=0.05, targets=("q_proj", "v_proj"))


def write_pool_file(state_dir: Path, entries: list[dict]) -> None:
    """The gateway's pool.json with these experts, as if each had been registered (the gateway validates every
    entry again when it starts)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "pool.json").write_text(json.dumps({"version": "", "experts": entries}))


def entry(path: Path, fields: dict) -> dict:
    return {"path": str(path.resolve()), "rank": 8, "target_modules": ["q_proj", "v_proj"], **fields, "extra": {}}


class Gateway:
    """`flock serve` as the bench starts it: given backends and Redis, a state directory, one expert root."""

    def __init__(self, settings: Settings, work: Path, backends: list[str], redis_url: str, root: Path,
                 name: str = "gateway", extra_env: dict[str, str] | None = None):
        from bench.stack import gateway_env
        from service.processes import ManagedProcess, free_port

        self.port = free_port()
        env = gateway_env(settings, library=root, backend=",".join(backends), redis_url=redis_url,
                          state_dir=work / "state", port=self.port)
        env.update(extra_env or {})
        self.proc = ManagedProcess(name, [sys.executable, "-m", "cli", "serve"], env, log_file=work / f"{name}.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 1800) -> float:
        """Start and wait for /ready; returns the seconds it took."""
        from service.processes import wait_http

        t0 = time.perf_counter()
        self.proc.start()
        wait_http(f"{self.url}/ready", timeout_s, self.proc, "gateway")
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.stop()

    def rss_mib(self) -> float:
        return rss_mib(self.proc.proc.pid) if self.proc.proc is not None else float("nan")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (vLLM runs its engine in a child process), MiB."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                children = open(f"/proc/{p}/task/{task}/children").read().split()
                pids += [int(c) for c in children]
        except OSError:
            continue
    return total / 1024


# --- registration ---------------------------------------------------------------------------------------
def seed_card_vectors(settings: Settings, state_dir: Path, cards: list[dict], seed: int = 0) -> None:
    """Store random unit vectors as the embedded cards (the gateway reads them at start instead of embedding):
    for pools too large to embed on a small machine within a bench run. Registration costs the same whatever
    the vectors hold; the registered expert itself is embedded for real."""
    from router.card_vectors import CardVectors, CardVectorStore, card_key
    from router.embed import model_id
    from service.models import embed_model_dir

    ident = model_id(settings.embed_model_dir or embed_model_dir(), int8=settings.embed_int8)
    dim = json.loads(((settings.embed_model_dir or embed_model_dir()) / "config.json").read_text())["hidden_size"]
    store = CardVectorStore(state_dir / "card-vectors")
    rng = np.random.default_rng(seed)
    for fields in cards:
        rows = rng.standard_normal((1 + len(fields["examples"]), dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store.put(card_key(ident, fields["description"], fields["examples"]), CardVectors(rows[0], rows[1:]))


async def registration(settings: Settings, n: int, work: Path, redis_url: str, backend: str, adapter: Path,
                       registrations: int = 7, examples: int = 32, cold: bool = True) -> dict:
    """Start a gateway with `n` experts registered (cold: every card embedded at start; then warm: the card
    vectors read from disk), register `registrations` more through the API one at a time and time each.
    Without `cold`, the card vectors are seeded (seed_card_vectors) and only the warm start is timed."""
    work.mkdir(parents=True, exist_ok=True)
    cards = [card_fields(i, examples) for i in range(n)]
    write_pool_file(work / "state", [entry(adapter, c) for c in cards])
    gw = Gateway(settings, work, [backend], redis_url, adapter.parent, name=f"gateway-{n}")
    out: dict = {"experts": n, "examples_per_expert": examples, "card_vectors": "embedded" if cold else "seeded"}
    if cold:
        try:
            out["startup_cold_s"] = gw.start()
            say(f"  {n} experts: cold start {out['startup_cold_s']:.1f} s (every card embedded)")
        finally:
            gw.stop()
    else:
        seed_card_vectors(settings, work / "state", cards)
    try:
        out["startup_warm_s"] = gw.start()
        say(f"  {n} experts: warm start {out['startup_warm_s']:.1f} s (card vectors from disk)")
        times = []
        async with httpx.AsyncClient(timeout=600) as client:
            ready = (await client.get(f"{gw.url}/ready")).json()
            out["pool_at_start"] = ready.get("pool", {}).get("experts")
            # Registrations are timed on a settled gateway: after it has loaded its experts ahead of need.
            out["preload_s"], out["preloaded"] = await wait_preloaded(client, gw.url)
            say(f"  {n} experts: {out['preloaded']:.0f} loaded ahead of need in {out['preload_s']:.1f} s")
            for k in range(registrations):
                fields = card_fields(10 * n + k + 7, examples)
                t0 = time.perf_counter()
                r = await client.post(f"{gw.url}/v1/experts", json={"path": str(adapter), **fields})
                times.append(time.perf_counter() - t0)
                assert r.status_code == 201, r.text
            listed = (await client.get(f"{gw.url}/v1/experts")).json()["data"]
            assert len(listed) == n + registrations, len(listed)
        out["register_ms"] = [t * 1e3 for t in times]
        out["register_ms_p50"] = pct(times, 50) * 1e3
        out["gateway_rss_mib"] = gw.rss_mib()
        say(f"  {n} experts: register p50 {out['register_ms_p50']:.0f} ms ("
            + ", ".join(f"{t * 1e3:.0f}" for t in times) + ")")
    finally:
        gw.stop()
    return out


# --- Zipf traffic ---------------------------------------------------------------------------------------
def zipf_names(names: list[str], count: int, rng: random.Random, exponent: float = 1.0) -> list[str]:
    """`count` draws from `names` with P(rank k) proportional to 1 / k**exponent (ranks in a shuffled order)."""
    order = names[:]
    rng.shuffle(order)
    weights = [1 / (k + 1) ** exponent for k in range(len(order))]
    return rng.choices(order, weights=weights, k=count)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric family in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _buckets(text: str, name: str) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for key, value in metric_samples(text, f"{name}_bucket").items():
        le = key.split('le="')[1].split('"')[0]
        bound = float("inf") if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0) + value
    return buckets


def histogram_quantile(text: str, name: str, q: float, since: str | None = None) -> float:
    """Quantile of a Prometheus histogram summed over its label sets (linear within a bucket); with `since` (an
    earlier scrape), of the observations made after it only."""
    buckets = _buckets(text, name)
    if since is not None:
        before = _buckets(since, name)
        buckets = {b: v - before.get(b, 0) for b, v in buckets.items()}
    if not buckets:
        return float("nan")
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return float("nan")
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return prev_bound
            return prev_bound + (b - prev_bound) * (rank - prev_count) / max(buckets[b] - prev_count, 1e-9)
        prev_bound, prev_count = b, buckets[b]
    return bounds[-1]


async def zipf_load(client: httpx.AsyncClient, gateway: str, names: list[str], concurrency: int,
                    max_tokens: int) -> tuple[float, int, int]:
    """(output tokens/s, errors, tokens) of `names` requests (one per name, in order) at `concurrency`."""
    queue = list(enumerate(names))
    tokens, errors = 0, 0

    async def worker() -> None:
        nonlocal tokens, errors
        while queue:
            i, name = queue.pop(0)
            body = {"model": name, "messages": [{"role": "user", "content": f"Tell me about item {i}."}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            try:
                r = await client.post(f"{gateway}/v1/chat/completions", json=body)
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
                else:
                    errors += 1
                    say(f"    error {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                errors += 1
                say(f"    error: {exc!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - t0), errors, tokens


def adapter_loads(metrics: str) -> float:
    return sum(metric_samples(metrics, "flock_adapter_loads_total").values())


async def wait_preloaded(client: httpx.AsyncClient, gateway: str, timeout_s: float = 900) -> tuple[float, float]:
    """(seconds, loads) until the gateway's loading ahead of need (service/preload.py) is done: its load count
    has stopped moving for 3 s. Timed from the gateway's readiness."""
    t0, last, still = time.perf_counter(), -1.0, time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        loads = adapter_loads((await client.get(f"{gateway}/metrics")).text)
        if loads != last:
            last, still = loads, time.perf_counter()
        elif time.perf_counter() - still >= 3.0:
            return still - t0, loads
        await asyncio.sleep(0.25)
    return float("nan"), last


async def zipf_serving(gateway: str, many: list[str], few: list[str], rounds: int, requests: int,
                       concurrency: int, max_tokens: int, seed: int = 0) -> dict:
    """Tokens/s of Zipf traffic over `many` experts vs the same load over `few`, interleaved round by round,
    once the gateway has loaded what it loads ahead of need."""
    rng = random.Random(seed)
    ratios, many_tok_s, few_tok_s, errors = [], [], [], 0
    distinct = set()
    # Idle connections dropped after 1 s, well before uvicorn's 5 s keep-alive ends: a request is never sent on a
    # connection the server is closing (an httpx ReadError that would count as an error of the gateway).
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(keepalive_expiry=1.0)) as client:
        preload_s, preloaded = await wait_preloaded(client, gateway)
        say(f"  loaded ahead of need: {preloaded:.0f} adapters in {preload_s:.1f} s")
        await zipf_load(client, gateway, few * 2, concurrency, 2)  # the 8 experts loaded once, not counted
        before = (await client.get(f"{gateway}/metrics")).text
        for r in range(rounds):
            draw_many, draw_few = zipf_names(many, requests, rng), zipf_names(few, requests, rng)
            distinct |= set(draw_many)
            pair = [("many", draw_many), ("few", draw_few)]
            results = {}
            for label, draw in (pair if r % 2 == 0 else pair[::-1]):
                tok_s, errs, _ = await zipf_load(client, gateway, draw, concurrency, max_tokens)
                results[label] = tok_s
                errors += errs
            many_tok_s.append(results["many"])
            few_tok_s.append(results["few"])
            ratios.append(results["many"] / results["few"])
            say(f"  zipf round {r + 1}/{rounds}: {len(many)} experts {results['many']:.1f} tok/s, {len(few)} experts "
                f"{results['few']:.1f} tok/s, ratio {ratios[-1]:.3f} ({len(set(draw_many))} distinct experts)")
        metrics = (await client.get(f"{gateway}/metrics")).text
    load, loads = "flock_adapter_load_seconds", adapter_loads(metrics)
    return {"ratio": statistics.median(ratios), "ratios": ratios, "many_tok_s": statistics.median(many_tok_s),
            "few_tok_s": statistics.median(few_tok_s), "errors": errors, "distinct_experts_drawn": len(distinct),
            "preload_s": preload_s, "preloaded": preloaded, "adapter_loads": loads,
            "adapter_loads_in_rounds": loads - adapter_loads(before),
            # every load through the API (ahead of need, then on first use), and those the timed rounds waited for
            "adapter_load_ms_p50": histogram_quantile(metrics, load, 0.5) * 1e3,
            "adapter_load_ms_p99": histogram_quantile(metrics, load, 0.99) * 1e3,
            "adapter_load_ms_p50_in_rounds": histogram_quantile(metrics, load, 0.5, since=before) * 1e3,
            "adapter_load_ms_p99_in_rounds": histogram_quantile(metrics, load, 0.99, since=before) * 1e3}


# --- the run --------------------------------------------------------------------------------------------
async def serving(settings: Settings, n: int, work: Path, redis_url: str, backend: str | None, vectors: Path | None,
                  quick: bool) -> dict:
    """Zipf traffic over `n` distinct synthetic experts vs the same load over 8 of them, through `flock serve`
    on a real vLLM (started here unless `backend` is given)."""
    import shutil

    from service.processes import ManagedProcess, free_port, vllm_command, wait_http

    root = work / "adapters"
    say(f"  writing {n} rank-8 adapters under {root}")
    cards = [card_fields(i) for i in range(n)]
    for i in range(n):
        write_adapter(settings, root / cards[i]["name"], seed=1000 + i)
    write_pool_file(work / "state", [entry(root / c["name"], c) for c in cards])
    if vectors is not None and vectors.is_dir():  # the cards the registration run embedded: a warm start
        shutil.copytree(vectors, work / "state" / "card-vectors", dirs_exist_ok=True)
    procs = []
    try:
        if backend is None:
            port = free_port()
            argv, env = vllm_command(settings, port=port)
            vllm = ManagedProcess("vLLM", argv, env, log_file=work / "vllm.log")
            say(f"  starting vLLM (max_loras {settings.vllm_max_loras}, max_cpu_loras {settings.vllm_max_cpu_loras}; "
                f"log {work / 'vllm.log'})")
            vllm.start()
            procs.append(vllm)
            backend = f"http://127.0.0.1:{port}"
            wait_http(f"{backend}/health", 900, vllm, "vLLM")
        gw = Gateway(settings, work, [backend], redis_url, root, name="gateway-serve")
        startup = gw.start()
        procs.append(gw.proc)
        say(f"  gateway up with {n} experts in {startup:.1f} s")
        names = [c["name"] for c in cards]
        rounds, requests = (2, 32) if quick else (7, 64)
        out = await zipf_serving(gw.url, names, names[:8], rounds=rounds, requests=requests, concurrency=16,
                                 max_tokens=32)
        out["gateway_rss_mib"] = gw.rss_mib()
        first = procs[0].proc
        own_vllm = backend and first is not None and procs[0] is not gw.proc
        out["vllm_rss_mib"] = rss_mib(first.pid) if own_vllm and first is not None else float("nan")
        out["startup_s"] = startup
        out["workload"] = {"experts": n, "few": 8, "zipf_exponent": 1.0, "rounds": rounds,
                           "requests_per_side_per_round": requests, "concurrency": 16, "max_tokens": 32,
                           "adapters": "rank 8, q_proj and v_proj, bf16"}
        return out
    finally:
        for p in reversed(procs):
            p.stop()


ROUTING_SIZES = (10, 100, 1000, 10000)


async def run(settings: Settings, n: int, *, backend: str | None, quick: bool, scale: int, serve: bool,
              cold: bool = False, placement_only: bool = False, register_at: tuple[int, ...] = (),
              placement: bool = True) -> dict:
    """The whole bench; `register_at`: pool sizes at which registration is also timed (e.g. 10 and 100 for the
    chart), before the one at `n`."""
    import tempfile

    from bench.run import router_scaling
    from service.processes import ManagedProcess, free_port, redis_command, wait_http, wait_redis

    result: dict = {"experts": n, "quick": quick}
    if not placement_only:
        say(f"routing decision against synthetic pools of {', '.join(map(str, ROUTING_SIZES))} experts (in process)")
        routing = router_scaling(ROUTING_SIZES, repeats=50 if quick else 200)
        result.update({f"router_ms_p50_at_{k}_experts": routing[f"global_{k}"] for k in ROUTING_SIZES})
    with tempfile.TemporaryDirectory(prefix="flock-many-") as tmp:
        work = Path(tmp)
        redis_port, fake_port = free_port(), free_port()
        procs = [ManagedProcess("redis-server", redis_command(redis_port, work)),
                 ManagedProcess("fake backend", [sys.executable, "-m", "uvicorn", "bench.fake_backend:app", "--port",
                                                 str(fake_port), "--log-level", "warning"], log_file=work / "fake.log")]
        for p in procs:
            p.start()
        try:
            wait_redis(redis_port)
            fake = f"http://127.0.0.1:{fake_port}"
            wait_http(f"{fake}/health", 60, procs[1])
            adapter = write_adapter(settings, work / "shared" / "adapter", seed=0)
            if placement or placement_only:
                say("placement: rendezvous vs LoRA affinity scorer, two modelled backends, Zipf traffic")
                place = await placement_run(settings, work / "placement", f"redis://127.0.0.1:{redis_port}/3",
                                            adapter, requests=400 if quick else 1000, rounds=1 if quick else 2)
                result["placement"] = place
                for policy in ("rendezvous", "scorer"):
                    result[f"placement_{policy}_loads_per_1000"] = place[f"{policy}_loads_per_1000"]
                    result[f"placement_{policy}_p95_ms"] = place[f"{policy}_p95_ms"]
                say("so far: " + json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
            if placement_only:
                return result
            result["registration"] = {}
            for k, size in enumerate(register_at[:10]):  # a Redis database each: the pool is shared through it
                say(f"registration with {size} experts registered (card vectors seeded)")
                small = await registration(settings, size, work / f"reg-{size}",
                                           f"redis://127.0.0.1:{redis_port}/{4 + k}", fake, adapter,
                                           registrations=5 if quick else 9, cold=False)
                result[f"register_ms_p50_at_{size}"] = small["register_ms_p50"]
                result[f"startup_s_warm_at_{size}"] = small["startup_warm_s"]
                result["registration"][size] = small
            say(f"registration with {n} experts registered (instant fake backend)")
            reg = await registration(settings, n, work / f"reg-{n}", f"redis://127.0.0.1:{redis_port}/0", fake,
                                     adapter, registrations=5 if quick else 9, cold=cold)
            result[f"register_ms_p50_at_{n}"] = reg["register_ms_p50"]
            if cold:
                result[f"startup_s_cold_at_{n}"] = reg["startup_cold_s"]
            result[f"startup_s_warm_at_{n}"] = reg["startup_warm_s"]
            result["registration"][n] = reg
            say("so far: " + json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
            if serve:
                say(f"Zipf traffic over {n} experts vs 8, through flock serve on vLLM")
                srv = await serving(settings, n, work / "serve", f"redis://127.0.0.1:{redis_port}/2", backend,
                                    work / f"reg-{n}" / "state" / "card-vectors", quick)
                result["many_experts_throughput_ratio"] = srv["ratio"]
                result["many_experts_errors"] = srv["errors"]
                result["adapter_load_ms_p50"] = srv["adapter_load_ms_p50"]
                result["adapter_load_ms_p99"] = srv["adapter_load_ms_p99"]
                result["preload_s"] = srv["preload_s"]
                result["gateway_rss_mib"] = srv["gateway_rss_mib"]
                result["vllm_rss_mib"] = srv["vllm_rss_mib"]
                result["serving"] = srv
                say("so far: " + json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
            if scale > 1:
                big = n * scale
                say(f"registration with {big} experts registered (card vectors seeded)")
                reg_big = await registration(settings, big, work / f"reg-{big}", f"redis://127.0.0.1:{redis_port}/1",
                                             fake, adapter, registrations=5 if quick else 9, cold=False)
                result[f"register_ms_p50_at_{big}"] = reg_big["register_ms_p50"]
                result[f"startup_s_warm_at_{big}"] = reg_big["startup_warm_s"]
                result["registration"][big] = reg_big
        finally:
            for p in reversed(procs):
                p.stop()
    result["vllm_settings"] = {"max_loras": settings.vllm_max_loras, "max_cpu_loras": settings.vllm_max_cpu_loras,
                               "max_num_seqs": settings.vllm_max_num_seqs, "external_backend": backend}
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


GOALS = [("register_ms_p50_at_1000", "<=", 1000.0), ("many_experts_throughput_ratio", ">=", 0.85),
         ("many_experts_errors", "==", 0)]


def table(result: dict) -> str:
    goals = {k: f"{op} {v:g}" for k, op, v in GOALS}
    rows = ["| figure | value | goal |", "|---|---|---|"]
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "experts":
            rows.append(f"| `{key}` | {value:.3f} | {goals.get(key, '')} |")
    return "\n".join(rows)


# --- placement ------------------------------------------------------------------------------------------
async def timed_requests(gateway: str, names: list[str], concurrency: int) -> tuple[list[float], int]:
    """(latency of each request, errors): one 1-token chat request per name, `concurrency` at a time."""
    latencies: list[float] = []
    errors = 0
    queue = list(names)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(keepalive_expiry=1.0)) as client:
        async def worker() -> None:
            nonlocal errors
            while queue:
                name = queue.pop(0)
                t0 = time.perf_counter()
                try:
                    resp = await client.post(f"{gateway}/v1/chat/completions", json={
                        "model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
                except httpx.HTTPError as exc:
                    errors += 1
                    say(f"    error: {exc!r}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    errors += 1
                    say(f"    error {resp.status_code}: {resp.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def placement_run(settings: Settings, work: Path, redis_url: str, adapter: Path, *, experts: int = 200,
                    requests: int = 1000, concurrency: int = 32, rounds: int = 2) -> dict:
    """Rendezvous hashing vs the LoRA affinity scorer over two modelled multi-LoRA backends
    (bench/fake_lora_backend.py) under Zipf traffic: adapter loads (CPU cache misses and slot swaps) per 1,000
    requests, and p95 latency. Fresh backends and gateway per policy and round; the policies alternate."""
    from service.processes import ManagedProcess, free_port, wait_http

    cards = [card_fields(i, examples=4) for i in range(experts)]
    names = [c["name"] for c in cards]
    out: dict = {"experts": experts, "requests": requests, "concurrency": concurrency, "rounds": rounds,
                 "backend_model": {"max_loras": 8, "max_cpu_loras": 16, "load_ms": 40, "step_ms": 200, "max_seqs": 16}}
    samples: dict[str, dict[str, list[float]]] = {p: {"loads": [], "p95": [], "p50": []}
                                                  for p in ("rendezvous", "scorer")}
    for r in range(rounds):
        draw = zipf_names(names, requests, random.Random(r))
        for policy in (("rendezvous", "scorer") if r % 2 == 0 else ("scorer", "rendezvous")):
            run_dir = work / f"{policy}-{r}"
            run_dir.mkdir(parents=True)
            write_pool_file(run_dir / "state", [entry(adapter, c) for c in cards])
            seed_card_vectors(settings, run_dir / "state", cards)
            env = {**os.environ, "FAKE_MAX_LORAS": "8", "FAKE_MAX_CPU_LORAS": "16", "FAKE_LOAD_MS": "40",
                   "FAKE_STEP_MS": "200", "FAKE_MAX_SEQS": "16"}
            ports = [free_port(), free_port()]
            backends = [ManagedProcess(f"fake LoRA backend {i}", [sys.executable, "-m", "uvicorn",
                                       "bench.fake_lora_backend:app", "--port", str(p), "--log-level", "warning"],
                                       env, log_file=run_dir / f"backend{i}.log") for i, p in enumerate(ports)]
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            gw = Gateway(settings, run_dir, urls, redis_url, adapter.parent, name=f"gateway-{policy}",
                         extra_env={"FLOCK_PLACEMENT": policy, "FLOCK_PRELOAD_EXPERTS": "0"})
            try:
                for b, url in zip(backends, urls):
                    b.start()
                    wait_http(f"{url}/health", 60, b)
                gw.start()
                latencies, errors = await timed_requests(gw.url, draw, concurrency)
                async with httpx.AsyncClient(timeout=60) as client:
                    stats = [(await client.get(f"{u}/stats")).json() for u in urls]
                if errors:
                    log = (run_dir / f"gateway-{policy}.log").read_text(errors="replace").splitlines()
                    say("  gateway log (last lines):\n" + "\n".join(log[-15:]))
            finally:
                gw.stop()
                for b in backends:
                    b.stop()
            loads = sum(s["cpu_loads"] + s["slot_swaps"] for s in stats)
            samples[policy]["loads"].append(loads * 1000 / requests)
            samples[policy]["p95"].append(pct(latencies, 95) * 1e3)
            samples[policy]["p50"].append(pct(latencies, 50) * 1e3)
            say(f"  placement {policy} round {r + 1}/{rounds}: {loads * 1000 / requests:.0f} adapter loads per 1,000 "
                f"requests (per backend: {[s['requests'] for s in stats]} requests, "
                f"{[s['cpu_loads'] for s in stats]} CPU loads, {[s['slot_swaps'] for s in stats]} slot swaps), "
                f"p95 {pct(latencies, 95) * 1e3:.0f} ms, errors {errors}")
            out.setdefault("errors", 0)
            out["errors"] += errors
    for policy, s in samples.items():
        out[f"{policy}_loads_per_1000"] = statistics.median(s["loads"])
        out[f"{policy}_p95_ms"] = statistics.median(s["p95"])
        out[f"{policy}_p50_ms"] = statistics.median(s["p50"])
    return out


# --- the chart ------------------------------------------------------------------------------------------
def merged(results: list[dict]) -> dict:
    """Several runs' results as one for the chart: registration by pool size and routing from any run (a later
    run's figure replaces an earlier one's), serving from the last run that served; `dates` lists each run's."""
    out: dict = {"registration": {}, "routing": {}, "serving": None, "dates": []}
    for r in results:
        out["dates"].append(r.get("date", "?"))
        for size, reg in (r.get("registration") or {}).items():
            out["registration"][int(size)] = {**reg, "date": r.get("date", "?")}
        for key, value in r.items():
            if key.startswith("router_ms_p50_at_") and isinstance(value, (int, float)):
                out["routing"][int(key.split("_at_")[1].split("_")[0])] = value
        if r.get("serving"):
            out["serving"] = {**r["serving"], "experts": r.get("experts"), "date": r.get("date", "?"),
                              "vllm_settings": r.get("vllm_settings", {})}
    return out


def _when(date: str) -> float:
    try:
        return time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return 0.0


def chart(results: list[dict], path: Path) -> bool:
    """docs/img/many_experts.png: what the number of experts costs. Routing decision and registration p50
    against the pool size (log scales), and tokens/s of Zipf traffic over N experts against 8. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    m = merged(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    routing = sorted(m["routing"].items())
    if routing:
        axes[0].plot([k for k, _ in routing], [v for _, v in routing], marker="o")
        for k, v in routing:
            axes[0].annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_title("routing decision p50 (ms), in process, embedding excluded", fontsize=10)
    reg = sorted(m["registration"].items())
    if reg:
        sizes = [k for k, _ in reg]
        axes[1].plot(sizes, [r["register_ms_p50"] for _, r in reg], marker="o", label="register one more, p50 (ms)")
        latest = max(_when(r["date"]) for _, r in reg)
        for k, r in reg:  # a point from a run hours earlier says which (the machine's load differs between runs)
            note = "" if latest - _when(r["date"]) < 3600 else f"\n(run of {r['date']})"
            axes[1].annotate(f"{r['register_ms_p50']:.0f}{note}", (k, r["register_ms_p50"]),
                             textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        axes[1].axhline(1000, color="#c33", linestyle=":", linewidth=1, label="goal at 1,000: 1,000 ms")
        twin = axes[1].twinx()
        twin.plot(sizes, [r.get("startup_warm_s", float("nan")) for _, r in reg], marker="s", color="#999",
                  linestyle="--", label="start-up (s)")
        twin.set_ylabel("start-up to /ready (s)", color="#777")
        twin.set_yscale("log")
        lines = axes[1].get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        axes[1].legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    axes[1].set_title("registration through the API")
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("experts in pool")
    srv = m["serving"]
    if not srv:
        axes[2].text(0.5, 0.5, "serving not run", ha="center", va="center", transform=axes[2].transAxes)
    else:
        labels = ["8 experts", f"{srv['experts']:,} experts"]
        axes[2].bar(labels, [srv["few_tok_s"], srv["many_tok_s"]], color=["#888", "#2a7"])
        for i, v in enumerate([srv["few_tok_s"], srv["many_tok_s"]]):
            axes[2].annotate(f"{v:.1f}", (i, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
        vs = srv.get("vllm_settings", {})
        axes[2].set_title(f"Zipf serving, tokens/s: ratio {srv['ratio']:.2f} (goal 0.85)", fontsize=10)
        loads = f"load p50 {srv['adapter_load_ms_p50'] / 1e3:.2f} s, p99 {srv['adapter_load_ms_p99'] / 1e3:.1f} s"
        axes[2].set_xlabel(f"max_loras {vs.get('max_loras')}, max_cpu_loras {vs.get('max_cpu_loras')}; adapter {loads}",
                           fontsize=8)
    fig.suptitle("flock: cost against the number of experts (`flock bench --many-experts`; runs of "
                 + ", ".join(sorted(set(m["dates"]))) + ")", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return True
