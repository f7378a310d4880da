"""Per-slot data is prepared when vLLM sets an adapter into a slot, and only then.

Driven as vLLM drives it: vLLM's own LoRAModelManager.activate_adapter (wrapped by the plugin's hook) writes the
adapters with vLLM's own set_lora / reset_lora of a merged two-slice layer, into flock's CPU punica wrapper,
whose update_metadata and add_lora_linear then run a step. Re-setting a slot with another adapter (larger rank,
gated -> plain -> gated) or resetting it (an adapter without weights on the layer) changes the slot's data, and
the next step's output with it, on both the whole-layer path and the slice-by-slice ops.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.lora import model_manager
from vllm.lora.layers import LoRAMapping
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

from adapters.engine import plugin
from adapters.engine.gated_format import encode_header
from adapters.engine.punica_cpu import PunicaWrapperFlockCPU
from adapters.engine.slots import buffer_slots

SLOTS, D_IN, OUTS, MAX_RANK = 3, 32, (24, 16), 8


class MergedLayer:
    """A merged-column LoRA layer (two slices, as gate/up) with vLLM's own set_lora and reset_lora."""

    set_lora = MergedColumnParallelLinearWithLoRA.set_lora
    reset_lora = BaseLinearLayerWithLoRA.reset_lora

    def __init__(self, wrapper):
        self.n_slices, self.tp_size, self.punica_wrapper = 2, 1, wrapper
        self.lora_a_stacked = tuple(torch.zeros(SLOTS, 1, MAX_RANK, D_IN) for _ in OUTS)
        self.lora_b_stacked = tuple(torch.zeros(SLOTS, 1, out, MAX_RANK) for out in OUTS)


def plain(lora_id: int, rank: int):
    g = torch.Generator().manual_seed(lora_id)
    weights = SimpleNamespace(lora_a=[torch.randn(rank, D_IN, generator=g) / 4 for _ in OUTS],
                              lora_b=[torch.randn(out, rank, generator=g) for out in OUTS])
    return SimpleNamespace(id=lora_id, weights=weights, get_lora=lambda name: weights)


def gated(lora_id: int):
    """A gated composite of two rank-2 candidates (arrow, top-1): 4 block rows, 2 gate rows, the header: rank 7."""
    g = torch.Generator().manual_seed(lora_id)
    a, b = [], []
    for out in OUTS:
        rows = torch.zeros(7, D_IN)
        rows[:6] = torch.randn(6, D_IN, generator=g) / 4
        rows[6] = encode_header(D_IN, "arrow", 1, 0.0, [2, 2], [0.0, 0.0], [1.0, 1.0])
        a.append(rows)
        b.append(torch.cat([torch.randn(out, 4, generator=g), torch.zeros(out, 3)], dim=1))
    weights = SimpleNamespace(lora_a=a, lora_b=b)
    return SimpleNamespace(id=lora_id, weights=weights, get_lora=lambda name: weights)


def no_weights_here(lora_id: int):
    return SimpleNamespace(id=lora_id, weights=None, get_lora=lambda name: None)


@pytest.fixture
def engine(monkeypatch):
    """vLLM's manager (its real activate_adapter, wrapped by the plugin) over one layer and flock's wrapper."""
    return make_engine(monkeypatch, PunicaWrapperFlockCPU(64, 8, "cpu"))


def make_engine(monkeypatch, wrapper):
    monkeypatch.setattr(model_manager.LoRAModelManager, "activate_adapter",
                        model_manager.LoRAModelManager.activate_adapter)  # restored after the test
    plugin.install_slot_hook()  # (a no-op where register() ran in this process already)
    layer = MergedLayer(wrapper)
    manager = object.__new__(model_manager.LoRAModelManager)
    manager.__dict__.update(_active_adapters={}, _registered_adapters={}, lora_index_to_id=[None] * SLOTS,
                            modules={"mlp.gate_up_proj": layer}, is_pooling_model=False,
                            punica_wrapper_mapping={"language_model": wrapper})
    return SimpleNamespace(manager=manager, wrapper=wrapper, layer=layer, adapters={})


def activate(engine, adapter) -> int:
    engine.manager._registered_adapters[adapter.id] = adapter
    engine.adapters[adapter.id] = adapter
    assert model_manager.LoRAModelManager.activate_adapter(engine.manager, adapter.id)
    return engine.manager.lora_index_to_id.index(adapter.id)


