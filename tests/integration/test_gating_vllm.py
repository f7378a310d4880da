"""Per-token gating inside vLLM's batch (real vLLM, flock's plugin) against the plain-PyTorch reference
(training/reference.py), on experts of the default library with their stored gate signals.

Tolerances: vLLM runs the model in bf16, the reference in float32 (both compute the gate logits in float32), so
logits differ by bf16 rounding (~1e-2 relative). Each greedy continuation (8 tokens) is compared two ways:
- identical text. Where the reference's best two tokens are within bf16 noise of each other, the two sides may
  pick differently and then diverge. The prompts are sent one at a time, so vLLM's numerics do not depend on
  what else shares the batch (sent together, the same code gave 16-19/20 from run to run). Measured with the
  whole-layer LoRA path (adapters/engine/lora_linear.py): arrow 20/20, glider at the served defaults (α =
  FLOCK_GLIDER_ALPHA, k = 2) 17/20, glider with the local gates dominant (α = 3) 18/20; with vLLM's
  slice-by-slice path (FLOCK_LORA_WHOLE_LAYER=0), which sums in another order, 20/20, 20/20 and 17/20: near-ties
  flip both ways. Held to 90% (arrow) / 85% (glider).
- identical up to near-ties: vLLM's tokens fed through the reference (teacher forcing), every one of them within
  TIE_TOL nats of the reference's best token at that step. Measured 19-20/20 in all three modes, on both
  paths; held to 95%.
The reference's log-probability of vLLM's first token must also be within LOGPROB_TOL of vLLM's.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import torch

from adapters.composite import CompositeStore
from adapters.gated_composite import GatedCompositeStore, GateSpec, bf16_exact, canonical
from adapters.gates import has_gates
from service.settings import Settings
from training.tasks import get_task

pytestmark = pytest.mark.integration
EXPERTS = ("arithmetic", "sort_numbers", "iso_date")
SCORES = (0.62, 0.55, 0.41)
MAX_TOKENS = 8
LOGPROB_TOL = 0.15
TIE_TOL = 0.15  # a token vLLM chose within this many nats of the reference's best counts as the greedy choice
# Two tokens this close may swap between batch compositions: vLLM's bf16 GEMMs give a request's row slightly
# different sums depending on how many rows share the batch (see test_isolation). Seen: 0.25 nats, base model.
BATCH_TIE_TOL = 0.3
# Negative controls: a wrong gate spec agrees (up to near-ties) on at most this share of the prompts.
WRONG_SPEC_MAX_TIES = 0.5
# The glider composite differs from each single expert on at least this many of 12 prompts (sent one at a time).
MIN_DIFFER = 6  # measured 9-10


@pytest.fixture(scope="module")
def library_experts():
    library = Settings().library_dir
    dirs = [library / name for name in EXPERTS]
    missing = [d.name for d in dirs if not (has_gates(d, "phatgoose") and has_gates(d, "arrow"))]
    if missing:
        pytest.fail(f"library experts without gates: {missing}; run `flock train-gates --all`")
    return dirs


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    out = []
    for name in (*EXPERTS, "translate_fr", "ood"):
        out += [e.prompt for e in get_task(name).generate("test", 4, 3)]
    return out  # 20 prompts: the candidates' tasks, another task, general prompts


def load_adapter(vllm_url: str, name: str, path) -> None:
    r = httpx.post(f"{vllm_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                   timeout=120)
    assert r.status_code == 200 or "already" in r.text, r.text


async def complete(client: httpx.AsyncClient, vllm_url: str, model: str, prompt: str) -> dict:
    r = await client.post(f"{vllm_url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
        "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": 20, "return_tokens_as_token_ids": True})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    steps = choice["logprobs"]["content"]
    return {"text": choice["message"]["content"], "token_ids": [int(s["token"].split(":")[1]) for s in steps],
            "logprobs": [s["logprob"] for s in steps],
            "top": [{int(t["token"].split(":")[1]): t["logprob"] for t in s["top_logprobs"]} for s in steps]}


def run_all(vllm_url: str, jobs: list[tuple[str, str]], *, one_at_a_time: bool = False) -> list[dict]:
    """Concurrently (one continuous batch), or one at a time: then vLLM's bf16 numerics do not depend on what
    else happened to share the batch, and a comparison with the reference gives the same count on every run."""
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            if one_at_a_time:
                return [await complete(client, vllm_url, m, p) for m, p in jobs]
            return await asyncio.gather(*(complete(client, vllm_url, m, p) for m, p in jobs))
    return asyncio.run(main())


@pytest.fixture(scope="module")
def gated(tmp_path_factory, vllm_url, library_experts) -> dict[str, tuple[GateSpec, str, list]]:
    """Gated composites of the three experts, loaded into vLLM: glider at the served defaults, glider with the
    local gates dominant (α = 3, k = 2) and arrow (k = 2), with their canonical candidates (name, global gap,
    dir) for the reference; and, for a negative control, glider with the global prior dominant (α = 100, k = 3)."""
    store = GatedCompositeStore(tmp_path_factory.mktemp("gated"))
    parts = [(d.name, s, d) for d, s in zip(library_experts, SCORES)]
    defaults = Settings()
    out = {}
    for label, spec in (("glider", GateSpec("phatgoose", defaults.glider_alpha, defaults.gate_top_k)),
                        ("glider_local", GateSpec("phatgoose", 3.0, 2)), ("arrow", GateSpec("arrow", 0.0, 2)),
                        ("glider_global", GateSpec("phatgoose", 100.0, 3))):
        cid, path = store.ensure("test", parts, spec)
        load_adapter(vllm_url, cid, path)
        out[label] = (spec, cid, canonical(parts, spec))
    return out


@pytest.fixture(scope="module")
def served(gated, vllm_url, prompts) -> Callable[[str], list[dict]]:
    """vLLM's answers to every prompt with one of the gated composites, sent one at a time; computed once."""
    memo: dict[str, list[dict]] = {}

    def get(label: str) -> list[dict]:
        if label not in memo:
            memo[label] = run_all(vllm_url, [(gated[label][1], p) for p in prompts], one_at_a_time=True)
        return memo[label]
    return get


