"""The per-token LoRA kernel (adapters/engine/sgmv.cpp) against the torch paths of
adapters/engine/lora_linear.py, in bf16 (the engine's dtype, the only one the kernel takes), through
lora_linear.apply as vLLM's wrapper calls it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from adapters.engine import lora_linear, sgmv
from tests.unit.engine_helpers import whole_layer

WIDTH, OUTS, RANKS, MAX_RANK, SLOTS = 64, (64, 32, 32), (3, 5, 2), 8, 4


def stacked(seed: int = 1):
    """q/k/v-like slices of different widths and ranks in vLLM's padded stacked layout; slot 2 has no LoRA on the
    middle slice, slot 3 none at all."""
    g = torch.Generator().manual_seed(seed)
    a_slices, b_slices = [], []
    for out, rank in zip(OUTS, RANKS):
        a, b = torch.zeros(SLOTS, 1, MAX_RANK, WIDTH), torch.zeros(SLOTS, 1, out, MAX_RANK)
        a[:3, :, :rank] = torch.randn(3, 1, rank, WIDTH, generator=g) / WIDTH ** 0.5
        b[:3, :, :, :rank] = torch.randn(3, 1, out, rank, generator=g)
        a_slices.append(a.bfloat16())
        b_slices.append(b.bfloat16())
    a_slices[1][2] = 0
    b_slices[1][2] = 0
    return tuple(a_slices), tuple(b_slices)


def run(x, idx, a, b, scale, y0) -> torch.Tensor:
    y = y0.clone()
    assert whole_layer(y, x, idx.clone(), a, b, scale)
    return y


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel's calls (fails here, with the reason, where the kernel cannot be built)."""
    kernel = sgmv.kernel()
    assert kernel is not None, "adapters/engine/sgmv.cpp did not build on this machine: see the logged compiler error"
    calls = []

    class Counting:
        @staticmethod
        def sgmv_bf16(*args):
            calls.append(args[0].shape[0])
            return kernel.sgmv_bf16(*args)

    monkeypatch.setattr(lora_linear, "_kernel", lambda: Counting)
    return calls


@pytest.mark.parametrize("indices", [[0] * 6, [2, 0, 1, 1, 2, 0], [-1, 1, -1, 1, 1, -1], [2, -1, 0, 2, 1, 3],
                                     [3, 3, 3], [i % 3 for i in range(96)], [0] * 32])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_kernel_agrees_with_the_torch_paths(kernel_calls, monkeypatch, indices, scale):
    g = torch.Generator().manual_seed(len(indices))
    a, b = stacked()
    n = len(indices)
    x, idx = torch.randn(n, WIDTH, generator=g).bfloat16(), torch.tensor(indices)
    y0 = torch.randn(n, sum(OUTS), generator=g).bfloat16()
    ours = run(x, idx, a, b, scale, y0)
    assert kernel_calls == [n], "the kernel path was not taken"
    monkeypatch.setattr(lora_linear, "_kernel", lambda: None)
    torch_paths = run(x, idx, a, b, scale, y0)
    # What the same arithmetic gives in float64, token by token, with vLLM's rounding of the shrink's product.
    want = y0.double().clone()
    for t, s in enumerate(indices):
        if s < 0:
            continue
        col = 0
        for i, out in enumerate(OUTS):
            h = (x[t].double() @ a[i][s, 0].double().T).bfloat16().double() * scale
            want[t, col:col + out] += b[i][s, 0].double() @ h
            col += out
    err_ours, err_torch = (ours.double() - want).abs().max(), (torch_paths.double() - want).abs().max()
    assert err_ours <= max(1.5 * err_torch, 0.05), (err_ours, err_torch)
    assert torch.equal(ours[idx < 0], y0[idx < 0]) and torch.equal(ours[idx == 3], y0[idx == 3])
    if any(s in (0, 1, 2) for s in indices):
        assert not torch.equal(ours, y0)


@pytest.mark.parametrize("indices", [[i % 3 for i in range(97)], [0] * 33])
def test_larger_batches_stay_on_the_torch_paths(kernel_calls, indices):
    """Above KERNEL_MAX_TOKENS (96 mixed, 32 on one adapter) oneDNN's GEMMs are faster."""
    g = torch.Generator().manual_seed(0)
    a, b = stacked()
    run(torch.randn(len(indices), WIDTH, generator=g).bfloat16(), torch.tensor(indices), a, b, 1.0,
        torch.zeros(len(indices), sum(OUTS), dtype=torch.bfloat16))
    assert kernel_calls == []


def test_float32_stays_on_the_torch_paths(kernel_calls):
    a, b = stacked()
    run(torch.randn(4, WIDTH), torch.tensor([0, 1, 2, 0]), tuple(t.float() for t in a), tuple(t.float() for t in b),
        1.0, torch.zeros(4, sum(OUTS)))
    assert kernel_calls == []


def test_a_build_lock_left_by_a_killed_process_does_not_block_loading(tmp_path):
    """torch's loader waits forever on its build lock file, which a vLLM killed mid-start leaves behind (a
    20-minute soak's vLLM hung at its first LoRA step after a restart): a built kernel loads without it."""
    assert sgmv.kernel() is not None, "adapters/engine/sgmv.cpp did not build on this machine"
    built = sgmv.build_dir()
    copy = tmp_path / built.parent.name / built.name
    shutil.copytree(built, copy)
    (copy / "lock").touch()  # the stale lock
    code = "from adapters.engine import sgmv; import sys; sys.exit(0 if sgmv.kernel() is not None else 1)"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_build_removes_the_lock_a_killed_build_left(tmp_path, monkeypatch):
    """With nothing built, the build runs under an OS lock (released when its holder dies) after taking away
    torch's stale lock file, so that torch's loader does not wait on it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = sgmv.build_dir()
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    seen = []

    def load(name, sources, extra_cflags, build_directory, verbose):
        seen.append((name, Path(build_directory), (folder / "lock").exists()))
        return "built"

    monkeypatch.setattr(cpp_extension, "load", load)
    assert sgmv.kernel.__wrapped__() == "built"
    assert seen == [(sgmv.module_name(), folder, False)]