def deactivate(engine, lora_id: int) -> None:
    assert model_manager.LoRAModelManager.deactivate_adapter(engine.manager, lora_id)


def step(engine, slots: list[int]):
    """One step of flock's wrapper for tokens on `slots` (-1: no adapter): (x, y, y0)."""
    ids = engine.manager.lora_index_to_id
    mapping = LoRAMapping(index_mapping=tuple(0 if s < 0 else ids[s] for s in slots), prompt_mapping=(0,))
    engine.wrapper.update_metadata(mapping, list(ids), SLOTS, 1000)
    g = torch.Generator().manual_seed(len(slots))
    x, y0 = torch.randn(len(slots), D_IN, generator=g), torch.randn(len(slots), sum(OUTS), generator=g)
    y = y0.clone()
    engine.wrapper.add_lora_linear(y, x, engine.layer.lora_a_stacked, engine.layer.lora_b_stacked, 1.0, OUTS)
    return x, y, y0


def plain_delta(engine, x: torch.Tensor, slot: int) -> torch.Tensor:
    """The delta of the plain adapter now in `slot`, from its own factors (zero for none on this layer)."""
    weights = engine.adapters[engine.manager.lora_index_to_id[slot]].weights
    if weights is None:
        return torch.zeros(x.shape[0], sum(OUTS))
    return torch.cat([(x @ a.T) @ b.T for a, b in zip(weights.lora_a, weights.lora_b)], dim=1)


