"""The whole-layer path rebuilds only the slots vLLM wrote (adapters/engine/lora_linear.py, `slot_written`): the
result must equal a full rebuild's, and a write nobody logged must still be seen (a full rebuild then)."""

from __future__ import annotations

import torch
from vllm.lora import model_manager

from adapters.engine import lora_linear
from adapters.engine import plugin as vllm_plugin
from adapters.gated_composite import GateSpec, build_gated, canonical
from tests.unit.test_gated_composite import D_IN, D_OUT, MAX_RANK, MODULE, write_expert

SLOTS = 5


def buffers():
    """One layer's stacked buffers as vLLM allocates them: two slices (q, v), `SLOTS` slots, rank-padded, bf16."""
    a = tuple(torch.zeros(SLOTS, 1, MAX_RANK, D_IN, dtype=torch.bfloat16) for _ in range(2))
    b = tuple(torch.zeros(SLOTS, 1, D_OUT, MAX_RANK, dtype=torch.bfloat16) for _ in range(2))
    return a, b


def write(a, b, slot: int, factors) -> None:
    """vLLM's set_lora / reset_lora: the slot zeroed, then each slice's factors copied in (None: no LoRA there)."""
    for i, pair in enumerate(factors):
        a[i][slot] = 0
        b[i][slot] = 0
        if pair is not None:
            la, lb = pair
            a[i][slot, 0, :la.shape[0]] = la
            b[i][slot, 0, :, :lb.shape[1]] = lb


def plain(seed: int, ranks=(4, 2)):
    gen = torch.Generator().manual_seed(seed)
    return [None if r == 0 else ((torch.randn(r, D_IN, generator=gen) / 8).to(torch.bfloat16),
                                 (torch.randn(D_OUT, r, generator=gen) / 2).to(torch.bfloat16)) for r in ranks]


def logged_write(a, b, slot: int, factors) -> None:
    tensors = [*a, *b]
    before = lora_linear.versions(tensors)
    write(a, b, slot, factors)
    lora_linear.slot_written(before, tensors, slot)


def assert_same(got: lora_linear.LayerWeights, want: lora_linear.LayerWeights) -> None:
    assert got.a.keys() == want.a.keys() and got.b.keys() == want.b.keys()
    assert all(torch.equal(got.a[s], want.a[s]) and torch.equal(got.b[s], want.b[s]) for s in want.a)
    for name in ("a_all", "b_all", "column_slot"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.layout, got.ranks, got.outs, got.unsupported) == (want.layout, want.ranks, want.outs, want.unsupported)
    assert got.gated.keys() == want.gated.keys()
    for s, g in want.gated.items():
        assert torch.equal(got.gated[s].a, g.a) and torch.equal(got.gated[s].b, g.b)
        assert torch.equal(got.gated[s].rows, g.rows) and torch.equal(got.gated[s].bias, g.bias)
    for x, y in zip(got.kernel_weights, want.kernel_weights):
        assert torch.equal(x, y)


def full_rebuild(a, b) -> lora_linear.LayerWeights:
    """What the layer's weights are when built from scratch (copies: fresh buffers, no history)."""
    lora_linear.clear_caches()
    return lora_linear.layer_weights(tuple(t.clone() for t in a), tuple(t.clone() for t in b), torch.bfloat16)


