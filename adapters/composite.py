"""Composite adapters: a weighted linear merge of k LoRAs written as ONE LoRA of stacked rank.

ΔW = Σ_e w_e s_e B_e A_e equals B_c A_c with A_c = concat_rows(A_e) and B_c = concat_cols(w_e s_e B_e), so
the composite is exact, needs no kernel support, and any engine that serves LoRA serves it unchanged.
Its scale is folded into B (lora_alpha = r), so s_c = 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.safetensors_io import read_tensors
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE

COMPOSITE_PREFIX = "flock-merge-"


def lora_scale(config: dict) -> float:
    rank = config["r"]
    alpha = config.get("lora_alpha", rank)
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def _modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in tensors}


def merge_loras(adapter_dirs: Sequence[Path], weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """Stack k adapters into one; modules an adapter lacks get a zero block so every module has rank Σr."""
    configs = [json.loads((d / CONFIG_FILE).read_text()) for d in adapter_dirs]
    loaded = [read_tensors(d / WEIGHTS_FILE) for d in adapter_dirs]
    ranks = [c["r"] for c in configs]
    modules = sorted(set().union(*(_modules(t) for t in loaded)))
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        a_blocks, b_blocks = [], []
        ref_a = next(t[f"{module}.lora_A.weight"] for t in loaded if f"{module}.lora_A.weight" in t)
        ref_b = next(t[f"{module}.lora_B.weight"] for t in loaded if f"{module}.lora_B.weight" in t)
        for tensors, config, rank, weight in zip(loaded, configs, ranks, weights):
            a = tensors.get(f"{module}.lora_A.weight")
            b = tensors.get(f"{module}.lora_B.weight")
            if a is None or b is None:  # validation makes an A without its B impossible
                a_blocks.append(torch.zeros(rank, ref_a.shape[1]))
                b_blocks.append(torch.zeros(ref_b.shape[0], rank))
                continue
            a_blocks.append(a.float())
            b_blocks.append(b.float() * (weight * lora_scale(config)))
        out[f"{module}.lora_A.weight"] = torch.cat(a_blocks, dim=0).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat(b_blocks, dim=1).contiguous()
    total = sum(ranks)
    targets = sorted({m.rsplit(".", 1)[1] for m in modules})
    config = {**configs[0], "r": total, "lora_alpha": total, "use_rslora": False, "target_modules": targets,
              "rank_pattern": {}, "alpha_pattern": {}}
    return out, config


def write_once(target: Path, lock: threading.Lock,
               build: Callable[[], tuple[dict[str, torch.Tensor], dict, dict]]) -> Path:
    """The adapter directory `target`, built by `build()` -> (tensors, adapter_config, composite.json) the first
    time only: written to a temporary directory and renamed into place, so readers never see half of one."""
    if (target / WEIGHTS_FILE).is_file():
        return target
    with lock:
        if (target / WEIGHTS_FILE).is_file():
            return target
        tensors, config, info = build()
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / "composite.json").write_text(json.dumps(info, indent=2))
        os.replace(tmp, target)
    return target


class CompositeStore:
    """Builds each composite once per (pool version, experts, weights) and keeps it on disk."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()

    @staticmethod
    def composite_id(pool_version: str, parts: Sequence[tuple[str, float]]) -> str:
        key = json.dumps([pool_version, [[n, round(w, 4)] for n, w in parts]])
        return COMPOSITE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]

    def ensure(self, pool_version: str, parts: Sequence[tuple[str, float, Path]],
               before_build: Callable[[], None] | None = None) -> tuple[str, Path]:
        """(composite id, directory); builds it on first use, after `before_build()` (which may raise to refuse
        the build). `parts` are (name, weight, adapter dir)."""
        cid = self.composite_id(pool_version, [(n, w) for n, w, _ in parts])

        def build() -> tuple[dict[str, torch.Tensor], dict, dict]:
            if before_build is not None:
                before_build()
            tensors, config = merge_loras([p for _, _, p in parts], [w for _, w, _ in parts])
            return tensors, config, {"pool_version": pool_version, "experts": [
                {"name": n, "weight": w, "path": str(p)} for n, w, p in parts]}

        return cid, write_once(self.root / cid, self._lock, build)

    def clear(self) -> None:
        """Drop every composite on disk (they are rebuilt on demand); called at start-up."""
        if self.root.is_dir():
            for child in self.root.iterdir():
                shutil.rmtree(child, ignore_errors=True)
