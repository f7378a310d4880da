"""`flock eval`: routing quality and task accuracy of the expert library (eval/harness.py)."""

from __future__ import annotations

import argparse

from eval.generation import CONCURRENCY
from service.settings import Settings

DEFAULT_MODES = "base,oracle,global,merge,arrow,phatgoose,glider"


def register(sub) -> None:
    p = sub.add_parser("eval", help="routing-quality benchmark of the expert library (accuracy by mode)")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma-separated: base, oracle and routing modes, a mode with parameters as "
                        "glider:alpha=3+top_k=1 (default %(default)s)")
    p.add_argument("--n-per-task", type=int, default=50, help="test examples per task (default %(default)s)")
    p.add_argument("--out", default="eval", help="directory for results.json, results.md, results.png")
    p.add_argument("--backend", help="use this running vLLM instead of starting one (also the GLIDER LLM)")
    p.add_argument("--gateway", help="measure this running gateway instead of starting a stack")
    p.add_argument("--routing-only", action="store_true", help="routing variants only, no generation")
    p.add_argument("--library", help="expert library directory (default: FLOCK_LIBRARY_DIR)")
    p.add_argument("--redis-url", help="cache GLIDER instructions in this Redis (default: FLOCK_REDIS_URL; "
                                       "without one: <out>/glider_cache.json)")
    p.add_argument("--no-glider", action="store_true", help="skip the GLIDER routing variant")
    p.add_argument("--centroid-train", type=int, default=0,
                   help="also measure centroids of the card examples plus this many train-split prompts per expert")
    p.add_argument("--conversations", type=int, default=240,
                   help="seeded multi-turn test conversations for conversation-aware routing (0: skip)")
    p.add_argument("--long-per-task", type=int, default=10,
                   help="long-prompt routing: test prompts per task after 1k/8k/32k characters of context (0: skip)")
    p.add_argument("--styles-per-task", type=int, default=20,
                   help="single-turn prompts per task in unseen styles, abstain calibrations compared (0: skip)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from eval.harness import main

    return main(args, settings)
