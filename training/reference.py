"""Reference gated mixture-of-LoRA on the transformers model: the definition of truth for per-token routing.

Every LoRA-wrapped nn.Linear of the base model (those any candidate expert targets) is replaced by a
MixtureOfLoRALinear holding the candidates' A, B, scale and gate signals, and computing for each token u:

    local = arrow_logits(u, P) | phatgoose_logits(u, V)           [..., E]   (adapters.engine.gating)
    w     = combine(local, global, α, k)                          s = local + α·global, softmax, top-k, renorm
    y     = W u + Σ_e w_e · s_e B_e A_e u

Plain PyTorch, float32, dense over the candidates (every expert's A·u is computed, then weighted; zero weights
contribute exact zeros): built for clarity and tests, not speed. The vLLM plugin is the fast path and must
agree with this module.

Modes (which local signal, and whether the global term is used):
    "arrow"      Arrow prototypes (computed from the factors if gates.safetensors has none); α·global is added
                 when global scores are set (our extension; α = 0 or no global scores is plain Arrow)
    "phatgoose"  PHATGOOSE gates; global scores ignored (α = 0)
    "glider"     PHATGOOSE gates + α·global (GLIDER); without global scores it equals "phatgoose"
An expert that has no LoRA on a module is masked out there (weight 0), the others share the mass.

Why adapters/ and not router/: this is model code over expert directories (it loads factors and gate files and
swaps modules of a transformers model), like the vLLM plugin it is the reference for; adapters/engine/gating.py keeps
the math as plain functions that both call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters.engine.gating import arrow_logits, combine, phatgoose_logits
from adapters.gates import arrow_gates, base_module_name, load_lora, read_gates

MODES = ("arrow", "phatgoose", "glider")


@dataclass
class RoutingState:
    """Shared by every MixtureOfLoRALinear of one model, so a call can change α, k or the global scores.

    global_scores: None, [E] (one request, every sequence of the batch) or [batch, E] (one row per sequence).
    """

    mode: str
    alpha: float = 100.0
    top_k: int = 2
    temperature: float = 1.0
    global_scores: torch.Tensor | None = None
    record: bool = False  # keep each layer's last routing weights (layer.last_weights), for tests and analysis


class MixtureOfLoRALinear(nn.Module):
    """A frozen base linear plus E candidate LoRAs, mixed per token by the gate of `state.mode`.

    A: [E, r_max, d_in] and B: [E, d_out, r_max] (smaller ranks zero-padded), scales [E], available [E] bool
    (False: the expert has no LoRA here), prototypes P [E, d_in] (Arrow), gates V [E, d_in] (PHATGOOSE; may be
    None in arrow mode).
    """

    A: torch.Tensor  # buffers, declared for the type checker (nn.Module's __getattr__ says Tensor | Module)
    B_cat: torch.Tensor
    scales: torch.Tensor
    available: torch.Tensor
    prototypes: torch.Tensor
    gates: torch.Tensor | None

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                 available: torch.Tensor, prototypes: torch.Tensor, gates: torch.Tensor | None,
                 state: RoutingState):
        super().__init__()
        self.base = base
        dtype = base.weight.dtype
        self.register_buffer("A", A.to(dtype), persistent=False)
        # B_cat [d_out, E * r_max]: expert e's B in columns e*r_max ... (e+1)*r_max - 1, so Σ_e over one matmul.
        self.register_buffer("B_cat", B.to(dtype).permute(1, 0, 2).reshape(B.shape[1], -1), persistent=False)
        self.register_buffer("scales", scales.to(dtype), persistent=False)
        self.register_buffer("available", available.to(torch.bool), persistent=False)
        # Gate signals stay float32 whatever the model's dtype: gating near-ties must not be decided by rounding.
        self.register_buffer("prototypes", prototypes.float(), persistent=False)
        self.register_buffer("gates", None if gates is None else gates.float(), persistent=False)
        self.state = state
        self.last_weights: torch.Tensor | None = None

    def local_logits(self, u: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., E]."""
        if self.state.mode == "arrow":
            return arrow_logits(u, self.prototypes, self.state.temperature)
        if self.gates is None:
            raise RuntimeError("PHATGOOSE gates are missing for this model")
        return phatgoose_logits(u, self.gates)

    def routing_weights(self, u: torch.Tensor) -> torch.Tensor:
        """p̃ per token: [..., d_in] -> [..., E], zeros outside each token's top-k."""
        st = self.state
        g = None if st.mode == "phatgoose" else st.global_scores
        if g is not None:
            g = g.to(u.device)
            if g.dim() == 2:  # [batch, E] -> [batch, 1, ..., E] against u's [batch, seq, ..., d_in]
                g = g.view(g.shape[0], *([1] * (u.dim() - 2)), g.shape[1])
        return combine(self.local_logits(u), g, st.alpha, st.top_k, mask=self.available)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        w = self.routing_weights(u)  # [..., E]
        if self.state.record:
            self.last_weights = w.detach()
        z = torch.einsum("...d,erd->...er", u, self.A)  # A_e u for every expert: [..., E, r_max]
        z = z * (w.to(u.dtype) * self.scales).unsqueeze(-1)  # · p̃_e s_e
        return self.base(u) + z.flatten(-2) @ self.B_cat.T  # + Σ_e B_e (...)


