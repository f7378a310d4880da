"""`flock train`: train experts of the default library (PEFT LoRA, with progress and a dev score)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from training.lora import train_expert
    from training.tasks import HELD_IN

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
