"""`flock loadtest`: a bounded load test of a running gateway (bench/loadtest.py)."""

from __future__ import annotations

import argparse
import asyncio
import json

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("loadtest", help="bounded load test of a running gateway (routed, expert, stream)")
    p.add_argument("--gateway", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", help="default: FLOCK_API_KEY")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bench.loadtest import run as load

    key = args.api_key or settings.api_key
    result = asyncio.run(load(args.gateway, args.clients, args.seconds, args.max_tokens, key))
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0
