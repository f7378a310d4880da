"""`flock eval`: routing quality and task accuracy of the expert library, written to results.json / .md / .png.

    flock eval                                  # start redis-server, vLLM and the gateway on library
    flock eval --routing-only                   # routing variants, conversations, long prompts (in process; glider
                                                # needs an LLM or its cache)
    flock eval --gateway http://127.0.0.1:8000  # measure a running gateway (its pool, whatever it holds)
    flock eval --backend http://127.0.0.1:8100  # start redis + gateway, reuse a running vLLM

Routing accuracy is measured in process on the library pool (the Router built as service/app.py builds it,
offline: no Redis, no backend), so it is the same whatever --gateway serves. Task accuracy goes through the
gateway's /v1/chat/completions (temperature 0, 48 tokens, 16 requests at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.stack import LocalStack, say
from eval import conversations, generation, long_prompts, metrics, report, routing, styles
from eval.testset import EVAL_SEED, build_test_set, default_tasks, describe
from service.settings import Settings
from training.tasks import HELD_IN, HELD_OUT


def parse_modes(text: str) -> list[str]:
    """'base,glider:alpha=3+top_k=1' -> ['base', 'glider:alpha=3,top_k=1'] ('+' separates a mode's parameters
    on the command line, where ',' separates modes)."""
    return list(dict.fromkeys(m.strip().replace("+", ",") for m in text.split(",") if m.strip()))


def build_offline_gateway(settings: Settings, library: Path, state_dir: Path):
    """The service's Gateway (pool, embedder, Router) as service/app.py builds it, offline: no Redis, no
    backend, a fresh state directory so the pool is exactly the library."""
    from service.app import build_gateway
    from service.metrics import Metrics

    library = Path(library).resolve()
    offline = settings.model_copy(update={
        "redis_url": None, "backend_urls": [], "state_dir": state_dir, "library_dir": library,
        "expert_roots": [library]})
    return build_gateway(offline, Metrics())


async def routing_part(settings: Settings, library: Path, examples, *, glider: routing.GliderClient | None,
                       train_per_expert: int, work: Path, n_conversations: int = 0,
                       long_per_task: int = 0, styles_per_task: int = 0) -> dict:
    gateway = build_offline_gateway(settings, library, work / "offline-state")
    router = gateway.router
    try:
        index = await router.rebuild_index()
        say(f"routing: {len(index.names)} experts in the library pool, abstain threshold {index.threshold:.3f}")
        if not index.names:
            say(f"warning: no experts in {library}: every prompt routes to the base model")
        out = await routing.evaluate_routing(router, examples, HELD_IN, HELD_OUT, train_per_expert=train_per_expert,
                                             glider=glider, progress=say)
        if n_conversations > 0 and index.names:
            say(f"routing: {n_conversations} test conversations, mechanisms side by side")
            out["conversations"] = await conversations.evaluate_conversations(router, n_conversations)
            fitted = await conversations.fit_follow_up_test(router)
            out["conversations"]["fit_on_dev"] = fitted.cache_params()
        if long_per_task > 0 and index.names:
            say(f"routing: long prompts ({long_per_task} per task, contexts of {long_prompts.SIZES} characters)")
            out["long_prompts"] = await long_prompts.evaluate_long_prompts(router, long_per_task)
        if styles_per_task > 0 and index.names:
            say(f"routing: unseen styles ({styles_per_task} per task), abstain calibrations side by side")
            out["styles"] = await styles.evaluate_styles(router, styles_per_task)
        return out
    finally:
        await router.embedder.stop()
        await gateway.backends.close()


def summarize_modes(records: dict[str, list[dict]], held_in=HELD_IN, held_out=HELD_OUT) -> dict[str, dict]:
    """Per-mode summaries, then % of oracle and held-out vs base across modes."""
    out = {mode: metrics.mode_summary(recs, held_in, held_out, routed=generation.is_routed(mode))
           for mode, recs in records.items()}
    metrics.add_relative(out)
    return out


async def run(args, settings: Settings) -> dict:
    modes = parse_modes(args.modes)
    library = Path(args.library or settings.library_dir).resolve()
    examples = build_test_set(args.n_per_task, EVAL_SEED)
    say(f"test set: {len(examples)} prompts over {len(default_tasks())} tasks "
        f"({sum(e.test_only for e in examples)} with test-only phrasings)")
    out_dir = Path(args.out)
    redis_url = args.redis_url or settings.redis_url
    results: dict = {
        "config": {"n_per_task": args.n_per_task, "seed": EVAL_SEED, "modes": modes, "library": str(library),
                   "gateway": args.gateway, "backend": args.backend, "routing_only": args.routing_only,
                   "max_tokens": generation.MAX_TOKENS, "temperature": 0, "concurrency": args.concurrency,
                   "centroid_train_per_expert": args.centroid_train, "held_in": list(HELD_IN),
                   "conversations": args.conversations, "long_per_task": args.long_per_task,
                   "styles_per_task": args.styles_per_task,
                   "held_out": list(HELD_OUT), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "tasks": [[t, k] for t, k in ((t, v["kind"]) for t, v in describe(examples).items())],
        "test_set": describe(examples),
    }
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="flock-eval-") as tmp:
        work = Path(tmp)
        gateway_url = args.gateway.rstrip("/") if args.gateway else None
        llm_url = args.backend
        if not args.routing_only and gateway_url is None:
            say("starting the stack (redis-server, vLLM unless --backend, gateway on the library)")
            # One client asks for every per-token composite of the test set: the per-key build limit would
            # turn the measurement into 429s, so the eval's own gateway has none.
            s = LocalStack(settings, library, args.backend, work / "stack",
                           gateway_env={"FLOCK_COMPOSITE_BUILDS_PER_MIN": "0"})
            stack.callback(s.close)
            gateway_url, llm_url = s.gateway, s.vllm
            # A mode without parameters runs with the gateway's defaults: keep the ones that served it.
            results["config"]["glider_defaults"] = {"alpha": settings.glider_alpha,
                                                    "solo_margin": settings.glider_solo_margin}
            if args.backend is None:
                # bf16 and float32 engines differ by a prompt or two of greedy output: keep the one measured.
                results["config"]["vllm_dtype"] = settings.resolved_vllm_dtype
        llm_url = llm_url or gateway_url

        glider = None
        if not args.no_glider:
            cache = routing.RedisCache(redis_url) if redis_url else routing.JsonCache(out_dir / "glider_cache.json")
            glider = routing.GliderClient(cache, llm_url, settings.base_model_name, concurrency=args.concurrency)
        try:
            results["routing"] = await routing_part(settings, library, examples, glider=glider,
                                                    train_per_expert=args.centroid_train, work=work,
                                                    n_conversations=args.conversations,
                                                    long_per_task=args.long_per_task,
                                                    styles_per_task=args.styles_per_task)
        finally:
            if glider is not None:
                await glider.cache.close()
        results["config"]["experts"] = results["routing"].pop("experts")
        results["config"]["glider_llm"] = llm_url

        if not args.routing_only:
            assert gateway_url is not None  # given, or the stack started above
            say(f"generation through {gateway_url}: modes {', '.join(modes)}")
            records, served, skipped = await generation.run_generation(
                gateway_url, examples, modes, base_model=settings.base_model_name, concurrency=args.concurrency,
                progress=say)
            results["config"]["served_experts"] = sorted(served)
            missing = sorted(set(HELD_IN) - served)
            if "oracle" in modes and missing:
                say(f"warning: no expert served for {', '.join(missing)}: oracle uses the base model there")
            results["config"]["oracle_missing_experts"] = missing
            results["modes"] = summarize_modes(records)
            results["skipped_modes"] = skipped
            results["records"] = {"generation": records}
        results.setdefault("records", {})["routing"] = results["routing"].pop("records")
    return results


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(report.render_markdown(results))
    if report.plot(results, out_dir / "results.png"):
        paths.append(out_dir / "results.png")
    return paths


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.n_per_task < 1:
        raise SystemExit("--n-per-task must be at least 1")
    results = asyncio.run(run(args, settings))
    paths = write_outputs(results, Path(args.out))
    say("wrote " + ", ".join(str(p) for p in paths))
    print(report.render_markdown(results))
    return 0
