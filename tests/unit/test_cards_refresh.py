"""training.cards: card examples refreshed from the training phrasings, the rest of the card untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.cards import refresh_examples
from training.tasks import get_task

LIBRARY = Path(__file__).resolve().parents[2] / "library"


def test_refresh_rewrites_only_examples_with_training_phrasings(tmp_path: Path) -> None:
    shutil.copy(LIBRARY / "arithmetic" / "card.json", tmp_path / "card.json")
    before = json.loads((tmp_path / "card.json").read_text())
    before["examples"] = ["stale example"]
    (tmp_path / "card.json").write_text(json.dumps(before))
    assert refresh_examples(tmp_path) == 32
    after = json.loads((tmp_path / "card.json").read_text())
    assert {k: v for k, v in after.items() if k != "examples"} == {k: v for k, v in before.items() if k != "examples"}
    task = get_task("arithmetic")
    train = {e.prompt for e in task.generate("train", 64, 0)}
    assert set(after["examples"]) <= train  # training families only, never a held-out phrasing
