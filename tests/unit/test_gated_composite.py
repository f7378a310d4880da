"""Gated composites and the vLLM plugin's per-token gate, against the gate math of adapters/engine/gating.py.

The plugin's ops are called exactly as vLLM's CPU punica wrapper calls them (stacked, rank-padded bf16 weights,
one slot index per token, a float32 shrink buffer), with a gated composite, a plain adapter and no adapter in one
batch; the expected output is computed independently from the experts' own factors and gates.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adapters.engine import lora_linear
from adapters.engine import plugin as vllm_plugin
from adapters.engine import slots as slot_data
from adapters.engine.gating import arrow_logits, arrow_prototype, combine, phatgoose_logits
from adapters.gated_composite import GatedCompositeStore, GateSpec, build_gated, canonical, gated_rank
from adapters.gates import write_gates
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from tests.unit.engine_helpers import whole_layer

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
D_IN, D_OUT, RANK, MAX_RANK = 64, 48, 4, 64


def write_expert(path, seed: int, *, alpha: int = 16, missing: bool = False):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(RANK, D_IN, generator=gen) / D_IN**0.5).to(torch.bfloat16)
    b = (torch.randn(D_OUT, RANK, generator=gen) * 0.3).to(torch.bfloat16)
    other = "base_model.model.model.layers.0.self_attn.v_proj"
    tensors = {f"{other}.lora_A.weight": a.clone(), f"{other}.lora_B.weight": b.clone()}
    if not missing:
        tensors.update({f"{MODULE}.lora_A.weight": a, f"{MODULE}.lora_B.weight": b})
    path.mkdir(parents=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": alpha,
                                                "target_modules": ["q_proj", "v_proj"]}))
    modules = [other] + ([] if missing else [MODULE])
    write_gates(path, "phatgoose", {m: torch.randn(D_IN, generator=gen) for m in modules})
    write_gates(path, "arrow", {m: arrow_prototype(a.float(), b.float()) for m in modules})
    return path


@pytest.fixture
def experts(tmp_path):
    return [write_expert(tmp_path / f"e{i}", seed=i, missing=(i == 2)) for i in range(3)]


def stacked(*adapters):
    """vLLM's stacked buffers: (slots, 1, max_rank, d_in) and (slots, 1, d_out, max_rank), zero-padded, bf16."""
    a = torch.zeros(len(adapters), 1, MAX_RANK, D_IN, dtype=torch.bfloat16)
    b = torch.zeros(len(adapters), 1, D_OUT, MAX_RANK, dtype=torch.bfloat16)
    for slot, (la, lb) in enumerate(adapters):
        a[slot, 0, : la.shape[0]] = la
        b[slot, 0, :, : lb.shape[1]] = lb
    return a, b


@pytest.fixture(params=["slices", "layer"])
def path(request):
    """The plugin's two paths: vLLM's slice-by-slice ops, and the whole-layer add_lora_linear."""
    return request.param


def plugin_forward(x, a, b, indices, path="slices"):
    y = torch.zeros(x.shape[0], D_OUT, dtype=torch.float32)
    if path == "layer":
        assert whole_layer(y, x, indices.clone(), (a,), (b,), 1.0)
        return y
    buffer = torch.zeros(x.shape[0], MAX_RANK, dtype=torch.float32)
    vllm_plugin.bgmv_shrink(x, a, buffer, indices, 1.0)
    vllm_plugin.bgmv_expand(buffer, b, y, indices, add_inputs=True)
    return y


def expected_mixture(x, parts, spec: GateSpec):
    """Σ_e p̃_e s_e B_e A_e u from the experts' own factors and gates (float32), adapters.engine.gating's combination;
    `parts` = canonical (name, global gap, dir) candidates."""
    from safetensors.torch import load_file

    from adapters.gates import read_gates

    factors, gates, avail = [], [], []
    for _, _, path in parts:
        t = load_file(str(path / WEIGHTS_FILE))
        if f"{MODULE}.lora_A.weight" in t:
            factors.append((t[f"{MODULE}.lora_A.weight"].float(), t[f"{MODULE}.lora_B.weight"].float() * 4.0))
            gates.append(read_gates(path, spec.kind)[MODULE])
            avail.append(True)
        else:
            factors.append((torch.zeros(RANK, D_IN), torch.zeros(D_OUT, RANK)))
            gates.append(torch.ones(D_IN))
            avail.append(False)
    u = x.float()
    g = torch.stack(gates)
    local = phatgoose_logits(u, g) if spec.kind == "phatgoose" else arrow_logits(u, g, spec.temperature)
    glob = torch.tensor([gap for _, gap, _ in parts])
    w = combine(local, glob, spec.alpha, spec.top_k, mask=torch.tensor(avail))
    deltas = torch.stack([(u @ a.T) @ b.T for a, b in factors], dim=1)  # (tokens, E, d_out)
    return (w.unsqueeze(-1) * deltas).sum(dim=1), w


