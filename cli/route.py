"""`flock route`: routing decisions for queries from a JSONL file, in process (no Redis, no backend)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("route", help="print routing decisions for queries, without a server")
    p.add_argument("--jsonl", required=True, help='file of lines {"prompt": ...} or {"messages": [...]}; - for stdin')
    p.add_argument("--mode")
    p.add_argument("--top-k", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from router.decision import RoutingParams
    from service.app import build_gateway
    from service.metrics import Metrics
    from service.protocol import ChatCompletionRequest
    from service.query import query_text

    offline = settings.model_copy(update={"redis_url": None, "backend_urls": []})  # no cache, no backend
    gateway = build_gateway(offline, Metrics())
    params = RoutingParams(mode=args.mode, top_k=args.top_k)
    lines = (sys.stdin if args.jsonl == "-" else open(args.jsonl)).read().splitlines()

    async def route_all() -> None:
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
                raise SystemExit(2) from None
            result = await gateway.router.route(text, params)
            print(json.dumps({"routing": result.decision.model_dump()}), flush=True)
        await gateway.router.embedder.stop()

    asyncio.run(route_all())
    return 0
