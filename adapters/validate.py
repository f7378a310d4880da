"""Checks an adapter directory before it joins the pool: a LoRA for our base model that vLLM can load."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import ForbiddenPath, InvalidExpert
from adapters.safetensors_io import read_tensors

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class ModelShape:
    """(in, out) features of each LoRA-able linear of the base model, read from its config.json."""

    num_layers: int
    linears: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        hidden = config["hidden_size"]
        inter = config["intermediate_size"]
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
        q = config["num_attention_heads"] * head_dim
        return cls(
            num_layers=config["num_hidden_layers"],
            linears={
                "q_proj": (hidden, q),
                "k_proj": (hidden, kv),
                "v_proj": (hidden, kv),
                "o_proj": (q, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelShape:
        return cls.from_config(json.loads((model_dir / "config.json").read_text()))


def resolve_inside(path: str | Path, roots: list[Path]) -> Path:
    """Resolve symlinks and `..`, then insist the result lies inside one of the allowed roots."""
    try:
        resolved = Path(path).expanduser().resolve()
        resolved.exists()  # a name the file system refuses (too long, say) fails here, not later
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a lone surrogate, a name too long, a loop
        raise InvalidExpert(f"expert path {str(path)[:200]!r} is not a usable path: {exc}", "path") from None
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise ForbiddenPath(f"expert path {str(path)!r} is outside the allowed expert roots ({allowed})", "path")


def base_model_matches(declared: str | None, base_name: str) -> bool:
    """PEFT writes whatever path or hub id the adapter was trained from; compare the final component."""
    if not declared:
        return False
    return Path(declared.rstrip("/")).name.lower() == base_name.lower()


def validate_adapter(adapter_dir: Path, *, base_name: str, shape: ModelShape, max_rank: int) -> dict:
    """Raise InvalidExpert saying what is wrong, or return the parsed adapter_config.json."""
    if not adapter_dir.is_dir():
        raise InvalidExpert(f"expert path {str(adapter_dir)!r} is not a directory", "path")
    config_path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise InvalidExpert(f"{CONFIG_FILE} is missing in {adapter_dir}", "path") from None
    except (OSError, ValueError) as exc:
        raise InvalidExpert(f"{CONFIG_FILE} is not valid JSON: {exc}", "path") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidExpert(f"{CONFIG_FILE} must describe a LORA adapter (peft_type 'LORA')", "path")
    if not base_model_matches(config.get("base_model_name_or_path"), base_name):
        raise InvalidExpert(
            f"adapter was trained for {config.get('base_model_name_or_path')!r}, not the base model {base_name!r}",
            "path",
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidExpert("adapter_config.json has no positive integer rank 'r'", "path")
    if rank > max_rank:
        raise InvalidExpert(f"adapter rank {rank} exceeds the backend's max LoRA rank {max_rank}", "path")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise InvalidExpert("DoRA adapters and modules_to_save are not supported by the backend", "path")
    _check_weights(adapter_dir / WEIGHTS_FILE, rank, shape)
    return config


def _check_weights(path: Path, rank: int, shape: ModelShape) -> None:
    if not path.is_file():
        raise InvalidExpert(f"{WEIGHTS_FILE} is missing in {path.parent}", "path")
    seen = 0
    try:
        tensors = read_tensors(path)
        for key in tensors:
            m = _KEY_RE.match(key)
            if not m:
                raise InvalidExpert(f"unexpected tensor {key!r} in {WEIGHTS_FILE}", "path")
            layer, _, module, ab = int(m[1]), m[2], m[3], m[4]
            if layer >= shape.num_layers or module not in shape.linears:
                raise InvalidExpert(f"tensor {key!r} names no linear layer of the base model", "path")
            tensor = tensors[key]
            fan_in, fan_out = shape.linears[module]
            want = (rank, fan_in) if ab == "A" else (fan_out, rank)
            if tuple(tensor.shape) != want:
                raise InvalidExpert(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {want}", "path")
            if not torch.isfinite(tensor.float()).all():
                raise InvalidExpert(f"tensor {key!r} holds NaN or infinite values", "path")
            seen += 1
    except InvalidExpert:
        raise
    except Exception as exc:  # safetensors raises several unrelated types on corrupt files
        raise InvalidExpert(f"{WEIGHTS_FILE} is unreadable: {exc}", "path") from None
    if seen == 0:
        raise InvalidExpert(f"{WEIGHTS_FILE} holds no LoRA tensors", "path")
