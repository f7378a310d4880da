"""Refresh the example queries of library cards from the task suite's current training phrasings.

    python -m training.cards library/ [names...]

The router's centroid for an expert is built from its card's examples, so when the suite's phrasings change
(training.tasks.phrasing) the cards should show the new training families too, even for experts whose
weights were not retrained. Only `examples` changes; description, recipe and scores stay as written. Train
split only, so held-out phrasing families stay unseen by the router.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from adapters.card import CARD_FILE, read_card
from training.lora import card_examples
from training.tasks import get_task


def refresh_examples(expert_dir: Path, seed: int = 0) -> int:
    """Rewrite the card's examples from its task's training split; returns how many it holds."""
    card = read_card(expert_dir)
    if card is None:
        raise FileNotFoundError(f"{expert_dir} has no {CARD_FILE}")
    task = get_task(str(card.extra.get("recipe", {}).get("task") or card.name))
    examples = card_examples(task, seed)
    card = card.model_copy(update={"examples": examples})
    (expert_dir / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return len(examples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Refresh card examples from the current training phrasings.")
    parser.add_argument("library", type=Path)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.name for p in args.library.iterdir() if (p / CARD_FILE).is_file())
    for name in names:
        print(f"[{name}] {refresh_examples(args.library / name)} examples")


if __name__ == "__main__":
    main()
