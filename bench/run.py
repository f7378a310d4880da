"""`flock bench`: every figure measured side by side in one run, on the real stack (redis-server, vLLM, the
gateway started with `flock serve`). Ratios compare measurements interleaved in time, so machine noise hits
both sides alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.stack import LocalStack
from router.decision import ALWAYS_MIX
from service.settings import Settings

MAX_TOKENS = 32
# Synthetic experts: topics far apart, so each bench query routes to a known expert.
TOPICS = {
    "cooking": "Cooking and baking help: recipes, bread dough, cakes, sauces and kitchen techniques.",
    "arith": "Arithmetic calculator: adds, subtracts and multiplies integers.",
    "sqlgen": "Writes SQL queries over an employees database table.",
    "astro": "Explains astronomy: planets, stars, galaxies and telescopes.",
    "garden": "Gardening advice: planting vegetables, pruning roses, watering and soil.",
    "legal": "Explains contract law terms, leases and tenant rights.",
    "music": "Music theory: chords, scales, rhythm and harmony.",
    "fitness": "Fitness coaching: workout plans, running, strength training and stretching.",
}
QUERY = "Give me a recipe for banana bread, please. Order {}."  # routes to cooking; {} keeps it a cache miss


def nonce() -> str:
    """Ten random digits: one token each for SmolLM2's tokenizer, so every request's prompt has the same length."""
    return str(random.randrange(10**9, 10**10))


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --- stack ----------------------------------------------------------------------------------------------
def write_experts(settings: Settings, root: Path) -> Path:
    """8 synthetic rank-8 all-linear experts with far-apart descriptions."""
    from adapters.card import ExpertCard
    from adapters.gates import compute_arrow_gates, load_lora, write_gates
    from adapters.validate import ModelShape
    from training.synthetic import write_random_lora

    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    for seed, (name, description) in enumerate(TOPICS.items()):
        path = write_random_lora(root / name, shape=shape, base_name=settings.base_model_name, seed=seed,
                                 rank=8, alpha=16, strength=0.05,
                                 targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                 card=ExpertCard(name=name, description=description))
        # Gate signals so the per-token modes can be timed: real Arrow prototypes, random PHATGOOSE vectors
        # (their values change which expert a token picks, not what a token costs).
        compute_arrow_gates(path)
        gen = torch.Generator().manual_seed(seed)
        factors, _ = load_lora(path)
        write_gates(path, "phatgoose", {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in factors.items()})
    return root


# --- end-to-end latency ---------------------------------------------------------------------------------
def _body(model: str, prompt: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}


async def _timed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = await client.post(url, json=body)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    if "x-flock-backend-ms" in r.headers:  # what the gateway waited for vLLM (its hop to vLLM included)
        data["_backend_s"] = float(r.headers["x-flock-backend-ms"]) / 1e3
    return elapsed, data


async def overhead(stack: LocalStack, concurrency: int, rounds: int) -> dict:
    """Routed (auto, cache miss) through the gateway vs the same request straight to vLLM with the same
    adapter; rounds alternate which side goes first. Each side has its own nonce in the prompt (same length):
    with one prompt for both, the second side's prefill would hit vLLM's prefix cache, so each side's samples
    would fall in two groups (first or second in its round) and its p50 land anywhere between them."""
    gw, direct, paired, added = [], [], [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(rounds):
            prompts = [(QUERY.format(nonce()), QUERY.format(nonce())) for _ in range(concurrency)]

            async def via_gateway(prompts=prompts) -> list[tuple[float, dict]]:
                return await asyncio.gather(*(_timed(client, f"{stack.gateway}/v1/chat/completions",
                                                     _body("auto", p)) for p, _ in prompts))

            async def via_vllm(prompts=prompts) -> list[tuple[float, dict]]:
                return await asyncio.gather(*(_timed(client, f"{stack.vllm}/v1/chat/completions",
                                                     _body("cooking", p)) for _, p in prompts))

            if r % 2 == 0:
                g, d = await via_gateway(), await via_vllm()
            else:
                d, g = await via_vllm(), await via_gateway()
            for (tg, bg), (td, bd) in zip(g, d):
                assert bg["routing"]["experts"][0]["name"] == "cooking" and not bg["routing"]["cached"], bg["routing"]
                assert bg["usage"]["completion_tokens"] == bd["usage"]["completion_tokens"] == MAX_TOKENS
                gw.append(tg)
                direct.append(td)
                paired.append(tg - td)
                added.append(tg - bg["_backend_s"])
            say(f"  overhead c={concurrency} round {r + 1}/{rounds}: gateway p50 {pct(gw, 50) * 1e3:.0f} ms, "
                f"vLLM p50 {pct(direct, 50) * 1e3:.0f} ms")
    # Two readings of "added": the difference of the two p50s (what a client sees, but a 32-token generation
    # varies by tens of ms between runs on a busy 2-core machine), and per request the client's time minus the
    # time the gateway waited for vLLM (everything the gateway itself adds, free of generation noise).
    return {"gateway_p50_ms": pct(gw, 50) * 1e3, "vllm_p50_ms": pct(direct, 50) * 1e3,
            "ratio_p50": pct(gw, 50) / pct(direct, 50),
            "diff_of_p50_ms": (pct(gw, 50) - pct(direct, 50)) * 1e3,
            "paired_diff_ms_p50": pct(paired, 50) * 1e3,
            "added_ms_p50": pct(added, 50) * 1e3, "added_ms_p99": pct(added, 99) * 1e3, "samples": len(gw)}


async def short_overhead(stack: LocalStack, n: int) -> dict:
    """1-token completions, routed through the gateway vs straight to vLLM, alternating: the generation is
    short, so the side-by-side difference resolves a few milliseconds. A nonce per side, as in overhead()."""
    gw: list[float] = []
    direct: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(n):
            pair = [("gw", f"{stack.gateway}/v1/chat/completions", "auto"),
                    ("vllm", f"{stack.vllm}/v1/chat/completions", "cooking")]
            for side, url, model in (pair if i % 2 == 0 else pair[::-1]):
                t, _ = await _timed(client, url, {**_body(model, QUERY.format(nonce())), "max_tokens": 1})
                (gw if side == "gw" else direct).append(t)
    return {"gateway_p50_ms": pct(gw, 50) * 1e3, "vllm_p50_ms": pct(direct, 50) * 1e3,
            "added_ms_p50": (pct(gw, 50) - pct(direct, 50)) * 1e3}


async def gateway_self_time(stack: LocalStack, n: int) -> dict:
    """What the gateway spends before forwarding (x-flock-gateway-ms), for a cache miss and a cache hit,
    measured with a 1-token completion so generation does not dominate the run time."""
    miss, hit = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(n):
            body = {**_body("auto", QUERY.format(nonce())), "max_tokens": 1}
            r = await client.post(f"{stack.gateway}/v1/chat/completions", json=body)
            miss.append(float(r.headers["x-flock-gateway-ms"]))
            r = await client.post(f"{stack.gateway}/v1/chat/completions", json=body)
            assert r.headers["x-flock-cache"] == "hit"
            hit.append(float(r.headers["x-flock-gateway-ms"]))
    return {"miss_ms_p50": pct(miss, 50), "miss_ms_p99": pct(miss, 99), "hit_ms_p50": pct(hit, 50),
            "hit_ms_p99": pct(hit, 99)}


async def mixed_adapters(stack: LocalStack, rounds: int, requests: int = 16) -> dict:
    """Output tokens/s: `requests` spread over 8 experts vs the same load on one expert (straight to vLLM)."""
    experts = list(TOPICS)

    async def load(models: list[str]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(_timed(client, f"{stack.vllm}/v1/chat/completions",
                                                 _body(m, f"Tell me about topic {i}.")) for i, m in enumerate(models)))
            wall = time.perf_counter() - t0
        return sum(b["usage"]["completion_tokens"] for _, b in outs) / wall

    spread = [experts[i % len(experts)] for i in range(requests)]
    # One pair first, not counted: the first mixed batches of a size pay one-off costs (oneDNN primitives for
    # new shapes, packing the all-slot matrices, prefix-cache misses) that a serving replica pays once.
    warmup = (await load(spread)) / (await load(["cooking"] * requests))
    say(f"  mixed adapters warm-up pair (not counted): ratio {warmup:.3f}")
    mixed, single, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            mixed.append(await load(spread))
            single.append(await load(["cooking"] * requests))
        else:
            single.append(await load(["cooking"] * requests))
            mixed.append(await load(spread))
        ratios.append(mixed[-1] / single[-1])
        say(f"  mixed adapters round {r + 1}/{rounds}: 8 experts {mixed[-1]:.1f} tok/s, one expert {single[-1]:.1f} "
            f"tok/s, ratio {ratios[-1]:.3f}")
    # The ratio of each round's two adjacent loads, then the median over rounds: a slow drift of the machine's
    # speed cancels within a pair instead of moving one median against the other.
    return {"mixed_tok_s": statistics.median(mixed), "single_tok_s": statistics.median(single),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds,
            "warmup_ratio": warmup}


DECODE_MODES = ("base", "expert", "merge", "glider")


async def decode_throughput(stack: LocalStack, batches: tuple[int, ...], *, expert: str = "cooking",
                            prompt: str = TOPICS["cooking"], rounds: int = 3) -> dict:
    """Decode tokens/s at several batch sizes for the base model, one expert, a merge composite and a glider
    (per-token gated) composite. All go through the gateway, so the routed modes run exactly as served; the
    same prompt in every request of a batch keeps the routed ones on one composite. The modes take turns
    within each round and each figure is the median of `rounds`, so drift on a noisy machine hits all alike."""
    out: dict = {}
    bodies: dict[str, dict] = {"base": {"model": stack.settings.base_model_name}, "expert": {"model": expert},
              "merge": {"model": "auto", "routing": {"mode": "merge"}},
              # the gated composite is what is measured, even for a prompt the router is sure of
              "glider": {"model": "auto", "routing": {"mode": "glider", "solo_margin": ALWAYS_MIX}}}
    async with httpx.AsyncClient(timeout=600) as client:
        url = f"{stack.gateway}/v1/chat/completions"
        requests = {label: {**_body("", prompt), **bodies[label]} for label in DECODE_MODES}
        for label, body in requests.items():
            _, warm = await _timed(client, url, {**body, "max_tokens": 2})  # builds and loads the composite
            out[f"{label}_experts"] = [e["name"] for e in warm.get("routing", {}).get("experts", [])]
        for b in batches:
            samples: dict[str, list[float]] = {label: [] for label in DECODE_MODES}
            for _ in range(rounds):
                for label, body in requests.items():
                    t0 = time.perf_counter()
                    outs = await asyncio.gather(*(_timed(client, url, body) for _ in range(b)))
                    samples[label].append(sum(x["usage"]["completion_tokens"] for _, x in outs)
                                          / (time.perf_counter() - t0))
            for label in DECODE_MODES:
                out[f"{label}_b{b}_tok_s"] = statistics.median(samples[label])
                say(f"  decode {label} batch {b}: {out[f'{label}_b{b}_tok_s']:.1f} tok/s (median of {rounds}: "
                    + ", ".join(f"{x:.1f}" for x in samples[label]) + ")")
    for b in batches:
        out[f"glider_over_expert_b{b}"] = out[f"glider_b{b}_tok_s"] / out[f"expert_b{b}_tok_s"]
    return out


async def proxy_overhead(settings: Settings, library: Path, work: Path, n: int = 300) -> dict:
    """The gateway's own cost per request, against an instant fake backend (bench/fake_backend.py): what it
    adds for a direct-model request, a routed cache hit and a routed cache miss, compared with calling the
    fake backend directly. No model shares the CPU, so this isolates the gateway from vLLM's contention."""
    from bench.stack import gateway_env
    from service.processes import ManagedProcess, free_port, redis_command, wait_http, wait_redis

    fake_port, gw_port, redis_port = free_port(), free_port(), free_port()
    procs = [
        ManagedProcess("fake backend", [sys.executable, "-m", "uvicorn", "bench.fake_backend:app", "--port",
                                        str(fake_port), "--log-level", "warning"], log_file=work / "fake.log"),
        ManagedProcess("redis-server", redis_command(redis_port, work)),
    ]
    for p in procs:
        p.start()
    fake = f"http://127.0.0.1:{fake_port}"
    env = gateway_env(settings, library=library, backend=fake, redis_url=f"redis://127.0.0.1:{redis_port}/0",
                      state_dir=work / "proxy-state", port=gw_port)
    gw = ManagedProcess("gateway", [sys.executable, "-m", "cli", "serve"], env, log_file=work / "gw2.log")
    gw.start()
    procs.append(gw)
    out = {}
    try:
        wait_redis(redis_port)
        wait_http(f"{fake}/health", 60, procs[0])
        url = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{url}/ready", 120, gw)
        async with httpx.AsyncClient(timeout=60) as client:
            def body(model: str, text: str) -> dict:
                return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}

            cases = {
                "fake_direct": (fake, lambda i: body("cooking", QUERY.format(i))),
                "direct_model": (url, lambda i: body("cooking", QUERY.format(i))),
                "cache_hit": (url, lambda i: body("auto", QUERY.format("hit"))),
                "cache_miss": (url, lambda i: body("auto", QUERY.format(nonce()))),
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            for i in range(n + 30):  # interleaved, first 30 rounds are warm-up
                for name, (base, make) in cases.items():
                    t0 = time.perf_counter()
                    r = await client.post(f"{base}/v1/chat/completions", json=make(i))
                    if i >= 30:
                        times[name].append(time.perf_counter() - t0)
                    r.raise_for_status()
        base_p50 = pct(times["fake_direct"], 50)
        for name in ("direct_model", "cache_hit", "cache_miss"):
            out[f"{name}_added_ms_p50"] = (pct(times[name], 50) - base_p50) * 1e3
        out["fake_direct_ms_p50"] = base_p50 * 1e3
    finally:
        for p in reversed(procs):
            p.stop()
    return out


# --- in-process figures ---------------------------------------------------------------------------------
def router_scaling(sizes: tuple[int, ...], dim: int = 384, repeats: int = 200) -> dict:
    """One routing decision (query embedding excluded) against synthetic pools of N experts."""
    from router.decision import RoutingParams
    from router.index import ExpertIndex
    from router.methods import create_method
    from router.router import Router

    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = ExpertIndex(names=[f"e{i}" for i in range(n)], vectors=vectors, threshold=0.1)
        for mode in ("global", "merge"):
            method = create_method(mode)
            times = []
            for _ in range(repeats):
                q = rng.standard_normal(dim).astype(np.float32)
                q /= np.linalg.norm(q)
                t0 = time.perf_counter()
                Router.decide(q, method, RoutingParams(), index)
                times.append(time.perf_counter() - t0)
            out[f"{mode}_{n}"] = pct(times, 50) * 1e3
    return out


async def embedding(settings: Settings, repeats: int = 40) -> dict:
    from router.embed import Embedder, MicroBatcher
    from service.models import embed_model_dir

    batcher = MicroBatcher(Embedder(settings.embed_model_dir or embed_model_dir(), int8=settings.embed_int8))
    query = "Give me a recipe for banana bread, please."
    for _ in range(5):
        await batcher.embed(query)
    c1 = []
    for i in range(repeats):
        t0 = time.perf_counter()
        await batcher.embed(f"{query} {i}")
        c1.append(time.perf_counter() - t0)
    c16_latency, c16_wall = [], []
    for r in range(repeats // 4):
        async def one(i: int, r: int = r) -> None:
            t = time.perf_counter()
            await batcher.embed(f"{query} {r} {i}")
            c16_latency.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(16)))
        c16_wall.append(time.perf_counter() - t0)
    await batcher.stop()
    return {"c1_ms_p50": pct(c1, 50) * 1e3, "c16_ms_p50": pct(c16_latency, 50) * 1e3,
            "c16_wall_ms_p50": pct(c16_wall, 50) * 1e3,
            "c16_wall_over_16x_c1": pct(c16_wall, 50) / (16 * pct(c1, 50))}


