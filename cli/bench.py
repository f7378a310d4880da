"""`flock bench`: the gateway, router, embedding and vLLM measured side by side (bench/run.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
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
    p.add_argument("--many-experts", type=int, metavar="N",
                   help="what N experts cost: registration at N (and at N x --scale), start-up, and Zipf traffic "
                        "over N synthetic experts vs 8 through flock serve on vLLM (bench/many_experts.py)")
    p.add_argument("--scale", type=int, default=10,
                   help="with --many-experts: also time registration at N x this many experts (1: skip)")
    p.add_argument("--no-serve", action="store_true", help="with --many-experts: skip the vLLM serving part")
    p.add_argument("--cold-start", action="store_true",
                   help="with --many-experts: also time a cold start at N (every card embedded; slow on 2 cores)")
    p.add_argument("--placement", action="store_true",
                   help="with --many-experts: only the placement comparison (rendezvous vs scorer)")
    p.add_argument("--no-placement", action="store_true",
                   help="with --many-experts: skip the placement comparison")
    p.add_argument("--register-at", default="",
                   help="with --many-experts: also time registration at these pool sizes, comma-separated (e.g. "
                        "10,100 for the chart's small pools)")
    p.add_argument("--chart", type=Path, metavar="PNG",
                   help="with --many-experts: draw the cost against the number of experts into this PNG (e.g. "
                        "docs/img/many_experts.png)")
    p.add_argument("--chart-from", type=Path, nargs="+", metavar="JSON",
                   help="with --chart: draw from these saved --many-experts results instead of running (later "
                        "files' figures replace earlier ones' at the same pool size)")
    p.add_argument("--composites", type=int, metavar="N",
                   help="N routed requests with random modes, alpha and top_k against an instant fake backend: "
                        "gateway RSS and composites on disk over time (bench/composites.py)")
    p.add_argument("--peer", choices=["litellm"],
                   help="the gateway beside a peer: flock (routing cache hit) and a LiteLLM proxy in front of the "
                        "same instant fake backend, driven by wrk at increasing concurrency (bench/peer.py; set up "
                        "with `make peer-litellm`); alone, or added to --many-experts's JSON")
    p.add_argument("--peer-venv", type=Path,
                   help="with --peer litellm: the virtualenv holding LiteLLM (default <repo>/.venv-litellm)")
    p.add_argument("--peer-seconds", type=float, help="with --peer: seconds per wrk run (default 5; 2 with --quick)")
    p.add_argument("--peer-workers", default="1,2",
                   help="with --peer litellm: LiteLLM proxies to run, by worker processes, comma-separated; the goal "
                        "ratios take the best of them (default %(default)s)")
    p.add_argument("--peer-flock-processes", default="1,2",
                   help="with --peer litellm: flock gateway processes to run side by side, comma-separated "
                        "(default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bench import run as bench_run

    return bench_run.main(args, settings)