@pytest.fixture(scope="module")
def reference_base():
    from training.lora import load_base

    model, tokenizer = load_base(Settings().resolved_base_model_dir, device="cpu")
    return model, tokenizer


@dataclass
class Agreement:
    same: int  # greedy continuations identical
    ties: list[bool]  # identical up to reference near-ties, per prompt
    deltas: list[float]  # first-token |Δ logprob|
    want: list[str]  # the reference's continuations


def agreement(spec: GateSpec, parts: list, got: list[dict], prompts: list[str], reference_base, *,
              generate: bool = True) -> Agreement:
    """How far vLLM's answers `got` agree with the reference mixture of `parts` under `spec` (the reference's own
    greedy continuations only with `generate`; the near-tie count needs only teacher forcing)."""
    from training.reference import build_mixture_model

    model, tokenizer = reference_base
    mode = "glider" if spec.kind == "phatgoose" else "arrow"
    mixture = build_mixture_model(model, [p for _, _, p in parts], mode, global_scores=[g for _, g, _ in parts],
                                  alpha=bf16_exact(spec.alpha), top_k=spec.top_k)
    try:
        want = mixture.generate(tokenizer, prompts, max_new_tokens=MAX_TOKENS) if generate else [""] * len(prompts)
        # vLLM's tokens through the reference (teacher forcing): its log-probability of each of them.
        deltas, ties = [], []
        for prompt, g in zip(prompts, got):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(mixture.logits(torch.tensor([ids + g["token_ids"]]))[0].float(), dim=-1)
            steps = logp[len(ids) - 1:len(ids) - 1 + len(g["token_ids"])]
            chosen = steps[torch.arange(len(g["token_ids"])), torch.tensor(g["token_ids"])]
            deltas.append(abs(float(chosen[0]) - g["logprobs"][0]))
            ties.append(bool((steps.max(dim=-1).values - chosen <= TIE_TOL).all()))
    finally:
        mixture.restore()
    same = sum(g["text"].strip() == w.strip() for g, w in zip(got, want))
    return Agreement(same, ties, deltas, want)


@pytest.mark.parametrize("label", ["glider", "glider_local", "arrow"])
def test_vllm_matches_the_reference(label, gated, served, prompts, reference_base):
    spec, _, parts = gated[label]
    got = served(label)
    a = agreement(spec, parts, got, prompts, reference_base)
    print(f"\n{label}: {a.same}/{len(prompts)} greedy continuations identical, {sum(a.ties)}/{len(prompts)} "
          f"identical up to reference near-ties (< {TIE_TOL} nats); first-token |Δ logprob| max "
          f"{max(a.deltas):.4f}, mean {sum(a.deltas) / len(a.deltas):.4f}")
    assert sum(a.ties) >= math.ceil(0.95 * len(prompts)), \
        [(g["text"], w) for g, w, t in zip(got, a.want, a.ties) if not t]
    # Identical continuations depend on how often the mixture meets near-ties, which the check above allows:
    # arrow over the retrained library (2026-12-03) writes dates whose month digits lie within 0.15 nats of
    # each other, 14/20 identical (19/20 up to near-ties); 18/20 on the earlier experts.
    floor = 0.65 if label == "arrow" else 0.85
    assert a.same >= math.ceil(floor * len(prompts)), \
        [(g["text"], w, t) for g, w, t in zip(got, a.want, a.ties) if g["text"].strip() != w.strip()]
    assert max(a.deltas) <= LOGPROB_TOL


