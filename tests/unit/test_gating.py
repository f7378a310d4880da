"""Per-token gate math (adapters.engine.gating), gate files (adapters.gates), PHATGOOSE gate training and the reference
gated mixture-of-LoRA (training.reference) on the real base model with small random LoRAs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapters.card import ExpertCard
from adapters.engine.gating import arrow_logits, arrow_prototype, combine, phatgoose_logits, select, standardize
from adapters.gates import (
    GATES_FILE,
    compute_arrow_gates,
    gates_info,
    has_gates,
    load_lora,
    read_gates,
    write_gates,
)
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from training.gates import train_phatgoose_gates
from training.lora import DEFAULT_TARGETS, _chat_prompt, load_base
from training.reference import MixtureOfLoRALinear, build_mixture_model
from training.synthetic import write_random_lora
from training.tasks import get_task

BASE = "SmolLM2-135M-Instruct"
PROMPTS = ["What is 17 plus 25?", "Translate 'good morning' into French.", "Sort these numbers: 9 3 7 1"]
# Mixture vs PEFT: the same float32 products summed in a different order (p̃·s folded into A·u before B).
# Logits are O(10); observed differences are ~1e-5.
LOGIT_ATOL = 1e-3


# ---------------------------------------------------------------- pure gate math


def test_arrow_prototype_is_top_right_singular_vector_of_BA():
    gen = torch.Generator().manual_seed(0)
    for r, d_in, d_out in [(4, 64, 32), (1, 48, 80), (8, 40, 24), (6, 30, 5)]:  # incl. r > d_out (rank-deficient)
        A = torch.randn(3, r, d_in, generator=gen)
        B = torch.randn(3, d_out, r, generator=gen)
        P = arrow_prototype(A, B)  # batched over 3 experts
        assert P.shape == (3, d_in) and P.dtype == torch.float32
        for e in range(3):
            _, _, vh = torch.linalg.svd((B[e] @ A[e]).double())  # the full matrix: test only
            assert abs(float(vh[0].float() @ P[e])) == pytest.approx(1.0, abs=1e-5)
            assert float(P[e].norm()) == pytest.approx(1.0, abs=1e-5)
            assert torch.allclose(arrow_prototype(A[e], B[e]), P[e], atol=1e-6)  # unbatched = batched
    # sign flip of both factors: same ΔW, same (canonically signed) prototype
    A, B = torch.randn(4, 64, generator=gen), torch.randn(32, 4, generator=gen)
    assert torch.allclose(arrow_prototype(-A, -B), arrow_prototype(A, B), atol=1e-6)
    # zero LoRA (B = 0 as PEFT initialises it, or both zero): no direction, zero prototype, no NaN
    for a, b in [(torch.randn(4, 64), torch.zeros(32, 4)), (torch.zeros(4, 64), torch.zeros(32, 4))]:
        p = arrow_prototype(a, b)
        assert torch.equal(p, torch.zeros(64))


def test_local_logits_follow_the_formulas():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, 5, 96, generator=gen) * 3 + 1
    V = torch.randn(4, 96, generator=gen)
    V[3] = 0  # an untrained gate: logit 0
    want = F.layer_norm(u, (96,)) @ F.layer_norm(V, (96,)).T / math.sqrt(96)
    got = phatgoose_logits(u, V)
    assert got.shape == (2, 5, 4)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[..., 3], torch.zeros(2, 5))
    assert torch.allclose(standardize(u).mean(-1), torch.zeros(2, 5), atol=1e-5)
    P = F.normalize(torch.randn(4, 96, generator=gen), dim=-1)
    assert torch.allclose(arrow_logits(u, P, temperature=2.0), (u @ P.T).abs() / 2.0)
    assert torch.allclose(arrow_logits(u, -P), arrow_logits(u, P))  # sign-agnostic


def _combine_as_written(local, glob, alpha, k):
    """ROUTING.md literally: s = local + α·global; p = softmax(s); K = top-k(p); p̃ = p_K / Σ p_K."""
    p = torch.softmax(local + alpha * glob, dim=-1)
    top, idx = torch.topk(p, k, dim=-1)
    return torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def test_combine_is_glider_formula():
    gen = torch.Generator().manual_seed(2)
    local = torch.randn(50, 6, generator=gen)
    glob = torch.rand(6, generator=gen)
    for alpha in (0.0, 0.5, 3.0):
        for k in (1, 2, 3):
            w = combine(local, glob, alpha, k)
            assert torch.allclose(w, _combine_as_written(local, glob, alpha, k), atol=1e-6)
            assert torch.allclose(w.sum(-1), torch.ones(50))
            assert ((w > 0).sum(-1) == k).all()
    assert torch.equal(combine(local, glob, 0.0, 2), combine(local, None, 0.0, 2))  # α = 0: local only
    # Arrow as in PEFT: top-k on the logits, then softmax over the kept ones == the same combine
    top, idx = torch.topk(local, 3, dim=-1)
    peft = torch.zeros_like(local).scatter(-1, idx, torch.softmax(top, dim=-1))
    assert torch.allclose(combine(local, None, 0.0, 3), peft, atol=1e-6)
    # one global score row per request, broadcast over its tokens
    per_request = combine(local.view(5, 10, 6), torch.rand(5, 1, 6, generator=gen), 1.0, 2)
    assert per_request.shape == (5, 10, 6)


def test_combine_large_alpha_is_global_top_k_and_mask():
    gen = torch.Generator().manual_seed(3)
    local = torch.randn(40, 5, generator=gen) * 5
    glob = torch.tensor([0.20, 0.55, 0.10, 0.50, 0.30])
    idx, w = select(local, glob, 1e4, 2)
    assert (idx[:, 0] == 1).all() and (idx[:, 1] == 3).all()  # the global top-2, best first, for every token
    assert torch.allclose(w[:, 0], torch.ones(40))  # and the global top-1 takes all the weight
    idx, w = select(local, glob, 1e4, 3)
    assert set(idx[0].tolist()) == {1, 3, 4}
    assert torch.equal(combine(local, glob, 1e4, 1), F.one_hot(torch.full((40,), 1), 5).float())
    # k = 1 with one candidate: weight 1 whatever the logits
    assert torch.equal(combine(torch.randn(7, 1), None, 0.0, 1), torch.ones(7, 1))
    assert torch.equal(combine(torch.randn(7, 1), None, 0.0, 2), torch.ones(7, 1))  # k clipped to E
    # masked experts are never chosen; a fully masked row gets no weight
    mask = torch.tensor([True, False, True, False, True])
    w = combine(local, glob, 1e4, 2, mask=mask)
    assert (w[:, 1] == 0).all() and (w[:, 3] == 0).all() and torch.allclose(w.sum(-1), torch.ones(40))
    assert torch.equal(combine(local, None, 0.0, 2, mask=torch.zeros(5, dtype=torch.bool)), torch.zeros(40, 5))


# ---------------------------------------------------------------- gate files


def _expert(root: Path, name: str, shape, seed: int, *, rank: int = 4, targets=DEFAULT_TARGETS,
            strength: float = 0.05) -> Path:
    return write_random_lora(root / name, shape=shape, base_name=BASE, seed=seed, rank=rank, alpha=8,
                             targets=tuple(targets), strength=strength,
                             card=ExpertCard(name=name, description=f"random expert {name}"))


def _random_phatgoose(expert: Path, seed: int) -> dict[str, torch.Tensor]:
    factors, _ = load_lora(expert)
    gen = torch.Generator().manual_seed(seed)
    gates = {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in factors.items()}
    write_gates(expert, "phatgoose", gates, {"method": "random (test)"})
    return gates


def test_gate_file_round_trip(tmp_path, shape):
    expert = _expert(tmp_path, "e0", shape, 0, targets=("q_proj", "down_proj"))
    assert not has_gates(expert, "arrow") and read_gates(expert, "arrow") == {}
    arrow = compute_arrow_gates(expert)
    factors, _ = load_lora(expert)
    assert set(arrow) == set(factors) and len(arrow) == 2 * shape.num_layers
    assert "arrow.base_model.model.model.layers.0.self_attn.q_proj" in load_file(str(expert / GATES_FILE))
    assert has_gates(expert, "arrow") and not has_gates(expert, "phatgoose")
    pg = _random_phatgoose(expert, 1)
    back_arrow, back_pg = read_gates(expert, "arrow"), read_gates(expert, "phatgoose")  # arrow kept
    assert all(torch.equal(back_arrow[m], arrow[m]) for m in arrow)
    assert all(torch.equal(back_pg[m], pg[m]) and back_pg[m].dtype == torch.float32 for m in pg)
    assert has_gates(expert, "arrow") and has_gates(expert, "phatgoose")
    assert gates_info(expert, "phatgoose") == {"method": "random (test)"}
    assert not list(expert.glob(f".{GATES_FILE}.tmp*"))  # atomic write left no temp file


def test_gates_stored_in_bf16_read_back_as_float32(tmp_path, shape):
    expert = _expert(tmp_path, "e0", shape, 0, targets=("q_proj",))
    arrow = compute_arrow_gates(expert, dtype=torch.bfloat16)
    pg = _random_phatgoose(expert, 1)  # float32, beside the bf16 arrow keys
    stored = load_file(str(expert / GATES_FILE))
    assert {v.dtype for k, v in stored.items() if k.startswith("arrow.")} == {torch.bfloat16}
    assert {v.dtype for k, v in stored.items() if k.startswith("phatgoose.")} == {torch.float32}
    back = read_gates(expert, "arrow")
    assert all(back[m].dtype == torch.float32 and torch.equal(back[m], arrow[m].bfloat16().float()) for m in arrow)
    assert all(torch.equal(read_gates(expert, "phatgoose")[m], pg[m]) for m in pg)
    assert has_gates(expert, "arrow")
    with pytest.raises(ValueError, match="stored as one of"):
        write_gates(expert, "arrow", arrow, dtype=torch.float16)
    # new adapter weights: the stored gates are stale and read as missing
    tensors = load_file(str(expert / WEIGHTS_FILE))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(expert / WEIGHTS_FILE), metadata={"format": "pt"})
    assert not has_gates(expert, "arrow") and not has_gates(expert, "phatgoose")


# ---------------------------------------------------------------- the reference mixture on the real model


@pytest.fixture(scope="module")
def base(base_model_dir):
    return load_base(base_model_dir, device="cpu")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, shape):
    """Three random experts: different ranks, e2 only on attention q/v (masked elsewhere); all with gates."""
    root = tmp_path_factory.mktemp("gating-pool")
    experts = [_expert(root, "e0", shape, 10), _expert(root, "e1", shape, 11, rank=8),
               _expert(root, "e2", shape, 12, targets=("q_proj", "v_proj"))]
    for i, e in enumerate(experts):
        compute_arrow_gates(e)
        _random_phatgoose(e, 100 + i)
    return experts


@pytest.fixture(scope="module")
def batch(base):
    _, tokenizer = base
    texts = [_chat_prompt(tokenizer, p) for p in PROMPTS]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _mixture_logits(base, experts, mode, batch, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and each layer's routing weights; the base model is restored afterwards."""
    model, _ = base
    mixture = build_mixture_model(model, experts, mode, **kw)
    try:
        mixture.set_routing(record=True)
        logits = mixture.logits(batch["input_ids"], batch["attention_mask"])
        weights = {m: layer.last_weights for m, layer in mixture.layers.items()}
    finally:
        mixture.restore()
    assert not any(isinstance(m, MixtureOfLoRALinear) for m in model.modules())
    return logits, weights