@pytest.mark.parametrize("spec", [GateSpec("phatgoose", 0.0, 2), GateSpec("phatgoose", 3.0, 2),
                                  GateSpec("arrow", 0.0, 1), GateSpec("phatgoose", 1000.0, 1)])
def test_plugin_gate_matches_the_gate_math(experts, spec, path):
    parts = canonical([(p.name, s, p) for p, s in zip(experts, [0.61, 0.55, 0.32])], spec)
    tensors, config = build_gated(parts, spec)
    assert config["r"] == gated_rank([RANK] * len(parts))
    gated_a, gated_b = tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]
    plain = write_expert(experts[0].parent / "plain", seed=9)
    from safetensors.torch import load_file

    pt = load_file(str(plain / WEIGHTS_FILE))
    a, b = stacked((pt[f"{MODULE}.lora_A.weight"], pt[f"{MODULE}.lora_B.weight"] * 4), (gated_a, gated_b))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(12, D_IN, generator=gen) * 2 + 0.3).to(torch.bfloat16)  # non-zero mean: LN matters
    indices = torch.tensor([1, 1, 0, -1, 1, 1, 1, 0, 1, 1, -1, 1])
    y = plugin_forward(x, a, b, indices, path)

    want, weights = expected_mixture(x[indices == 1], parts, spec)
    assert torch.allclose(y[indices == 1], want, rtol=3e-2, atol=3e-2)
    plain_delta = (x[indices == 0].float() @ pt[f"{MODULE}.lora_A.weight"].float().T) \
        @ (pt[f"{MODULE}.lora_B.weight"].float() * 4).T
    assert torch.allclose(y[indices == 0], plain_delta, rtol=2e-2, atol=2e-2)
    assert (y[indices == -1] == 0).all()
    if spec.alpha >= 1000:  # the global term decides: only the global top-1 is a candidate at all
        assert [n for n, _, _ in parts] == ["e0"] and (weights[:, 0] == 1).all()
    else:
        assert len(parts) == 3 and (weights[:, [n for n, _, _ in parts].index("e2")] == 0).all()  # no q_proj LoRA
        assert (weights > 0).sum(dim=1).eq(min(spec.top_k, 2)).all()


def test_batch_of_one_gated_slot_only(experts, path):
    spec = GateSpec("phatgoose", 0.0, 2)
    parts = canonical([(p.name, 0.5, p) for p in experts], spec)
    tensors, _ = build_gated(parts, spec)
    a, b = stacked((tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]))
    x = torch.randn(5, D_IN).to(torch.bfloat16)
    y = plugin_forward(x, a, b, torch.zeros(5, dtype=torch.long), path)
    want, _ = expected_mixture(x, parts, spec)
    assert torch.allclose(y, want, rtol=3e-2, atol=3e-2)