def ops_delta(engine, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The first slice's delta through flock's replacement ops (vLLM's slice-by-slice path), which read the
    buffers' per-slot data."""
    idx = torch.tensor(slots)
    buffer = torch.full((x.shape[0], MAX_RANK), 9.0)
    plugin.bgmv_shrink(x, engine.layer.lora_a_stacked[0], buffer, idx, 1.0)
    out = torch.zeros(x.shape[0], OUTS[0])
    plugin.bgmv_expand(buffer, engine.layer.lora_b_stacked[0], out, idx, add_inputs=True)
    return out


def check_plain_rows(engine, slots: list[int], plain_slots: set[int]) -> None:
    x, y, y0 = step(engine, slots)
    ops = ops_delta(engine, x, slots)
    for slot in plain_slots | {-1}:
        rows = torch.tensor(slots) == slot
        want = torch.zeros(int(rows.sum()), sum(OUTS)) if slot < 0 else plain_delta(engine, x[rows], slot)
        assert torch.allclose(y[rows] - y0[rows], want, atol=1e-4), f"slot {slot}"
        assert torch.allclose(ops[rows], want[:, :OUTS[0]], atol=1e-4), f"slot {slot} (ops)"


def test_slot_data_follows_what_vllm_sets_and_resets(engine):
    a0, b1 = engine.layer.lora_a_stacked[0], engine.layer.lora_b_stacked[1]
    assert [activate(engine, ad) for ad in (plain(1, 3), gated(2), plain(3, 5))] == [0, 1, 2]
    layer = engine.wrapper.layers[id(engine.layer.lora_a_stacked)]
    assert buffer_slots(a0, "a").ranks == [3, 7, 5] and set(buffer_slots(a0, "a").gates) == {1}
    assert buffer_slots(b1, "b").ranks == [3, 4, 5]  # a composite's gate rows and header have no B
    assert set(layer.plain) == {0, 2} and set(layer.gated) == {1} and layer.weights.layout == ((0, 6), (2, 10))
    slots = [0, 2, -1, 1, 0, 2, 1]
    check_plain_rows(engine, slots, {0, 2})

    # slot 1 re-set: the gated composite out, a plain adapter of a larger rank (8) in
    deactivate(engine, 2)
    assert activate(engine, plain(4, 8)) == 1
    assert buffer_slots(a0, "a").ranks == [3, 8, 5] and buffer_slots(a0, "a").gates == {}
    assert buffer_slots(b1, "b").ranks == [3, 8, 5]
    assert layer.gated == {} and layer.plain[1].ranks == (8, 8) and layer.weights.layout == ((0, 6), (1, 16), (2, 10))
    check_plain_rows(engine, slots, {0, 1, 2})

    # slot 0 reset: an adapter with no weights on this layer (vLLM calls reset_lora)
    deactivate(engine, 1)
    assert activate(engine, no_weights_here(5)) == 0
    assert buffer_slots(a0, "a").ranks == [0, 8, 5] and buffer_slots(b1, "b").ranks == [0, 8, 5]
    assert 0 not in layer.plain and layer.weights.layout == ((1, 16), (2, 10))
    check_plain_rows(engine, slots, {0, 1, 2})  # slot 0's tokens: no delta

    # slot 1 re-set with the gated composite again
    deactivate(engine, 4)
    assert activate(engine, engine.adapters[2]) == 1
    assert set(buffer_slots(a0, "a").gates) == {1} and set(layer.gated) == {1} and 1 not in layer.plain
    assert buffer_slots(a0, "a").ranks == [0, 7, 5]
    check_plain_rows(engine, slots, {0, 2})


def test_a_layer_met_in_a_step_before_any_set(engine):
    """A layer first met in a step (before any adapter was set: vLLM's warm-up) is read whole then, once; an
    adapter set afterwards updates it."""
    a = engine.layer.lora_a_stacked
    assert id(a) not in engine.wrapper.layers
    _, y, y0 = step(engine, [-1, -1])
    assert torch.equal(y, y0)
    layer = engine.wrapper.layers[id(a)]
    assert layer.plain == {} and layer.gated == {}
    activate(engine, plain(1, 3))
    assert engine.wrapper.layers[id(a)] is layer and set(layer.plain) == {0}
    check_plain_rows(engine, [0, -1, 0], {0})


def test_with_vllms_own_wrapper_the_hook_updates_the_buffers(monkeypatch):
    """FLOCK_LORA_WHOLE_LAYER off: vLLM's CPU wrapper, which prepares nothing itself; the plugin's hook updates
    the buffers' data for flock's ops."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    engine = make_engine(monkeypatch, PunicaWrapperCPU(64, 8, "cpu"))
    a0 = engine.layer.lora_a_stacked[0]
    assert [activate(engine, ad) for ad in (plain(1, 3), plain(2, 3))] == [0, 1]
    slots = [0, 1, -1, 1]
    x = torch.randn(len(slots), D_IN)
    assert torch.allclose(ops_delta(engine, x, slots)[1::2], plain_delta(engine, x[1::2], 1)[:, :OUTS[0]], atol=1e-4)
    deactivate(engine, 2)
    assert activate(engine, plain(3, 8)) == 1
    assert buffer_slots(a0, "a").ranks == [3, 8, 0]
    assert torch.allclose(ops_delta(engine, x, slots)[1::2], plain_delta(engine, x[1::2], 1)[:, :OUTS[0]], atol=1e-4)


def test_kernel_rows_are_rewritten_slot_by_slot(engine):
    """The per-token kernel's rows are laid out once and then rewritten one slot at a time (laid out whole again
    only when the widest rank changes): after every set they equal a layout of every slot from scratch."""
    from adapters.engine.lora_linear import kernel_rows_of

    def check() -> tuple:
        rows = engine.wrapper.layers[id(engine.layer.lora_a_stacked)].weights.kernel_weights
        for got, want in zip(rows, kernel_rows_of(engine.wrapper.layers[id(engine.layer.lora_a_stacked)].weights,
                                                  SLOTS)):
            assert torch.equal(got, want)
        return rows

    assert [activate(engine, ad) for ad in (plain(1, 5), plain(2, 3), plain(3, 2))] == [0, 1, 2]
    with torch.inference_mode():  # laid out in a model step; the sets below run outside one (vLLM's add_lora)
        first = check()
    assert first[0].shape[1] == 10  # two slices of rank 5
    deactivate(engine, 2)
    assert activate(engine, plain(4, 4)) == 1  # same widest rank: rewritten in place
    assert check()[0] is first[0]
    deactivate(engine, 3)
    assert activate(engine, no_weights_here(5)) == 2  # reset: its rows become padding, in place
    assert check()[0] is first[0] and not first[2][2].any()
    deactivate(engine, 1)
    assert activate(engine, plain(6, 8)) == 0  # a wider rank: laid out again
    assert check()[0].shape[1] == 16
    check_plain_rows(engine, [0, 1, 2, -1, 1, 0], {0, 1, 2})
    deactivate(engine, 5)
    assert activate(engine, no_weights_here(7)) == 2  # empty before, empty after: nothing to prepare
    check()
    deactivate(engine, 7)
    assert activate(engine, plain(8, 3)) == 2  # and an adapter with weights there again
    check()
    check_plain_rows(engine, [0, 1, 2, -1, 1, 0], {0, 1, 2})