async def cache_hit_route(stack: LocalStack, settings: Settings, n: int = 200) -> dict:
    """Router.route() on a cache hit against the real Redis (in-process, no HTTP)."""
    from adapters.pool import ExpertPool
    from adapters.validate import ModelShape
    from router.cache import RoutingCache
    from router.embed import Embedder, MicroBatcher
    from router.router import Router
    from service.models import embed_model_dir

    library = Path(stack.library)
    pool = ExpertPool(state_file=Path(tempfile.mkdtemp()) / "pool.json", roots=[library.resolve()],
                      base_name=settings.base_model_name,
                      shape=ModelShape.from_model_dir(settings.resolved_base_model_dir), max_rank=64)
    pool.load(seed_dir=library)
    cache = RoutingCache(stack.redis_url, 600)
    embedder = Embedder(settings.embed_model_dir or embed_model_dir(), int8=settings.embed_int8)
    router = Router(pool, MicroBatcher(embedder), cache)
    await router.rebuild_index()
    await router.route(QUERY.format("hit"))
    await router.drain()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = await router.route(QUERY.format("hit"))
        times.append(time.perf_counter() - t0)
        assert result.cache == "hit"
    await cache.close()
    await router.embedder.stop()
    return {"route_ms_p50": pct(times, 50) * 1e3, "route_ms_p99": pct(times, 99) * 1e3}