def test_header_round_trip_and_plain_adapters_untouched(experts):
    spec = GateSpec("arrow", 2.5, 2, temperature=1.0)
    tensors, _ = build_gated([(p.name, s, p) for p, s in zip(experts, [0.9, 0.2, -0.1])], spec)
    a, _ = stacked((torch.randn(RANK, D_IN).to(torch.bfloat16), torch.zeros(D_OUT, RANK)),
                   (tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]))
    gates = slot_data.buffer_slots(a, "a").gates
    assert set(gates) == {1}  # slot 0 is an ordinary adapter
    g = gates[1]
    assert (g.kind, g.n, g.top_k, g.alpha, g.gate_start) == (2, 3, 2, 2.5, 12)
    assert torch.allclose(g.bias[:2], 2.5 * torch.tensor([0.9, 0.2]))  # α·global
    assert g.bias[2] == float("-inf")  # the third candidate has no LoRA on this module
    assert g.column_expert.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_store_reuses_composites_of_nearby_scores(experts, tmp_path):
    store = GatedCompositeStore(tmp_path / "gated")
    spec = GateSpec("phatgoose", 3.0, 2)
    ids = {}
    for label, scores in (("a", [0.61, 0.55, 0.32]), ("same gaps", [0.612, 0.549, 0.33]),
                          ("other", [0.61, 0.45, 0.32])):
        ids[label], path = store.ensure("v1", [(p.name, s, p) for p, s in zip(experts, scores)], spec)
    assert ids["a"] == ids["same gaps"] != ids["other"] and (path / WEIGHTS_FILE).is_file()
    info = json.loads((path / "composite.json").read_text())
    assert info["gate"]["alpha"] == 3.0 and [e["global_gap"] for e in info["experts"]] == [0.0, -0.15, -0.3]
    # α = 0: global scores play no part, so any scores (and any order) give one composite
    flat = GateSpec("phatgoose", 0.0, 2)
    one, _ = store.ensure("v1", [(p.name, s, p) for p, s in zip(experts, [0.9, 0.1, 0.5])], flat)
    two, _ = store.ensure("v1", [(p.name, s, p) for p, s in zip(reversed(experts), [0.2, 0.3, 0.4])], flat)
    assert one == two


def test_canonical_drops_candidates_the_global_term_rules_out(experts):
    parts = [(p.name, s, p) for p, s in zip(experts, [0.70, 0.62, 0.30])]
    assert [n for n, _, _ in canonical(parts, GateSpec("phatgoose", 100.0, 2))] == ["e0", "e1"]  # 100·(−0.4) < −20
    assert [g for _, g, _ in canonical(parts, GateSpec("phatgoose", 100.0, 2))] == [0.0, -0.1]
    assert len(canonical(parts, GateSpec("phatgoose", 10.0, 2))) == 3


def test_missing_gates_are_a_clear_error(tmp_path):
    path = write_expert(tmp_path / "nogates", seed=1)
    (path / "gates.safetensors").unlink()
    with pytest.raises(ValueError, match="train-gates"):
        build_gated([("nogates", 0.5, path)], GateSpec("phatgoose", 0.0, 1))


@pytest.mark.parametrize("spec", [GateSpec("phatgoose", 3.0, 2), GateSpec("arrow", 0.0, 1)])
def test_whole_layer_gates_every_slice_like_the_slice_path(experts, spec):
    """q_proj and v_proj as two slices of one layer (as vLLM's q/k/v): the whole-layer path gates each slice with
    that slice's own gates, in one go, and agrees with the slice-by-slice path; a plain adapter and base tokens
    share the batch."""
    parts = canonical([(p.name, s, p) for p, s in zip(experts, [0.61, 0.55, 0.32])], spec)
    tensors, _ = build_gated(parts, spec)
    other = MODULE.replace("q_proj", "v_proj")
    gen = torch.Generator().manual_seed(3)
    plain = [((torch.randn(RANK, D_IN, generator=gen) / 8).to(torch.bfloat16),
              (torch.randn(D_OUT, RANK, generator=gen) / 2).to(torch.bfloat16)) for _ in range(2)]
    slices = [stacked(plain[0], (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]))
              for m in (MODULE, other)]
    x = (torch.randn(9, D_IN, generator=gen) * 2 + 0.3).to(torch.bfloat16)
    for indices in ([1, 0, -1, 1, 1, 0, 1, -1, 1], [1] * 9):
        idx = torch.tensor(indices)
        want = torch.cat([plugin_forward(x, a, b, idx, "slices") for a, b in slices], dim=1)
        y = torch.zeros(9, 2 * D_OUT)
        assert whole_layer(y, x, idx.clone(), tuple(a for a, _ in slices), tuple(b for _, b in slices), 1.0)
        assert torch.allclose(y, want, rtol=1e-2, atol=1e-2)
        assert (y[idx == -1] == 0).all()


@pytest.mark.parametrize("spec", [GateSpec("phatgoose", 3.0, 2), GateSpec("arrow", 0.0, 1),
                                  GateSpec("phatgoose", 0.0, 3), GateSpec("phatgoose", 1000.0, 1)])
