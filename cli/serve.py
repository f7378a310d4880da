"""`flock serve`: the gateway, and redis-server and vLLM unless existing ones are configured."""

from __future__ import annotations

import argparse

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gateway (and redis-server and vLLM unless configured)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--backend", action="append", help="existing vLLM server URL (repeatable)")
    p.add_argument("--redis-url")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