def gated_factors(tmp_path):
    experts = [write_expert(tmp_path / f"e{i}", seed=i) for i in range(3)]
    parts = canonical([(p.name, s, p) for p, s in zip(experts, [0.61, 0.55, 0.32])], GateSpec("phatgoose", 3.0, 2))
    tensors, _ = build_gated(parts, GateSpec("phatgoose", 3.0, 2))
    return [(tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"])
            for m in (MODULE, MODULE.replace("q_proj", "v_proj"))]


def test_logged_writes_rebuild_only_those_slots_and_match_a_full_rebuild(tmp_path, monkeypatch):
    lora_linear.clear_caches()
    a, b = buffers()
    for slot in range(SLOTS - 1):  # the last slot stays empty
        write(a, b, slot, plain(slot, ranks=(slot + 1, 3 - slot % 3)))
    assert lora_linear.layer_weights(a, b, torch.bfloat16).kernel_weights  # built once from scratch, kernel too
    built = []
    real_slot = lora_linear._slot
    monkeypatch.setattr(lora_linear, "_slot", lambda a3, b3, s, outs, dtype: built.append(s) or real_slot(
        a3, b3, s, outs, dtype))
    gated = gated_factors(tmp_path)
    patched: list[bool] = []
    steps = [(2, plain(10, ranks=(8, 0))),  # another adapter, on one slice only
             (4, plain(11)),  # into the empty slot
             (0, gated),  # a gated composite replaces a plain adapter
             (1, [None, None]),  # an adapter with nothing on this layer
             (0, plain(12)),  # and back to a plain adapter
             (3, plain(13))]
    for slot, factors in steps:
        built.clear()
        logged_write(a, b, slot, factors)
        got = lora_linear.layer_weights(a, b, torch.bfloat16)
        assert built == [slot], "only the written slot is read again"
        patched.append("kernel_weights" in got.__dict__)  # the kernel's matrices patched, not made anew
        monkeypatch.setattr(lora_linear, "_slot", real_slot)
        assert_same(got, full_rebuild(a, b))
        assert lora_linear.layer_weights(a, b, torch.bfloat16).kernel_weights  # history starts again here
        monkeypatch.setattr(lora_linear, "_slot", lambda a3, b3, s, outs, dtype: built.append(s) or real_slot(
            a3, b3, s, outs, dtype))
    assert any(patched) and not all(patched), "patched where the shape held, made anew where a rank grew"


def test_two_writes_before_a_forward_and_an_unlogged_write(monkeypatch):
    lora_linear.clear_caches()
    a, b = buffers()
    for slot in range(SLOTS):
        write(a, b, slot, plain(slot))
    lora_linear.layer_weights(a, b, torch.bfloat16)
    logged_write(a, b, 1, plain(20))
    logged_write(a, b, 3, plain(21, ranks=(1, 6)))
    built = []
    real_slot = lora_linear._slot
    monkeypatch.setattr(lora_linear, "_slot", lambda a3, b3, s, outs, dtype: built.append(s) or real_slot(
        a3, b3, s, outs, dtype))
    got = lora_linear.layer_weights(a, b, torch.bfloat16)
    assert sorted(built) == [1, 3]
    lora_linear.layer_weights(a, b, torch.bfloat16)
    built.clear()
    write(a, b, 2, plain(22))  # not through activate_adapter: no log
    after = lora_linear.layer_weights(a, b, torch.bfloat16)
    assert sorted(built) == list(range(SLOTS)), "an unexplained write means a full rebuild"
    monkeypatch.setattr(lora_linear, "_slot", real_slot)
    assert_same(after, full_rebuild(a, b))
    assert not torch.equal(got.a[2], after.a[2])


class Layer:
    """A LoRA module as vLLM's manager drives it (set_lora / reset_lora on stacked buffers)."""

    def __init__(self):
        self.lora_a_stacked, self.lora_b_stacked = buffers()

    def reset_lora(self, index: int) -> None:
        write(self.lora_a_stacked, self.lora_b_stacked, index, [None, None])

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        write(self.lora_a_stacked, self.lora_b_stacked, index, list(zip(lora_a, lora_b)))


def test_the_plugin_logs_what_vllms_activate_adapter_writes(monkeypatch):
    """vLLM's own LoRAModelManager.activate_adapter (unpatched code, wrapped by the plugin) on two modules: the
    log names the slot it chose, and the layer rebuilt from the log equals a full rebuild."""
    monkeypatch.setattr(model_manager.LoRAModelManager, "activate_adapter",
                        model_manager.LoRAModelManager.activate_adapter)  # restored after the test
    vllm_plugin._log_slot_writes()
    assert model_manager.LoRAModelManager.activate_adapter.flock_writes
    lora_linear.clear_caches()
    weights = {7: plain(7), 8: plain(8, ranks=(2, 5))}

    class Lora:
        def __init__(self, lora_id):
            self.id = lora_id

        def get_lora(self, name):
            if name != "q":  # the adapter has nothing on module "o"
                return None
            factors = weights[self.id]
            return type("W", (), {"lora_a": [f[0] for f in factors], "lora_b": [f[1] for f in factors]})

    manager = object.__new__(model_manager.LoRAModelManager)
    manager.modules = {"q": Layer(), "o": Layer()}
    manager.lora_index_to_id = [None, None, 99, None, None]
    manager._active_adapters = {}
    manager._registered_adapters = {7: Lora(7), 8: Lora(8)}
    manager.is_pooling_model = False
    q = manager.modules["q"]
    lora_linear.layer_weights(q.lora_a_stacked, q.lora_b_stacked, torch.bfloat16)
    assert manager.activate_adapter(7) and manager.activate_adapter(8)
    assert manager.lora_index_to_id == [7, 8, 99, None, None]
    slots = {slot for log in lora_linear._writes.values() for _, _, slot in log}
    assert slots == {0, 1}
    got = lora_linear.layer_weights(q.lora_a_stacked, q.lora_b_stacked, torch.bfloat16)
    assert sorted(got.a) == [0, 1]
    assert_same(got, full_rebuild(q.lora_a_stacked, q.lora_b_stacked))