@pytest.mark.parametrize("indices", [[1, 0, -1, 1, 1, 0, 1, -1, 0], [1] * 9])
def test_bf16_batch_of_gated_and_plain_slots_with_the_kernel(experts, monkeypatch, spec, indices):
    """In bf16 a small batch goes to the kernels of adapters/engine/sgmv.cpp: the gated slot's tokens to gated_bf16
    (its own per-token gate), the plain adapter's to sgmv_bf16. Both agree with the torch paths within bf16
    rounding and with the experts' own mixture (float32, from their factors and gates); base tokens stay as
    they were. Two slices (q_proj, v_proj), each gated with its own gates; scale 0.5."""
    from adapters.engine import sgmv

    kernel = sgmv.kernel()
    assert kernel is not None, "adapters/engine/sgmv.cpp did not build on this machine: see the logged compiler error"
    parts = canonical([(p.name, s, p) for p, s in zip(experts, [0.61, 0.55, 0.32])], spec)
    tensors, _ = build_gated(parts, spec)
    other = MODULE.replace("q_proj", "v_proj")
    gen = torch.Generator().manual_seed(4)
    plain = ((torch.randn(RANK, D_IN, generator=gen) / 8).to(torch.bfloat16),
             (torch.randn(D_OUT, RANK, generator=gen) / 2).to(torch.bfloat16))
    slices = [stacked(plain, (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"])) for m in (MODULE, other)]
    x = (torch.randn(9, D_IN, generator=gen) * 2 + 0.3).to(torch.bfloat16)
    y0 = torch.randn(9, 2 * D_OUT, generator=gen).to(torch.bfloat16)
    idx = torch.tensor(indices)

    def forward(k):
        monkeypatch.setattr(lora_linear, "_kernel", lambda: k)
        y = y0.clone()
        assert whole_layer(y, x, idx.clone(), tuple(a for a, _ in slices), tuple(b for _, b in slices), 0.5)
        return y

    calls = []

    class Counting:
        @staticmethod
        def gated_bf16(*args):
            calls.append("gated")
            return kernel.gated_bf16(*args)

        @staticmethod
        def sgmv_bf16(*args):
            calls.append("plain")
            return kernel.sgmv_bf16(*args)

    with_kernel, without = forward(Counting), forward(None)
    assert calls == (["gated", "plain"] if 0 in indices else ["gated"]), calls
    assert torch.allclose(with_kernel.float(), without.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(with_kernel[idx == -1], y0[idx == -1])
    # The gated rows of the q_proj slice against the mixture computed from the experts themselves.
    gated = idx == 1
    want = expected_mixture(x[gated], parts, spec)[0] * 0.5
    delta = with_kernel[gated, :D_OUT].float() - y0[gated, :D_OUT].float()
    assert want.abs().max() > 0.5, "the gated delta is ~0: the test would not see a wrong gate"
    assert torch.allclose(delta, want, rtol=3e-2, atol=6e-2), (delta - want).abs().max()


def test_gated_kernel_threshold(experts, monkeypatch):
    """Batches above GATED_KERNEL_MAX_TOKENS stay on the torch gated path."""
    from adapters.engine import sgmv

    kernel = sgmv.kernel()
    assert kernel is not None, "adapters/engine/sgmv.cpp did not build on this machine: see the logged compiler error"
    spec = GateSpec("phatgoose", 3.0, 2)
    tensors, _ = build_gated(canonical([(p.name, s, p) for p, s in zip(experts, [0.61, 0.55, 0.32])], spec), spec)
    a, b = stacked((tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]))
    calls = []
    counting = type("Counting", (), {"gated_bf16": staticmethod(lambda *a: calls.append(1) or kernel.gated_bf16(*a))})
    monkeypatch.setattr(lora_linear, "_kernel", lambda: counting)
    monkeypatch.setattr(lora_linear, "GATED_KERNEL_MAX_TOKENS", 4)
    for tokens, used in ((4, True), (5, False)):
        calls.clear()
        x = torch.randn(tokens, D_IN).to(torch.bfloat16)
        y = torch.zeros(tokens, D_OUT, dtype=torch.bfloat16)
        assert whole_layer(y, x, torch.zeros(tokens, dtype=torch.long), (a,), (b,), 1.0)
        assert bool(calls) == used and y.abs().sum() > 0