def _valid(logits, batch):
    return logits[batch["attention_mask"].bool()]  # right padding: compare real tokens only


@pytest.fixture(scope="module")
def peft_reference(base, pool, batch):
    """The plain base model and expert e1 served by PEFT: logits on PROMPTS, and e1's greedy answers."""
    from peft import PeftModel

    from training.lora import generate_answers

    model, tokenizer = base
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(pool[1])).eval()
    with torch.no_grad():
        plain, want = model(**batch).logits, peft_model(**batch).logits
    answers = generate_answers(peft_model, tokenizer, PROMPTS, max_new_tokens=6)
    return plain, want, answers


@pytest.mark.parametrize("mode", ["arrow", "phatgoose", "glider"])
def test_one_candidate_k1_equals_that_expert_in_peft(base, pool, batch, peft_reference, mode):
    model, tokenizer = base
    plain, want, answers = peft_reference
    mixed, weights = _mixture_logits(base, [pool[1]], mode, batch, top_k=1, global_scores=[0.3], alpha=100.0)
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights.values())
    diff = float((_valid(mixed, batch) - _valid(want, batch)).abs().max())
    assert diff < LOGIT_ATOL, diff
    assert float((_valid(plain, batch) - _valid(want, batch)).abs().max()) > 100 * LOGIT_ATOL  # the LoRA matters
    if mode == "phatgoose":  # greedy generation agrees too
        mixture = build_mixture_model(model, [pool[1]], mode, top_k=1)
        try:
            assert mixture.generate(tokenizer, PROMPTS, max_new_tokens=6) == answers
        finally:
            mixture.restore()


