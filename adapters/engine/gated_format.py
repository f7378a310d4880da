"""The gated-composite header: the one row of a gated composite's A matrix that tells the engine how to gate.

Written by adapters/gated_composite.py (the builder) and read by the vLLM plugin, so the two cannot disagree on
the layout. One row per LoRA module, after the candidates' blocks and gate rows:

    [MAGIC, FORMAT_VERSION, kind, C, k, α, r_1…r_C, q_1…q_C, present_1…present_C, 0 …, −MAGIC]

Every value is a small integer or bf16-exact (the engine stores adapters in bf16). q_e is the candidate's global
score gap to the best, on a SCORE_STEP grid. An engine that reads a version it does not know refuses the
composite (plugin: the slot's delta is removed and an error logged), and the gateway sends gated composites only
to backends whose plugin reports this version (adapters/engine/capabilities.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAGIC = 77.0
FORMAT_VERSION = 1
GATE_CODES = {"phatgoose": 1, "arrow": 2}  # the gate kind as the header stores it (glider: phatgoose with α > 0)
HEADER_FIXED = 6  # MAGIC, version, kind, C, k, alpha
SCORE_STEP = 0.05  # global-score gaps are stored as integers on this grid


def header_width(candidates: int) -> int:
    return HEADER_FIXED + 3 * candidates + 1


def encode_header(width: int, kind: str, top_k: int, alpha: float, ranks: Sequence[int], gaps: Sequence[float],
                  present: Sequence[float]) -> torch.Tensor:
    """The header row (float32, `width` wide) of one module: `gaps` are the candidates' global-score gaps."""
    n = len(ranks)
    if width < header_width(n):
        raise ValueError(f"input width {width} too small for a header of {n} candidates")
    values = [MAGIC, float(FORMAT_VERSION), float(GATE_CODES[kind]), float(n), float(top_k), alpha, *map(float, ranks),
              *(float(round(gap / SCORE_STEP)) for gap in gaps), *map(float, present)]
    header = torch.zeros(width)
    header[: len(values)] = torch.tensor(values)
    header[-1] = -MAGIC
    return header


@dataclass(frozen=True)
class Header:
    version: int
    kind: int  # a value of GATE_CODES
    top_k: int
    alpha: float
    ranks: list[int]
    steps: torch.Tensor  # (C,) float32: the global-score gaps in units of SCORE_STEP
    present: torch.Tensor  # (C,) bool: the candidate has a LoRA on this module

    def bias(self) -> torch.Tensor:
        """(C,) α·gap, the global term of each candidate's gate logit; -inf for a candidate absent here."""
        return (self.alpha * self.steps * SCORE_STEP).masked_fill(~self.present, float("-inf"))

    @property
    def gate_start(self) -> int:
        """First gate row == Σ r_e; the header is at gate_start + C."""
        return sum(self.ranks)


def is_header(row: torch.Tensor) -> bool:
    """The row carries a gated-composite header (of any version)."""
    return bool(row[0] == MAGIC and row[-1] == -MAGIC)


class UnknownFormat(ValueError):
    pass


def decode_header(row: torch.Tensor) -> Header:
    """The header of a row for which `is_header` holds; UnknownFormat for another version or a bad kind."""
    row = row.float()
    version = int(row[1])
    if version != FORMAT_VERSION:
        raise UnknownFormat(f"gated-composite format version {version}; this engine reads {FORMAT_VERSION}")
    if int(row[2]) not in GATE_CODES.values():
        raise UnknownFormat(f"unknown gate kind {int(row[2])}")
    n, f = int(row[3]), HEADER_FIXED
    return Header(version=version, kind=int(row[2]), top_k=int(row[4]), alpha=float(row[5]),
                  ranks=[int(r) for r in row[f:f + n]],
                  steps=row[f + n:f + 2 * n], present=row[f + 2 * n:f + 3 * n] > 0)
