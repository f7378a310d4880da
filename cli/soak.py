"""`flock soak`: mixed traffic with faults for minutes, every request accounted for (bench/soak.py)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("soak", help="mixed traffic for minutes while Redis, vLLM, a replica and an expert fail")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--backend", help="use this running vLLM (then the vLLM fault is left out)")
    p.add_argument("--faults", default="redis,replica,expert,vllm", help="comma-separated (default %(default)s)")
    p.add_argument("--library", help="expert library (default: FLOCK_LIBRARY_DIR)")
    p.add_argument("--work", help="directory for state and logs (default: a temporary one)")
    p.add_argument("--out", help="write soak.json and soak.png into this directory")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bench import soak

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flock-soak-"))
    report = soak.run(settings, Path(args.library or settings.library_dir), work, args.minutes * 60,
                      backend=args.backend, clients=args.clients, faults=tuple(args.faults.split(",")),
                      seed=args.seed)
    print(json.dumps(report.to_json(), indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(
            {**report.to_json(), "samples": [vars(s) for s in report.samples]}, indent=1))
        soak.chart(report, out / "soak.png")
    return 0 if report.unexplained == 0 and report.pool_intact else 1