def test_arrow_routing_is_invariant_to_flipping_A_and_B(base, pool, batch, tmp_path, shape):
    flipped = tmp_path / "e1"
    flipped.mkdir()
    (flipped / CONFIG_FILE).write_text((pool[1] / CONFIG_FILE).read_text())
    save_file({k: -v for k, v in load_file(str(pool[1] / WEIGHTS_FILE)).items()}, str(flipped / WEIGHTS_FILE))
    compute_arrow_gates(flipped)
    # only A flipped: ΔW changes sign; Arrow's |u·p| routes the same, but the output differs
    only_a = tmp_path / "e1a"
    only_a.mkdir()
    (only_a / CONFIG_FILE).write_text((pool[1] / CONFIG_FILE).read_text())
    save_file({k: -v if ".lora_A." in k else v for k, v in load_file(str(pool[1] / WEIGHTS_FILE)).items()},
              str(only_a / WEIGHTS_FILE))  # no gates file: the mixture computes the prototypes itself

    ref, ref_w = _mixture_logits(base, pool, "arrow", batch, top_k=2)
    got, got_w = _mixture_logits(base, [pool[0], flipped, pool[2]], "arrow", batch, top_k=2)
    assert torch.allclose(_valid(got, batch), _valid(ref, batch), atol=1e-4)
    assert all(torch.allclose(got_w[m], ref_w[m], atol=1e-5) for m in ref_w)
    half, half_w = _mixture_logits(base, [pool[0], only_a, pool[2]], "arrow", batch, top_k=2)
    first = [f"base_model.model.model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.allclose(half_w[m], ref_w[m], atol=1e-5) for m in first)  # same inputs u, same routing
    assert float((_valid(half, batch) - _valid(ref, batch)).abs().max()) > 1e-2
    # the routing really is per token: where all 3 experts have a LoRA, tokens of one prompt differ in their picks
    varied = [m for m, w in ref_w.items() if "q_proj" in m and len({tuple((row > 0).tolist()) for row in w[0]}) > 1]
    assert len(varied) > shape.num_layers // 2, varied
    assert all(((w > 0).sum(-1) <= 2).all() for w in ref_w.values())  # a kept weight may underflow to 0


def test_alpha_zero_equals_phatgoose_and_alpha_matters(base, pool, batch):
    glob = torch.tensor([0.1, 0.6, 0.3])
    pg, pg_w = _mixture_logits(base, pool, "phatgoose", batch, top_k=2)
    g0, g0_w = _mixture_logits(base, pool, "glider", batch, top_k=2, global_scores=glob, alpha=0.0)
    assert torch.equal(g0, pg) and all(torch.equal(g0_w[m], pg_w[m]) for m in pg_w)
    g3, _ = _mixture_logits(base, pool, "glider", batch, top_k=2, global_scores=glob, alpha=3.0)
    assert float((g3 - pg).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["glider", "arrow"])
def test_very_large_alpha_equals_global_top_k(base, pool, batch, mode):
    glob = torch.tensor([0.1, 0.3, 0.6])  # global top-2: e2 then e1
    big, big_w = _mixture_logits(base, pool, mode, batch, top_k=2, global_scores=glob, alpha=1e4)
    only, _ = _mixture_logits(base, [pool[2]], mode, batch, top_k=1)
    fallback, _ = _mixture_logits(base, [pool[1]], mode, batch, top_k=1)
    # where the global top-1 (e2) has a LoRA, it alone answers; elsewhere (masked) the global top-2 (e1) does
    for m, w in big_w.items():
        expected = 2 if "q_proj" in m or "v_proj" in m else 1
        assert torch.equal(w.argmax(-1), torch.full(w.shape[:-1], expected)), m
        assert torch.allclose(w.amax(-1), torch.ones(w.shape[:-1])), m
    mixed, _ = _mixture_logits(base, [pool[2], pool[1]], mode, batch, top_k=1, global_scores=[1.0, 0.0],
                               alpha=1e4)
    assert torch.allclose(_valid(big, batch), _valid(mixed, batch), atol=1e-4)
    assert float((_valid(big, batch) - _valid(only, batch)).abs().max()) > 1e-2  # e1 fills e2's gaps
    assert float((_valid(big, batch) - _valid(fallback, batch)).abs().max()) > 1e-2


def test_per_sequence_global_scores_match_one_request_at_a_time(base, pool, batch):
    glob = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.3, 0.3, 0.3]])
    together, _ = _mixture_logits(base, pool, "glider", batch, global_scores=glob, alpha=5.0)
    for i in range(len(PROMPTS)):
        n = int(batch["attention_mask"][i].sum())
        one = {k: v[i : i + 1, :n] for k, v in batch.items()}
        alone, _ = _mixture_logits(base, pool, "glider", one, global_scores=glob[i], alpha=5.0)
        assert torch.allclose(together[i, :n], alone[0], atol=1e-4)


