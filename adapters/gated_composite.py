"""Gated composites: a per-token routing decision (arrow, phatgoose, glider) written as ONE LoRA directory.

The global router picks C candidate experts and their global scores; the per-token gate (adapters/engine/gating.py)
then mixes them inside the engine's batch. vLLM applies one adapter per request, so the whole decision travels
as one adapter whose rank blocks are the candidates' factors, plus, per module, one gate row per candidate and a
header row that flock's vLLM plugin (adapters/engine/plugin.py) recognises (adapters/engine/gated_format.py):

    A rows:  A_1 … A_C  |  gate_1 … gate_C  |  header          (rank R = Σ r_e + C + 1)
    B cols:  s_1 B_1 … s_C B_C  |  0 … 0  |  0

The shrink x·Aᵀ then yields, for free, each token's projections on the gate rows:
- phatgoose/glider: gate_e = LN(v_e)/√d, so LN(u)·LN(v_e)/√d = (u·gate_e − mean(u)·Σgate_e) / std(u);
- arrow: gate_e = p_e/T, so |u·p_e|/T = |u·gate_e|;
and the plugin turns them into weights (s = local + α·global, top-k, softmax over the kept) that scale each
candidate's block before the expand. The header holds what the gate needs, as small integers and bf16-exact
values (the engine stores adapters in bf16):

    [MAGIC, kind, C, k, α, r_1…r_C, q_1…q_C, present_1…present_C, …, −MAGIC]

q_e = (g_e − max g) / 0.05, rounded: softmax is shift-invariant, so only the gaps to the best score matter, and
a 0.05 grid lets the queries of one task share a composite (building and loading one costs about a second on
this CPU, so one per query would dominate). Candidates whose gap makes α·gap < −20 cannot win a token (the local
logits span a few units) and are left out; with α = 0 the global scores play no part, so the candidates are
sorted by name with q = 0 and every query with the same candidates shares ONE composite. An engine without the
plugin would add every candidate's full delta: gated composites are for flock's vLLM backends only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.composite import lora_scale, write_once
from adapters.engine.gated_format import GATE_CODES, SCORE_STEP, encode_header
from adapters.engine.gating import gate_rows as rows_of
from adapters.gates import read_gates
from adapters.safetensors_io import read_tensors
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE

GATED_PREFIX = "flock-gated-"
GLOBAL_CUTOFF = 20.0  # candidates with α·gap below −this are left out


def bf16_exact(value: float) -> float:
    """The value the engine will read back from a bf16 header."""
    return float(torch.tensor(value, dtype=torch.float32).to(torch.bfloat16).float())


def canonical(parts: Sequence[tuple[str, float, Path]], spec: GateSpec) -> list[tuple[str, float, Path]]:
    """The candidates as the composite holds them: (name, quantised gap to the best global score, dir)."""
    alpha = spec.normalised().alpha
    if alpha == 0:
        return sorted((n, 0.0, Path(p)) for n, _, p in parts)
    top = max(s for _, s, _ in parts)
    out = []
    for name, score, path in parts:
        gap = round(round((score - top) / SCORE_STEP) * SCORE_STEP, 6)
        if alpha * gap >= -GLOBAL_CUTOFF:
            out.append((name, gap, Path(path)))
    return out


@dataclass(frozen=True)
class GateSpec:
    """How the candidates of one decision are mixed per token."""

    kind: str  # "phatgoose" (glider is phatgoose with α > 0) or "arrow"
    alpha: float
    top_k: int
    temperature: float = 1.0  # arrow only

    def normalised(self) -> GateSpec:
        return GateSpec(self.kind, bf16_exact(self.alpha), self.top_k, self.temperature)


def gated_rank(ranks: Sequence[int]) -> int:
    return sum(ranks) + len(ranks) + 1


def build_gated(parts: Sequence[tuple[str, float, Path]], spec: GateSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of the gated composite of `parts` = (name, global score, adapter dir), taken
    as they are (GatedCompositeStore.ensure canonicalises them first)."""
    if spec.kind not in GATE_CODES:
        raise ValueError(f"gate kind must be one of {sorted(GATE_CODES)}")
    spec = spec.normalised()
    configs = [json.loads((Path(d) / CONFIG_FILE).read_text()) for _, _, d in parts]
    loaded = [read_tensors(Path(d) / WEIGHTS_FILE) for _, _, d in parts]
    gates = [read_gates(Path(d), spec.kind) for _, _, d in parts]
    ranks = [c["r"] for c in configs]
    n = len(parts)
    modules = sorted({k.rsplit(".lora_", 1)[0] for t in loaded for k in t})
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        ref_a = next(t[f"{module}.lora_A.weight"] for t in loaded if f"{module}.lora_A.weight" in t)
        ref_b = next(t[f"{module}.lora_B.weight"] for t in loaded if f"{module}.lora_B.weight" in t)
        d_in, d_out = ref_a.shape[1], ref_b.shape[0]
        a_blocks, b_blocks, gate_rows, present = [], [], [], []
        for tensors, config, rank, gate in zip(loaded, configs, ranks, gates):
            a = tensors.get(f"{module}.lora_A.weight")
            g = gate.get(module)
            if a is None or g is None:  # no LoRA (or no gate) on this module: a zero block the gate never picks
                if a is not None and g is None:
                    raise ValueError(f"expert has no {spec.kind} gate for {module}: run `flock train-gates`")
                a_blocks.append(torch.zeros(rank, d_in))
                b_blocks.append(torch.zeros(d_out, rank))
                gate_rows.append(torch.zeros(d_in))
                present.append(0.0)
                continue
            a_blocks.append(a.float())
            b_blocks.append(tensors[f"{module}.lora_B.weight"].float() * lora_scale(config))
            g = g.float()
            gate_rows.append(rows_of(g[None], GATE_CODES[spec.kind], spec.temperature)[0])
            present.append(1.0)
        try:
            header = encode_header(d_in, spec.kind, spec.top_k, spec.alpha, ranks, [s for _, s, _ in parts], present)
        except ValueError as exc:
            raise ValueError(f"{module}: {exc}") from None
        out[f"{module}.lora_A.weight"] = torch.cat([*a_blocks, torch.stack(gate_rows), header[None]]).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat([*b_blocks, torch.zeros(d_out, n + 1)], dim=1).contiguous()
    total = gated_rank(ranks)
    targets = sorted({m.rsplit(".", 1)[1] for m in modules})
    config = {**configs[0], "r": total, "lora_alpha": total, "use_rslora": False, "target_modules": targets,
              "rank_pattern": {}, "alpha_pattern": {}}
    return {k: v.to(torch.bfloat16) for k, v in out.items()}, config


