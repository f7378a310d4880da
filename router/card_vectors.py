"""Embedded expert cards, kept by content: a pool change embeds only the cards that are new or changed, and a
restart reads the cards it embedded before from disk instead of embedding the whole pool again.

One card's vectors are its description's embedding and its examples' embeddings. They are kept under a hash of
the card's texts and of the embedding model that made them, so a changed card or another model never reuses
stale vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CardVectors:
    description: np.ndarray  # (dim,)
    examples: np.ndarray  # (examples, dim)


def card_key(model_id: str, description: str, examples: list[str]) -> str:
    """Content hash of a card's texts under one embedding model."""
    return hashlib.sha256(json.dumps([model_id, description, examples]).encode()).hexdigest()[:32]


class CardVectorStore:
    """Card vectors on disk, one .npy file per card key (description first, then the examples). Best effort:
    a store that cannot be read or written is only slower (the cards are embedded again)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str, examples: int, dim: int) -> CardVectors | None:
        try:
            rows = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if rows.shape != (1 + examples, dim) or rows.dtype != np.float32:
            return None
        return CardVectors(rows[0], rows[1:])

    def put(self, key: str, vectors: CardVectors) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate([vectors.description[None], vectors.examples]).astype(np.float32))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("card vectors not saved (%s): a restart embeds this card again", exc)

    def keep_only(self, keys: set[str]) -> None:
        """Drop the files of cards no longer in the pool."""
        try:
            files = list(self.directory.glob("*/*.npy"))
        except OSError:
            return
        for f in files:
            if f.stem not in keys:
                f.unlink(missing_ok=True)
