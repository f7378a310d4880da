"""`flock train-gates`: Arrow prototypes and PHATGOOSE gates for experts of the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("train-gates", help="compute Arrow prototypes and train PHATGOOSE gates for library experts")
    p.add_argument("tasks", nargs="*", help="expert (directory) names in the library")
    p.add_argument("--all", action="store_true", help="every expert in the library")
    p.add_argument("--library", help="library directory (default: FLOCK_LIBRARY_DIR)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="recompute gates that already exist")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="storage dtype of the gate vectors (bfloat16: half the size, as the default library)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Arrow prototypes (seconds) and PHATGOOSE gates (trained, ~100 steps) for experts of the library."""
    from adapters.gates import GATE_DTYPES, compute_arrow_gates, has_gates
    from training.gates import train_phatgoose_gates
    from training.lora import load_base

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
    dtype = GATE_DTYPES[args.dtype]
    for name in names:
        expert_dir = library / name
        t0 = time.perf_counter()
        if args.force or not has_gates(expert_dir, "arrow"):
            compute_arrow_gates(expert_dir, dtype=dtype)
            print(f"[{name}] arrow prototypes computed ({time.perf_counter() - t0:.2f}s)", flush=True)
        else:
            print(f"[{name}] arrow prototypes already computed; skipping", flush=True)
        summary = {"expert": name, "arrow_seconds": round(time.perf_counter() - t0, 3)}
        if args.force or not has_gates(expert_dir, "phatgoose"):
            base = base or load_base(settings.resolved_base_model_dir)
            result = train_phatgoose_gates(expert_dir, steps=args.steps, batch_size=args.batch_size, base=base,
                                           progress=lambda line: print(line, flush=True), dtype=dtype)
            summary.update({k: result[k] for k in ("task", "final_loss", "seconds", "seconds_per_step")})
        else:
            print(f"[{name}] PHATGOOSE gates already trained; skipping (--force to redo)", flush=True)
        print(json.dumps(summary), flush=True)
    return 0