class GatedCompositeStore:
    """Builds each gated composite once per (pool version, candidates, quantised scores, gate spec)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    @staticmethod
    def composite_id(pool_version: str, parts: Sequence[tuple[str, float]], spec: GateSpec) -> str:
        spec = spec.normalised()
        key = json.dumps([pool_version, [[n, round(s, 4)] for n, s in parts],
                          [spec.kind, spec.alpha, spec.top_k, spec.temperature]])
        return GATED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]

    def ensure(self, pool_version: str, parts: Sequence[tuple[str, float, Path]], spec: GateSpec,
               before_build: Callable[[], None] | None = None) -> tuple[str, Path]:
        """(composite id, directory) for candidates `parts` = (name, global score, dir); built on first use, after
        `before_build()` (which may raise to refuse the build)."""
        parts = canonical(parts, spec)
        cid = self.composite_id(pool_version, [(n, s) for n, s, _ in parts], spec)

        def build() -> tuple[dict[str, torch.Tensor], dict, dict]:
            if before_build is not None:
                before_build()
            tensors, config = build_gated(parts, spec)
            return tensors, config, {"pool_version": pool_version, "gate": spec.normalised().__dict__,
                                     "experts": [{"name": n, "global_gap": s, "path": str(p)} for n, s, p in parts]}

        return cid, write_once(self.root / cid, self._lock, build)
