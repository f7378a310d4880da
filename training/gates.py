"""PHATGOOSE post-hoc gate training for one expert (ROUTING.md; r-three/phatgoose), on the CPU or a GPU.

Every LoRA-wrapped linear of the base model becomes y = W u + sigmoid(v·u) · s B A u, with one gate vector v
per module initialised to zeros; base and LoRA are frozen and only the v's are trained with the ordinary LM
loss on the expert's own train data (the same chat-formatted examples and answer-only loss as
training.lora). Recipe: 100 steps × 16 examples, AdamW lr 5e-3 (weight decay 0), constant after a 6%
linear warm-up, gradient clipping at 1.0 as in training.lora. The trained v's are written as the
`phatgoose.<module>` keys of the expert's gates.safetensors (adapters.gates); arrow keys are kept.

A new expert needs only its own data: the gates of the other experts are not touched.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from adapters.card import read_card
from adapters.gates import base_module_name, load_lora, write_gates
from training.lora import DEFAULT_BASE_DIR, NUM_THREADS, encode_example, load_base, run_training
from training.reference import swap_module
from training.tasks import Example, get_task


class SigmoidGatedLoRA(nn.Module):
    """y = W u + sigmoid(v·u) · s B A u with W, A, B frozen and v trainable (zeros at the start)."""

    A: torch.Tensor  # buffers, declared for the type checker
    B: torch.Tensor

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        w = base.weight
        self.register_buffer("A", A.to(w.device, w.dtype), persistent=False)  # [r, d_in]
        self.register_buffer("B", B.to(w.device, w.dtype), persistent=False)  # [d_out, r]
        self.scale = scale
        self.gate = nn.Parameter(torch.zeros(A.shape[1], dtype=w.dtype, device=w.device))  # v, [d_in]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(u @ self.gate).unsqueeze(-1)  # [..., 1]
        return self.base(u) + g * ((u @ self.A.T) @ self.B.T) * self.scale


def expert_task_name(expert_dir: Path) -> str:
    """The task an expert was trained on: its card's recipe, else the card's name, else the directory name."""
    card = read_card(Path(expert_dir))
    if card is not None:
        return str(card.extra.get("recipe", {}).get("task") or card.name)
    return Path(expert_dir).name


def train_phatgoose_gates(
    expert_dir: Path,
    *,
    examples: Sequence[Example] | None = None,
    task_name: str | None = None,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 5e-3,
    warmup_frac: float = 0.06,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    base: tuple | None = None,
    base_dir: Path = DEFAULT_BASE_DIR,
    write: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Train the expert's PHATGOOSE gate vectors and (write=True) store them beside it.

    Data: `examples` if given, else `steps × batch_size` train examples of `task_name` (default: the expert's
    task, see expert_task_name) generated with `seed`. `base` is an already loaded (model, tokenizer) from
    training.lora.load_base, used in place and restored afterwards; without it the base is loaded from
    `base_dir`. Returns a summary: expert, task, final_loss, seconds, seconds_per_step, recipe, gates
    ({PEFT module name: v [d_in]}). Trained in float32; stored in `dtype`.
    """
    expert_dir = Path(expert_dir)
    name = expert_dir.name
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(seed)
    model, tokenizer = base if base is not None else load_base(base_dir)
    factors, scale = load_lora(expert_dir)

    if examples is None:
        task_name = task_name or expert_task_name(expert_dir)
        examples = get_task(task_name).generate("train", steps * batch_size, seed)
    encoded = [encode_example(tokenizer, e) for e in examples]
    random.Random(seed).shuffle(encoded)
    if not encoded:
        raise ValueError("no training examples")

    recipe = {"method": "phatgoose", "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW",
              "weight_decay": 0.0, "schedule": "constant", "warmup_frac": warmup_frac, "grad_clip": 1.0,
              "seed": seed, "task": task_name, "train_examples": len(encoded), "gate_init": "zeros",
              "loss": "assistant answer + end-of-turn tokens", "dtype": "float32",
              "saved_dtype": str(dtype).removeprefix("torch."),
              "device": next(model.parameters()).device.type}

    gated: dict[str, SigmoidGatedLoRA] = {}
    originals: dict[str, nn.Module] = {}
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for module, (a, b) in factors.items():
            target = base_module_name(module)
            linear = model.get_submodule(target)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{target} is {type(linear).__name__}, expected nn.Linear")
            gated[module] = SigmoidGatedLoRA(linear, a, b, scale)
            originals[target] = swap_module(model, target, gated[module])
        params = [g.gate for g in gated.values()]
        progress(f"[{name}] training PHATGOOSE gates on {len(gated)} modules ({sum(p.numel() for p in params)} "
                 f"params), {steps} steps x {batch_size}, lr {lr}")
        final_loss, seconds = run_training(
            model, encoded, params, steps=steps, batch_size=batch_size, lr=lr, pad_id=tokenizer.pad_token_id,
            label=name, what="gates ", progress=progress, warmup_frac=warmup_frac, schedule="constant")
        gates = {m: g.gate.detach().cpu().clone() for m, g in gated.items()}
    finally:
        for target, linear in originals.items():
            swap_module(model, target, linear)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)

    summary = {"expert": name, "task": task_name, "final_loss": final_loss, "seconds": seconds,
               "seconds_per_step": seconds / max(1, steps), "recipe": recipe}
    if write:
        write_gates(expert_dir, "phatgoose", gates, {**recipe, "final_loss": final_loss,
                                                    "seconds": round(seconds, 2)}, dtype=dtype)
        progress(f"[{name}] PHATGOOSE gates written to {expert_dir / 'gates.safetensors'} ({seconds:.0f}s)")
    return {**summary, "gates": gates}