# --- the run --------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "platform": platform.platform()}


async def run(settings: Settings, backend: str | None, quick: bool) -> dict:
    # 40 rounds at concurrency 1: a 32-token request's time spreads ±25% between requests on this 2-core VM, and
    # the ratio's goal is 5%; 16 rounds left the p50s' ratio a few percent of noise.
    rounds1, rounds16, mixed_rounds = (3, 1, 1) if quick else (40, 3, 15)
    with tempfile.TemporaryDirectory(prefix="flock-bench-") as tmp:
        say("in-process: router scaling and query embedding")
        router = router_scaling((10, 100, 1000, 10000))
        embed = await embedding(settings)
        say(f"  router p50 at 10,000 experts: {router['global_10000']:.3f} ms; embed c1 {embed['c1_ms_p50']:.1f} ms")
        library = write_experts(settings, Path(tmp) / "experts")
        say("gateway against an instant fake backend (its own cost, no model on the CPU)")
        proxy = await proxy_overhead(settings, library, Path(tmp), n=60 if quick else 300)
        say(f"  added p50: direct model {proxy['direct_model_added_ms_p50']:.2f} ms, cache hit "
            f"{proxy['cache_hit_added_ms_p50']:.2f} ms, cache miss {proxy['cache_miss_added_ms_p50']:.2f} ms")
        say("starting the stack (redis-server, vLLM, gateway)")
        stack = LocalStack(settings, library, backend, Path(tmp))
        try:
            say("warm-up: loading the 8 experts into vLLM")
            async with httpx.AsyncClient(timeout=600) as client:
                for name in TOPICS:
                    await _timed(client, f"{stack.gateway}/v1/chat/completions", {**_body(name, "hi"), "max_tokens": 2})
                await _timed(client, f"{stack.gateway}/v1/chat/completions", {**_body("auto", "warm"), "max_tokens": 2})
            say("gateway overhead, concurrency 1")
            c1 = await overhead(stack, 1, rounds1)
            say("gateway overhead, concurrency 16")
            c16 = await overhead(stack, 16, rounds16)
            selftime = await gateway_self_time(stack, 20 if not quick else 5)
            short = await short_overhead(stack, 10 if quick else 100)
            hit = await cache_hit_route(stack, settings)
            say("mixed-adapter throughput")
            mixed = await mixed_adapters(stack, mixed_rounds)
            mixed32 = await mixed_adapters(stack, max(1, mixed_rounds // 2), requests=32)  # flock serve's batch limit
            say("decode throughput by batch size")
            decode = await decode_throughput(stack, (1, 8) if quick else (1, 8, 32), rounds=1 if quick else 3)
        finally:
            stack.close()
    return {
        "gateway_overhead_ratio_p50": c1["ratio_p50"],
        "gateway_added_ms_p50": c1["added_ms_p50"],
        "gateway_added_ms_p99": c1["added_ms_p99"],
        "gateway_p50_diff_ms": c1["diff_of_p50_ms"],
        "gateway_added_ms_p50_1token": short["added_ms_p50"],
        "gateway_overhead_ratio_p50_c16": c16["ratio_p50"],
        "gateway_added_ms_p50_c16": c16["added_ms_p50"],
        "gateway_added_ms_p99_c16": c16["added_ms_p99"],
        "gateway_p50_diff_ms_c16": c16["diff_of_p50_ms"],
        "gateway_self_ms_p50_cache_miss": selftime["miss_ms_p50"],
        "gateway_self_ms_p99_cache_miss": selftime["miss_ms_p99"],
        "gateway_self_ms_p50_cache_hit": selftime["hit_ms_p50"],
        "gateway_only_added_ms_p50_cache_hit": proxy["cache_hit_added_ms_p50"],
        "gateway_only_added_ms_p50_cache_miss": proxy["cache_miss_added_ms_p50"],
        "gateway_only_added_ms_p50_direct_model": proxy["direct_model_added_ms_p50"],
        "cache_hit_route_ms_p50": hit["route_ms_p50"],
        "cache_hit_route_ms_p99": hit["route_ms_p99"],
        **{f"router_ms_p50_at_{n}_experts": router[f"global_{n}"] for n in (10, 100, 1000, 10000)},
        **{f"router_merge_ms_p50_at_{n}_experts": router[f"merge_{n}"] for n in (10, 100, 1000, 10000)},
        "embed_ms_p50": embed["c1_ms_p50"],
        "embed_ms_p50_c16": embed["c16_ms_p50"],
        "embed_c16_wall_over_16x_c1": embed["c16_wall_over_16x_c1"],
        "mixed_adapter_throughput_ratio": mixed["ratio"],
        "mixed_adapter_tok_s": mixed["mixed_tok_s"],
        "single_adapter_tok_s": mixed["single_tok_s"],
        "mixed_adapter_throughput_ratio_32_requests": mixed32["ratio"],
        "decode_tok_s": decode,
        "details": {"c1": c1, "c16": c16, "one_token": short, "gateway_self": selftime, "embed": embed,
                    "fake_backend": proxy, "mixed": mixed, "mixed_32_requests": mixed32},
        "vllm_settings": {
            "threads_bind": settings.vllm_threads, "kvcache_gib": settings.vllm_kvcache_gib,
            "max_loras": settings.vllm_max_loras, "max_lora_rank": settings.vllm_max_lora_rank,
            "max_cpu_loras": settings.vllm_max_cpu_loras, "max_num_seqs": settings.vllm_max_num_seqs,
            "max_model_len": settings.vllm_max_model_len, "dtype": settings.resolved_vllm_dtype,
            "spin_ms": settings.vllm_spin_ms,
            "lora_kernel": settings.lora_kernel,
            "external_backend": backend,
        },
        "workload": {"max_tokens": MAX_TOKENS, "ignore_eos": True, "rounds_c1": rounds1, "rounds_c16": rounds16,
                     "experts": "8 synthetic rank-8 all-linear LoRAs (Arrow gates computed, PHATGOOSE gates random)",
                     "decode": "through the gateway, same prompt per batch, 32 tokens, ignore_eos"},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": quick,
    }


GOALS = [  # (key, comparison, goal) from the performance issue
    ("gateway_overhead_ratio_p50", "<=", 1.05),
    ("gateway_added_ms_p50", "<=", 10.0),
    ("gateway_added_ms_p50_1token", "<=", 10.0),
    ("gateway_self_ms_p50_cache_miss", "<=", 10.0),
    ("cache_hit_route_ms_p50", "<=", 1.0),
    ("gateway_only_added_ms_p50_cache_hit", "<=", 1.0),
    ("gateway_only_added_ms_p50_cache_miss", "<=", 10.0),
    ("router_ms_p50_at_10000_experts", "<=", 5.0),
    ("embed_c16_wall_over_16x_c1", "<", 1.0),
    ("mixed_adapter_throughput_ratio", ">=", 0.9),
]


def table(result: dict) -> str:
    rows = ["| figure | value | goal |", "|---|---|---|"]
    goals = {k: (op, v) for k, op, v in GOALS}
    for key, value in result.items():
        if isinstance(value, float):
            goal = f"{goals[key][0]} {goals[key][1]:g}" if key in goals else ""
            rows.append(f"| `{key}` | {value:.3f} | {goal} |")
    for key, value in result["decode_tok_s"].items():
        if isinstance(value, float):
            goal = ">= 0.7" if key == "glider_over_expert_b8" else ""
            rows.append(f"| decode `{key}` | {value:.2f} | {goal} |")
    return "\n".join(rows)


def chart(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    c1, c16 = result["details"]["c1"], result["details"]["c16"]
    axes[0].bar(["vLLM c1", "gateway c1", "vLLM c16", "gateway c16"],
                [c1["vllm_p50_ms"], c1["gateway_p50_ms"], c16["vllm_p50_ms"], c16["gateway_p50_ms"]],
                color=["#888", "#2a7", "#888", "#2a7"])
    axes[0].set_title(f"p50 latency, {MAX_TOKENS}-token completion (ms)")
    sizes = [10, 100, 1000, 10000]
    axes[1].plot(sizes, [result[f"router_ms_p50_at_{n}_experts"] for n in sizes], marker="o", label="global")
    axes[1].plot(sizes, [result[f"router_merge_ms_p50_at_{n}_experts"] for n in sizes], marker="o", label="merge")
    axes[1].set_xscale("log")
    axes[1].set_title("routing decision p50 (ms), embedding excluded")
    axes[1].set_xlabel("experts in pool")
    axes[1].legend()
    d = result["decode_tok_s"]
    batches = sorted({int(k.split("_b")[1].split("_")[0]) for k in d if k.endswith("_tok_s")})
    for label in DECODE_MODES:
        axes[2].plot(batches, [d[f"{label}_b{b}_tok_s"] for b in batches], marker="o", label=label)
    axes[2].set_title("decode tokens/s by batch size")
    axes[2].set_xlabel("concurrent requests")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _ints(csv: str) -> tuple[int, ...]:
    return tuple(int(n) for n in str(csv).split(",") if n.strip())


def peer_missing(args) -> str | None:
    """With --peer litellm: why the peer part cannot run (LiteLLM's virtualenv or wrk missing), else None.
    Checked before anything starts, so a long --many-experts run does not end in it."""
    from bench import peer

    try:
        peer.litellm_executable(args.peer_venv or peer.DEFAULT_VENV)
        peer.wrk_executable()
    except peer.PeerMissing as exc:
        return f"flock bench --peer litellm: {exc}"
    return None


def peer_run(args, settings: Settings) -> dict:
    from bench import peer

    return peer.run(settings, args.peer_venv or peer.DEFAULT_VENV, quick=args.quick, seconds=args.peer_seconds,
                    litellm_workers=_ints(args.peer_workers), flock_processes=_ints(args.peer_flock_processes))


def peer_main(args, settings: Settings) -> int:
    """`flock bench --peer litellm` alone: exit code 2 with a clear message when the peer is missing."""
    from bench import peer

    if (missing := peer_missing(args)) is not None:
        print(missing, file=sys.stderr)
        return 2
    result = peer_run(args, settings)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "peer_litellm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else peer.table(result))
    return 0


@dataclass
class RunningStack:
    """A gateway that is already serving (`flock bench --decode-only --gateway URL`)."""

    gateway: str
    settings: Settings


async def decode_only(settings: Settings, gateway: str, expert: str, prompt: str) -> dict:
    """Decode throughput alone, against a running gateway (e.g. `flock serve` on the default library)."""
    stack = RunningStack(gateway.rstrip("/"), settings)
    decode = await decode_throughput(stack, (1, 8, 32), expert=expert, prompt=prompt)  # type: ignore[arg-type]
    return {"decode_tok_s": decode, "gateway": gateway, "expert": expert, "prompt": prompt,
            "vllm_settings": {"threads_bind": settings.vllm_threads, "max_loras": settings.vllm_max_loras,
                              "max_lora_rank": settings.vllm_max_lora_rank, "max_num_seqs": settings.vllm_max_num_seqs,
                              "glider_alpha": settings.glider_alpha, "gate_top_k": settings.gate_top_k},
            "workload": {"max_tokens": MAX_TOKENS, "ignore_eos": True}, "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(args, settings: Settings) -> int:
    if getattr(args, "composites", None):
        from bench import composites

        with tempfile.TemporaryDirectory(prefix="flock-bench-") as tmp:
            result = asyncio.run(composites.run(settings, Path(settings.library_dir), Path(tmp), args.composites))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "composites.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2) if args.json else composites.table(result))
        return 0 if result["rss_flat"] and result["disk_flat"] else 1
    if getattr(args, "peer", None) and not getattr(args, "many_experts", None):
        return peer_main(args, settings)
    if getattr(args, "chart_from", None):
        from bench import many_experts

        if not args.chart:
            raise SystemExit("--chart-from needs --chart PNG")
        results = [json.loads(Path(f).read_text()) for f in args.chart_from]
        if not many_experts.chart(results, args.chart):
            raise SystemExit("--chart needs matplotlib")
        say(f"wrote {args.chart}")
        return 0
    if getattr(args, "many_experts", None):
        from bench import many_experts, peer

        if args.peer and (missing := peer_missing(args)) is not None:
            print(missing, file=sys.stderr)
            return 2
        result = asyncio.run(many_experts.run(settings, args.many_experts, backend=args.backend, quick=args.quick,
                                              scale=args.scale, serve=not args.no_serve, cold=args.cold_start,
                                              placement_only=args.placement, register_at=_ints(args.register_at),
                                              placement=not args.no_placement))
        if args.peer:  # the keys all in one JSON: the goal ratios on top, the peer run's figures inside
            beside = peer_run(args, settings)
            result.update({key: beside[key] for key, _, _ in peer.GOALS})
            result["peer_litellm"] = beside
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "many_experts.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.chart and many_experts.chart([result], args.chart):
            say(f"wrote {args.chart}")
        print(json.dumps(result, indent=2) if args.json else many_experts.table(result))
        return 0
    if args.decode_only:
        if not args.gateway:
            raise SystemExit("--decode-only needs --gateway URL of a running gateway")
        result = asyncio.run(decode_only(settings, args.gateway, args.expert, args.prompt))
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "decode.json").write_text(text + "\n")
        print(text)
        return 0
    result = asyncio.run(run(settings, args.backend, args.quick))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        (out / "bench.md").write_text(table(result) + "\n")
        chart(result, out / "bench.png")
        say(f"wrote {out}/bench.json, bench.md, bench.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0