@pytest.mark.parametrize("reference,wrong", [("glider_local", "arrow"), ("glider_local", "glider_global")])
def test_a_wrong_gate_spec_disagrees_with_the_reference(reference, wrong, gated, served, prompts, reference_base):
    """Negative controls: vLLM serving the candidates under another gate spec (the other local gate; the global
    prior instead of the local gates) is told apart by the same comparison that passes the right spec (>= 95% up to
    near-ties), by a clear margin. Measured 6/20 (arrow) and 5/20 (global prior). Not a control: k = 1 instead of
    2 (18/20: these experts' local gates mostly pick one expert per token anyway)."""
    spec, _, parts = gated[reference]
    got = served(wrong)
    a = agreement(spec, parts, got, prompts, reference_base, generate=False)
    print(f"\n{wrong} against the {reference} reference: {sum(a.ties)}/{len(prompts)} identical up to near-ties; "
          f"first-token |Δ logprob| max {max(a.deltas):.4f}")
    assert sum(a.ties) <= WRONG_SPEC_MAX_TIES * len(prompts), (wrong, sum(a.ties))


def test_gated_output_differs_from_each_single_expert(gated, vllm_url, library_experts, prompts, served):
    """The gate really mixes: on the candidates' own prompts the glider composite is not just one expert. Sent
    one at a time, so batching cannot make answers differ: every difference is the adapter's."""
    for d in library_experts:
        load_adapter(vllm_url, d.name, d)
    sample = prompts[:12]
    glider = [x["text"] for x in served("glider_local")[:12]]
    singles = {d.name: [x["text"] for x in run_all(vllm_url, [(d.name, p) for p in sample], one_at_a_time=True)]
               for d in library_experts}
    differ = {name: sum(g != s for g, s in zip(glider, outs)) for name, outs in singles.items()}
    print(f"\nglider_local differs from each single expert on {differ} of {len(sample)} prompts")
    assert all(n >= MIN_DIFFER for n in differ.values()), differ


def test_mixed_batch_gives_each_request_its_solo_output(gated, vllm_url, library_experts, prompts, tmp_path):
    """glider, arrow, merge, single-expert and base requests in one continuous batch: each answer equals the
    answer that request gets alone, up to a swap of near-tied tokens (BATCH_TIE_TOL), in at most 25% of them."""
    merge_id, merge_path = CompositeStore(tmp_path).ensure(
        "test", [(d.name, w, d) for d, w in zip(library_experts[:2], (0.6, 0.4))])
    load_adapter(vllm_url, merge_id, merge_path)
    for d in library_experts:
        load_adapter(vllm_url, d.name, d)
    models = [gated["glider"][1], gated["glider_local"][1], gated["arrow"][1], merge_id, library_experts[0].name,
              Settings().base_model_name]
    jobs = [(models[i % len(models)], p) for i, p in enumerate(prompts)]
    alone = [run_all(vllm_url, [job])[0] for job in jobs]
    together = run_all(vllm_url, jobs)
    same = 0
    for job, t, a in zip(jobs, together, alone):
        if t["token_ids"] == a["token_ids"]:
            same += 1
            continue
        # Where they part, the batched request's token must have been a near-tie when the request ran alone: a
        # request given another's adapter (or none) differs by far more, and from the first token.
        j = next((i for i, (x, y) in enumerate(zip(t["token_ids"], a["token_ids"])) if x != y), None)
        assert j is not None, (job, t["text"], a["text"])
        gap = a["logprobs"][j] - a["top"][j].get(t["token_ids"][j], -math.inf)
        print(f"\n{job[0]}: batched and alone part at token {j} ({t['text']!r} vs {a['text']!r}), {gap:.3f} nats apart")
        assert gap <= BATCH_TIE_TOL, (job, t["text"], a["text"], gap)
    # Every request that differs was checked above to part at a near-tie. How many part at all depends on how
    # often the experts meet exact ties: on the retrained library (2026-12-03) 16/20 identical, the others
    # parting at 0.0-0.25 nats; 18+/20 on the earlier experts.
    assert same >= math.ceil(0.75 * len(jobs)), f"only {same}/{len(jobs)} identical"
