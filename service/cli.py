"""The `flock` command line: serve, route, experts, prepare."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from service.settings import Settings


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.serve import serve

    for key in ("host", "port"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if args.backend:
        settings.backend_urls = args.backend
    if args.redis_url:
        settings.redis_url = args.redis_url
    serve(settings)
    return 0


def cmd_prepare(args: argparse.Namespace, settings: Settings) -> int:
    from service.models import convert_base_model

    convert_base_model(settings.resolved_base_model_dir)
    return 0


def _offline_router(settings: Settings):
    from service.app import build_gateway
    from service.metrics import Metrics

    settings.redis_url = None  # offline: no cache, no backend
    settings.backend_urls = []
    return build_gateway(settings, Metrics())


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    from router.decision import RoutingParams
    from service.gateway import query_text
    from service.protocol import ChatCompletionRequest

    gateway = _offline_router(settings)
    params = RoutingParams(mode=args.mode, top_k=args.top_k)
    lines = (sys.stdin if args.jsonl == "-" else open(args.jsonl)).read().splitlines()

    async def run() -> None:
        await gateway.router.rebuild_index()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if "messages" in item:
                    text = query_text(ChatCompletionRequest(model="auto", messages=item["messages"]))
                else:
                    text = str(item["prompt"])
            except (ValueError, KeyError, TypeError) as exc:
                print(f"line {n}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}: {exc}", file=sys.stderr)
                raise SystemExit(2)
            result = await gateway.router.route(text, params)
            print(json.dumps({"routing": result.decision.model_dump()}), flush=True)
        await gateway.router.embedder.stop()

    asyncio.run(run())
    return 0


def cmd_experts(args: argparse.Namespace, settings: Settings) -> int:
    """Through the running gateway when one answers (so its pool and caches follow), else on the pool file."""
    import httpx

    url = args.url or f"http://{settings.host}:{settings.port}"
    key = os.environ.get("FLOCK_API_KEY") or (settings.admin_keys[0] if settings.admin_keys else None)
    auth = {"authorization": f"Bearer {key}"} if key else {}
    try:
        httpx.get(f"{url}/health", timeout=1)
        online = True
    except httpx.HTTPError:
        online = False
    if online:
        if args.action == "list":
            resp = httpx.get(f"{url}/v1/experts", headers=auth)
        elif args.action == "add":
            body = {k: v for k, v in {"path": str(Path(args.path).resolve()), "name": args.name,
                                      "description": args.description, "replace": args.replace}.items()
                    if v is not None}
            resp = httpx.post(f"{url}/v1/experts", json=body, headers=auth, timeout=60)
        else:
            resp = httpx.delete(f"{url}/v1/experts/{args.name}", headers=auth)
        print(json.dumps(resp.json(), indent=2))
        return 0 if resp.status_code < 400 else 1

    from pydantic import ValidationError

    from adapters.card import ExpertCard, read_card
    from adapters.errors import PoolError
    from adapters.validate import resolve_inside

    from service.app import build_pool

    pool = build_pool(settings)  # the pool alone: no embedding model, so offline edits stay quick
    try:
        if args.action == "list":
            for e in pool.experts():
                print(f"{e.name:24s} r={e.rank:<3d} {e.path}\n    {e.card.description}")
            print(f"{len(pool)} experts, pool version {pool.version} (gateway not running: read {settings.pool_file})")
        elif args.action == "add":
            adapter_dir = resolve_inside(args.path, pool.roots)
            card = read_card(adapter_dir) if adapter_dir.is_dir() else None
            fields = card.model_dump() if card else {}
            fields.update({k: v for k, v in {"name": args.name, "description": args.description}.items() if v})
            try:
                card = ExpertCard.model_validate(fields)
            except ValidationError as exc:
                print(f"error: the expert card is incomplete or invalid: {exc.errors()[0]['msg']}", file=sys.stderr)
                return 1
            expert = pool.add(adapter_dir, card, replace=bool(args.replace))
            print(f"added {expert.name} (pool version {pool.version})")
        else:
            pool.remove(args.name)
            print(f"removed {args.name} (pool version {pool.version})")
    except PoolError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # an unreadable or invalid card.json
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.tasks import HELD_IN
    from adapters.training import train_expert

    tasks = list(HELD_IN) if args.all else args.tasks
    if not tasks:
        print("name a task or give --all; held-in tasks: " + ", ".join(HELD_IN), file=sys.stderr)
        return 2
    unknown = [t for t in tasks if t not in HELD_IN]
    if unknown:
        print(f"unknown task(s) {unknown}; held-in tasks: {', '.join(HELD_IN)}", file=sys.stderr)
        return 2
    out_root = Path(args.out) if args.out else settings.library_dir
    for task in tasks:
        if args.skip_existing and (out_root / task / "adapter_model.safetensors").is_file():
            print(f"[{task}] already trained in {out_root / task}; skipping")
            continue
        summary = train_expert(task, out_root / task, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                               batch_size=args.batch_size, base_dir=settings.resolved_base_model_dir)
        print(json.dumps({k: summary[k] for k in ("task", "dev_accuracy", "seconds")}), flush=True)
    return 0


def cmd_train_gates(args: argparse.Namespace, settings: Settings) -> int:
    """Arrow prototypes (seconds) and PHATGOOSE gates (trained, ~100 steps) for experts of the library."""
    import time

    from adapters.gate_training import train_phatgoose_gates
    from adapters.gates import compute_arrow_gates, has_gates
    from adapters.training import load_base

    library = Path(args.library) if args.library else settings.library_dir
    available = sorted(p.name for p in library.iterdir()  # not `.<name>.partial`: an expert being trained
                       if not p.name.startswith(".") and (p / "adapter_model.safetensors").is_file()) \
        if library.is_dir() else []
    names = available if args.all else args.tasks
    if not names:
        print(f"name experts or give --all; experts in {library}: {', '.join(available) or 'none'}", file=sys.stderr)
        return 2
    missing = [n for n in names if n not in available]
    if missing:
        print(f"no expert {missing} in {library}; experts: {', '.join(available) or 'none'}", file=sys.stderr)
        return 2
    base = None
    for name in names:
        expert_dir = library / name
        t0 = time.perf_counter()
        if args.force or not has_gates(expert_dir, "arrow"):
            compute_arrow_gates(expert_dir)
            print(f"[{name}] arrow prototypes computed ({time.perf_counter() - t0:.2f}s)", flush=True)
        else:
            print(f"[{name}] arrow prototypes already computed; skipping", flush=True)
        summary = {"expert": name, "arrow_seconds": round(time.perf_counter() - t0, 3)}
        if args.force or not has_gates(expert_dir, "phatgoose"):
            base = base or load_base(settings.resolved_base_model_dir)
            result = train_phatgoose_gates(expert_dir, steps=args.steps, batch_size=args.batch_size, base=base,
                                           progress=lambda line: print(line, flush=True))
            summary.update({k: result[k] for k in ("task", "final_loss", "seconds", "seconds_per_step")})
        else:
            print(f"[{name}] PHATGOOSE gates already trained; skipping (--force to redo)", flush=True)
        print(json.dumps(summary), flush=True)
    return 0


def cmd_describe(args: argparse.Namespace, settings: Settings) -> int:
    """(Re)write the LLM-written description of library cards from their 3 description examples."""
    from adapters.tasks import Example
    from adapters.training import BASE_NAME, generate_description, load_base

    library = Path(args.library) if args.library else settings.library_dir
    names = sorted(p.parent.name for p in library.glob("*/card.json")) if args.all else args.names
    if not names:
        print("name experts or give --all", file=sys.stderr)
        return 2
    model, tokenizer = load_base(settings.resolved_base_model_dir)
    for name in names:
        path = library / name / "card.json"
        if not path.is_file():
            print(f"no card {path}", file=sys.stderr)
            return 2
        card = json.loads(path.read_text())
        shots = [Example(x["prompt"], x["answer"], 0) for x in card.get("extra", {}).get("description_examples", [])]
        if not shots:
            print(f"[{name}] card has no description_examples; skipping", file=sys.stderr)
            continue
        text = generate_description(model, tokenizer, shots)
        card.setdefault("extra", {}).update(generated_description=text,
                                            generated_by=f"{BASE_NAME} (greedy, few-shot, adapters off)")
        path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"[{name}] {text}", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from service import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flock", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway (and redis-server and vLLM unless configured)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--backend", action="append", help="existing vLLM server URL (repeatable)")
    p.add_argument("--redis-url")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="convert the base model to a bf16 checkpoint (once)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("route", help="print routing decisions for queries, without a server")
    p.add_argument("--jsonl", required=True, help='file of lines {"prompt": ...} or {"messages": [...]}; - for stdin')
    p.add_argument("--mode")
    p.add_argument("--top-k", type=int)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("experts", help="list, add or remove experts")
    p.add_argument("--url", help="gateway URL (default: FLOCK_HOST:FLOCK_PORT)")
    esub = p.add_subparsers(dest="action", required=True)
    esub.add_parser("list")
    a = esub.add_parser("add")
    a.add_argument("path")
    a.add_argument("--name")
    a.add_argument("--description")
    a.add_argument("--replace", action="store_true", default=None)
    r = esub.add_parser("remove")
    r.add_argument("name")
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("train", help="train experts of the default library (PEFT LoRA, progress and dev score)")
    p.add_argument("tasks", nargs="*", help="held-in task names")
    p.add_argument("--all", action="store_true", help="every held-in task")
    p.add_argument("--out", help="library directory (default: FLOCK_LIBRARY_DIR)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-existing", action="store_true", help="keep experts already trained")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-gates", help="compute Arrow prototypes and train PHATGOOSE gates for library experts")
    p.add_argument("tasks", nargs="*", help="expert (directory) names in the library")
    p.add_argument("--all", action="store_true", help="every expert in the library")
    p.add_argument("--library", help="library directory (default: FLOCK_LIBRARY_DIR)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="recompute gates that already exist")
    p.set_defaults(func=cmd_train_gates)

    p = sub.add_parser("describe", help="write GLIDER-style descriptions of library cards with the base model")
    p.add_argument("names", nargs="*")
    p.add_argument("--all", action="store_true")
    p.add_argument("--library", help="library directory (default: FLOCK_LIBRARY_DIR)")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("bench", help="measure the gateway, router, embedding and vLLM side by side")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for reporting)")
    p.add_argument("--backend", help="use this running vLLM instead of starting one")
    p.add_argument("--out", help="also write bench.json, bench.md and bench.png into this directory")
    p.add_argument("--decode-only", action="store_true",
                   help="only decode tokens/s (base, expert, merge, glider) against --gateway")
    p.add_argument("--gateway", help="running gateway for --decode-only")
    p.add_argument("--expert", default="arithmetic", help="expert for --decode-only (default %(default)s)")
    p.add_argument("--prompt", default="What is 17 times 23?",
                   help="prompt for --decode-only; it must route to experts (default %(default)s)")
    p.set_defaults(func=cmd_bench)

    from eval.harness import add_parser as add_eval_parser
    from service.loadtest import add_parser as add_loadtest_parser

    add_eval_parser(sub)
    add_loadtest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    _logging(settings.log_level)
    return args.func(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
