"""`flock describe`: GLIDER-style descriptions of library cards, written by the base model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.settings import Settings


def register(sub) -> None:
    p = sub.add_parser("describe", help="write GLIDER-style descriptions of library cards with the base model")
    p.add_argument("names", nargs="*")
    p.add_argument("--all", action="store_true")
    p.add_argument("--library", help="library directory (default: FLOCK_LIBRARY_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """(Re)write the LLM-written description of library cards from their 3 description examples."""
    from training.lora import BASE_NAME, generate_description, load_base
    from training.tasks import Example

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
