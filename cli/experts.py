"""`flock experts list|add|remove`: through the running gateway when one answers, else on the pool file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Through the running gateway when one answers (so its pool and caches follow), else on the pool file."""
    import httpx

    url = args.url or f"http://{settings.host}:{settings.port}"
    key = settings.api_key or (settings.admin_keys[0] if settings.admin_keys else None)
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
