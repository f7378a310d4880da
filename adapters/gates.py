"""Local gate signals of an expert, computed once and stored beside it in `gates.safetensors`.

Keys (stored in float32 or bfloat16, `write_gates(dtype=...)`; the default library's are bf16, half the size;
always read as float32. One [d_in] vector per LoRA-wrapped module, named by PEFT's module name):
    arrow.<module>      Arrow prototype: top right-singular vector of B·A (adapters.engine.gating.arrow_prototype)
    phatgoose.<module>  PHATGOOSE gate vector v, trained post hoc (training.gates)
e.g. `arrow.base_model.model.model.layers.0.self_attn.q_proj`. The file's metadata holds, per kind, a JSON
record (`<kind>`) and `<kind>.adapter_sha256`, the hash of the adapter weights the gates were computed from, so
gates of a replaced adapter read as missing rather than silently wrong.

Writes are atomic (temp file + os.replace) and keep the other kind's keys. Two processes writing the same
expert's gates at once can still lose one update (read-modify-write); `flock train-gates` runs one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.composite import lora_scale
from adapters.safetensors_io import read_safetensors, read_tensors
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE

GATES_FILE = "gates.safetensors"
KINDS = ("arrow", "phatgoose")
PEFT_PREFIX = "base_model.model."
# Storage dtypes by name (`flock train-gates --dtype`); bf16 halves the file.
GATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_module_name(peft_module: str) -> str:
    """PEFT's module name -> the name of the same nn.Linear in the bare transformers model."""
    return peft_module[len(PEFT_PREFIX):] if peft_module.startswith(PEFT_PREFIX) else peft_module


def load_lora(expert_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({PEFT module name: (A [r, d_in], B [d_out, r])} in float32, scale s = lora_alpha / r)."""
    expert_dir = Path(expert_dir)
    config = json.loads((expert_dir / CONFIG_FILE).read_text())
    tensors = read_tensors(expert_dir / WEIGHTS_FILE)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(tensors):
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            factors[module] = (tensors[key].float(), tensors[f"{module}.lora_B.weight"].float())
    if not factors:
        raise ValueError(f"no LoRA factors in {expert_dir / WEIGHTS_FILE}")
    return factors, lora_scale(config)


def adapter_sha256(expert_dir: Path) -> str:
    return hashlib.sha256((Path(expert_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def _read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        return {}, {}
    tensors, metadata = read_safetensors(path)
    return tensors, dict(metadata)


def write_gates(expert_dir: Path, kind: str, gates: dict[str, torch.Tensor], info: dict | None = None, *,
                dtype: torch.dtype = torch.float32) -> Path:
    """Replace the `kind` keys of the expert's gates file with `gates` ({PEFT module name: [d_in]}) stored in
    `dtype`, keeping the other kind's keys as they are; atomic. `info` (JSON-able) is stored in the metadata
    under `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if dtype not in GATE_DTYPES.values():
        raise ValueError(f"gates are stored as one of {sorted(GATE_DTYPES)}, not {dtype}")
    expert_dir = Path(expert_dir)
    path = expert_dir / GATES_FILE
    tensors, metadata = _read_all(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{kind}.")}
    tensors.update({f"{kind}.{m}": v.detach().to(dtype).contiguous().clone() for m, v in gates.items()})
    metadata.update({"format": "pt", kind: json.dumps(info or {}),
                     f"{kind}.adapter_sha256": adapter_sha256(expert_dir)})
    tmp = expert_dir / f".{GATES_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_gates(expert_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    """{PEFT module name: gate vector [d_in], float32} of one kind; empty if none are stored."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    tensors, _ = _read_all(Path(expert_dir) / GATES_FILE)
    prefix = f"{kind}."
    return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


def gates_info(expert_dir: Path, kind: str) -> dict | None:
    """The JSON record stored with `kind` (recipe, timings), or None."""
    _, metadata = _read_all(Path(expert_dir) / GATES_FILE)
    return json.loads(metadata[kind]) if kind in metadata else None


def has_gates(expert_dir: Path, kind: str) -> bool:
    """True when gates of `kind` exist for every LoRA module and were computed from the current adapter weights."""
    expert_dir = Path(expert_dir)
    path = expert_dir / GATES_FILE
    if not path.is_file():
        return False
    gates, metadata = read_safetensors(path)
    keys = set(gates)
    if metadata.get(f"{kind}.adapter_sha256") != adapter_sha256(expert_dir):
        return False
    modules = {k[: -len(".lora_A.weight")] for k in read_tensors(expert_dir / WEIGHTS_FILE)
               if k.endswith(".lora_A.weight")}
    return all(f"{kind}.{m}" in keys for m in modules)


def arrow_gates(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Arrow prototypes of every module; modules with equal factor shapes are done in one batched call."""
    from adapters.engine.gating import arrow_prototype

    groups: dict[tuple, list[str]] = defaultdict(list)
    for module, (a, b) in factors.items():
        groups[(tuple(a.shape), tuple(b.shape))].append(module)
    out: dict[str, torch.Tensor] = {}
    for modules in groups.values():
        protos = arrow_prototype(torch.stack([factors[m][0] for m in modules]),
                                 torch.stack([factors[m][1] for m in modules]))
        out.update(zip(modules, protos.unbind(0)))
    return dict(sorted(out.items()))


def compute_arrow_gates(expert_dir: Path, *, write: bool = True,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Arrow prototypes of an expert (no training, no base model), written to its gates file in `dtype` unless
    write=False."""
    t0 = time.perf_counter()
    factors, _ = load_lora(Path(expert_dir))
    gates = arrow_gates(factors)
    if write:
        write_gates(Path(expert_dir), "arrow", gates,
                    {"method": "top right-singular vector of B·A via QR + SVD of the r×r core",
                     "seconds": round(time.perf_counter() - t0, 4)}, dtype=dtype)
    return gates
