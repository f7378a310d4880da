"""The expert card: what the router knows about an expert besides its weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

CARD_FILE = "card.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
RESERVED_NAMES = {"auto"}


class ExpertCard(BaseModel):
    name: str = Field(description="Unique expert name; also the `model` a client can ask for.")
    description: str = Field(min_length=1, max_length=4000, description="What the expert does, in words.")
    examples: list[str] = Field(default_factory=list, max_length=64, description="A few example queries.")
    # Free-form provenance (training recipe, scores, generated description...), kept as written.
    extra: dict = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value) or value in RESERVED_NAMES:
            raise ValueError(
                "expert name must be 1-64 characters of a-z, 0-9, '_' or '-', start with a letter or "
                "digit, and not be 'auto'"
            )
        return value


def read_card(adapter_dir: Path) -> ExpertCard | None:
    path = adapter_dir / CARD_FILE
    if not path.is_file():
        return None
    return ExpertCard.model_validate(json.loads(path.read_text()))