# ---------------------------------------------------------------- PHATGOOSE gate training and the CLI


def test_phatgoose_training_changes_and_writes_gates(base, tmp_path, shape):
    model, _ = base
    expert = _expert(tmp_path, "tiny", shape, 20, targets=("q_proj", "v_proj"), strength=0.2)
    compute_arrow_gates(expert)
    arrow_before = read_gates(expert, "arrow")
    lines: list[str] = []
    examples = get_task("arithmetic").generate("train", 8, 0)
    summary = train_phatgoose_gates(expert, examples=examples, steps=3, batch_size=4, base=base,
                                    progress=lines.append)
    gates = read_gates(expert, "phatgoose")
    factors, _ = load_lora(expert)
    assert set(gates) == set(factors)
    assert all(float(v.abs().max()) > 0 for v in gates.values())  # moved away from the zero init
    assert all(torch.equal(gates[m], summary["gates"][m]) for m in gates)
    assert all(torch.equal(read_gates(expert, "arrow")[m], arrow_before[m]) for m in arrow_before)  # kept
    assert has_gates(expert, "phatgoose") and has_gates(expert, "arrow")
    assert math.isfinite(summary["final_loss"]) and summary["recipe"]["lr"] == 5e-3
    assert any("gates step 3/3 loss" in line and "ETA" in line for line in lines)
    # the base model is left as it was: plain linears, parameters' requires_grad untouched
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())


def test_cli_train_gates(tmp_path, shape, capsys):
    from cli import main

    _expert(tmp_path, "arithmetic", shape, 30, targets=("v_proj",))
    args = ["train-gates", "--library", str(tmp_path), "--steps", "1", "--batch-size", "2"]
    assert main(args + ["arithmetic"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["expert"] == "arithmetic" and summary["task"] == "arithmetic"
    assert has_gates(tmp_path / "arithmetic", "arrow") and has_gates(tmp_path / "arithmetic", "phatgoose")
    # stored as the default library is: bf16 (the recipe says so); read back as float32
    assert {v.dtype for v in load_file(str(tmp_path / "arithmetic" / GATES_FILE)).values()} == {torch.bfloat16}
    assert gates_info(tmp_path / "arithmetic", "phatgoose")["saved_dtype"] == "bfloat16"
    assert main(args + ["--all"]) == 0
    assert "already trained; skipping" in capsys.readouterr().out
    assert main(args + ["nope"]) == 2
