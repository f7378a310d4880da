"""Reading safetensors files without memory-mapping them.

safetensors' own readers (`safe_open`, `load_file`) memory-map the file. If another process truncates it
meanwhile (an adapter rewritten in place by an operator or a training job), touching the lost pages raises
SIGBUS and kills the whole gateway. Reading the bytes first turns that into a parse error, which the pool turns
into a quarantine. Adapters and gates are a few MB, so the copy costs little.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read into memory first."""
    data = Path(path).read_bytes()
    tensors = load(data)
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
    return tensors, metadata


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]