@dataclass
class ExpertWeights:
    name: str
    path: Path
    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # PEFT module name -> (A, B)
    arrow: dict[str, torch.Tensor]
    phatgoose: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: Path, *, need_phatgoose: bool) -> ExpertWeights:
        path = Path(path)
        factors, scale = load_lora(path)
        arrow = read_gates(path, "arrow")
        if not all(m in arrow for m in factors):
            arrow = arrow_gates(factors)  # cheap: no training, so compute rather than fail
        phatgoose = read_gates(path, "phatgoose")
        if need_phatgoose and not all(m in phatgoose for m in factors):
            raise FileNotFoundError(f"expert {path.name} has no PHATGOOSE gates: run `flock train-gates {path.name}`")
        return cls(path.name, path, scale, factors, arrow, phatgoose)


@dataclass
class MixtureModel:
    """The base model with its LoRA targets swapped for MixtureOfLoRALinear (in place), and how to undo it."""

    model: nn.Module
    state: RoutingState
    experts: list[ExpertWeights]
    layers: dict[str, MixtureOfLoRALinear] = field(default_factory=dict)  # PEFT module name -> layer
    _originals: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def set_routing(self, **changes) -> None:
        """Change mode, alpha, top_k, temperature, global_scores or record for the following calls."""
        unknown = [key for key in changes if not hasattr(self.state, key)]
        if unknown:
            raise AttributeError(f"no routing setting {unknown}")
        mode = changes.get("mode", self.state.mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode != "arrow" and any(layer.gates is None for layer in self.layers.values()):
            raise ValueError("PHATGOOSE gates were not loaded; build the mixture in phatgoose or glider mode")
        for key, value in changes.items():
            if key == "global_scores" and value is not None:
                value = torch.as_tensor(value, dtype=torch.float32)
            setattr(self.state, key, value)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               global_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [batch, seq, vocab] of one forward pass (no cache)."""
        if global_scores is not None:
            self.set_routing(global_scores=global_scores)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def generate(self, tokenizer, prompts: Sequence[str], *, global_scores: torch.Tensor | None = None,
                 batch_size: int = 32, max_new_tokens: int = 32) -> list[str]:
        """Greedy completions (training.lora.generate_answers). global_scores: None (keep the state's), [E]
        for every prompt, or [len(prompts), E], one row per prompt."""
        from training.lora import generate_answers

        g = None if global_scores is None else torch.as_tensor(global_scores, dtype=torch.float32)
        if g is None or g.dim() == 1:
            if g is not None:
                self.set_routing(global_scores=g)
            return generate_answers(self.model, tokenizer, prompts, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            self.set_routing(global_scores=g[start : start + batch_size])
            outputs.extend(generate_answers(self.model, tokenizer, prompts[start : start + batch_size],
                                            batch_size=batch_size, max_new_tokens=max_new_tokens))
        return outputs

    def restore(self) -> nn.Module:
        """Put the original linears back; returns the bare base model."""
        for target, linear in self._originals.items():
            swap_module(self.model, target, linear)
        self._originals.clear()
        self.layers.clear()
        return self.model


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted `name` in `model`; returns the module it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def build_mixture_model(
    base_model: nn.Module,
    expert_dirs: Sequence[Path],
    mode: str = "glider",
    *,
    global_scores: torch.Tensor | Sequence[float] | None = None,
    alpha: float = 100.0,
    top_k: int = 2,
    temperature: float = 1.0,
) -> MixtureModel:
    """Swap every LoRA target of `base_model` (in place; see MixtureModel.restore) for a gated mixture of the
    experts in `expert_dirs` (the candidates, in this order: weights and global scores index them so).

    base_model: a transformers causal LM as loaded by training.lora.load_base (float32). mode: see MODES.
    global_scores: GLIDER's per-request cos(g_e, u_q), [E] or [batch, E]; may be set later with set_routing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if not expert_dirs:
        raise ValueError("at least one expert is needed")
    experts = [ExpertWeights.load(Path(d), need_phatgoose=mode != "arrow") for d in expert_dirs]
    state = RoutingState(mode=mode, alpha=alpha, top_k=top_k, temperature=temperature)
    mixture = MixtureModel(base_model, state, experts)
    if global_scores is not None:
        mixture.set_routing(global_scores=global_scores)
        scores = torch.as_tensor(global_scores)
        if scores.shape[-1] != len(experts):
            raise ValueError(f"global_scores has {scores.shape[-1]} entries for "
                             f"{len(experts)} experts")
    modules = sorted(set().union(*(e.factors for e in experts)))
    for module in modules:
        target = base_module_name(module)
        linear = base_model.get_submodule(target)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{target} is {type(linear).__name__}, expected nn.Linear")
        d_out, d_in = linear.weight.shape
        r_max = max(e.factors[module][0].shape[0] for e in experts if module in e.factors)
        E = len(experts)
        A = torch.zeros(E, r_max, d_in)
        B = torch.zeros(E, d_out, r_max)
        P = torch.zeros(E, d_in)
        V = torch.zeros(E, d_in)
        available = torch.zeros(E, dtype=torch.bool)
        for i, e in enumerate(experts):
            if module not in e.factors:
                continue
            a, b = e.factors[module]
            A[i, : a.shape[0]] = a
            B[i, :, : b.shape[1]] = b
            P[i] = e.arrow[module]
            if module in e.phatgoose:
                V[i] = e.phatgoose[module]
            available[i] = True
        scales = torch.tensor([e.scale for e in experts])
        has_v = all(module in e.phatgoose for e in experts if module in e.factors)
        layer = MixtureOfLoRALinear(linear, A, B, scales, available, P, V if has_v else None, state)
        mixture._originals[target] = swap_module(base_model, target, layer)
        mixture.layers[module] = layer
    return mixture
