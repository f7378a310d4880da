"""flock's vLLM general plugin (entry point group `vllm.general_plugins`), loaded in every vLLM process, and the one
module that patches vLLM (every other engine module uses vLLM's seams or none).

Pinned to vLLM 0.32.0. On the CPU it replaces the CPU LoRA path's pure-torch punica ops (shrink x·A, expand ·B):
- correctness: they index the stacked adapter weights with each token's slot, and slot -1 ("no adapter")
  silently picks the LAST slot, so a base-model request batched with adapter requests was answered by another
  adapter. Here slot -1 tokens get no LoRA delta.
- speed: they gathered a copy of the weights for every token; here each distinct slot is one matmul.
- per-token gating: an adapter slot holding a gated composite (adapters/gated_composite.py, recognised by its
  header row) gets its candidates' blocks weighted per token, between the shrink and the expand, by the
  Arrow / PHATGOOSE / GLIDER gate of adapters/engine/gating.py. Other slots in the same batch are untouched.
It also makes the CPU platform choose adapters/engine/punica_cpu.py's PunicaWrapperFlockCPU (vLLM's CPU wrapper,
subclassed: the whole-layer LoRA path of adapters/engine/lora_linear.py).

Per-slot data (each slot's rank, gate headers, a layer's matrices) is prepared when vLLM sets an adapter into a
slot: LoRAModelManager.activate_adapter, wrapped (install_slot_hook), then calls slot_was_set.

On CUDA it makes the platform choose adapters/engine/punica_gated.py's PunicaWrapperGated (vLLM's GPU wrapper,
subclassed: gated slots through flock's Triton kernel, plain adapters through vLLM's). Only on a vLLM version that
path was tested with (GPU_TESTED_VLLM), and only in eager mode on one tensor-parallel rank (gate_blocker);
otherwise an error or warning says why, vLLM's own wrapper stays, and GET /flock/capabilities reports gated: false.
"""

from __future__ import annotations

import logging
import types
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from adapters.engine import slots as slot_data
from adapters.engine.gating import gate_weights
from adapters.engine.settings import EngineSettings
from adapters.engine.slots import SlotGate, buffer_slots

log = logging.getLogger(__name__)
PINNED_VLLM = "0.32.0"
# vLLM versions whose PunicaWrapperGPU / LoRAModelManager the CUDA gated path was tested against (in Triton's
# interpreter: tests/unit/test_cuda_gated.py). Another version must not get gated composites on CUDA.
GPU_TESTED_VLLM = ("0.32.0",)
GATED_WRAPPER = "adapters.engine.punica_gated.PunicaWrapperGated"
CPU_WRAPPER = "adapters.engine.punica_cpu.PunicaWrapperFlockCPU"
_patched = False


PER_SLOT_MAX = 2  # up to this many distinct adapters in a batch, one matmul per adapter; beyond, all at once


def _per_slot(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype,
              slots: set[int]) -> torch.Tensor:
    """(tokens, out): each token's input times its slot's weights (transposed); zero for slot -1.

    vLLM's op gathered a copy of the (rank x width) weights for every token, which made LoRA decode several
    times slower than the base model. Here a batch with few distinct adapters costs one matmul per adapter;
    a batch mixing many multiplies by every slot's weights in ONE matmul and keeps each token's own slice:
    more arithmetic (the ranks are small) but a constant number of ops, which is what costs on a CPU.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    tokens = x.shape[0]
    if len(slots) == 1:
        (only,) = slots
        if only < 0:
            return x.new_zeros(tokens, weights.shape[1])
        return x @ weights[only].to(dtype).T
    if len(slots - {-1}) <= PER_SLOT_MAX:
        out = x.new_zeros(tokens, weights.shape[1])
        for slot in slots:
            if slot >= 0:
                rows = (indices == slot).nonzero().squeeze(1)
                out[rows] = x[rows] @ weights[slot].to(dtype).T
        return out
    n_slots, n_out, n_in = weights.shape
    every = (x @ weights.to(dtype).reshape(n_slots * n_out, n_in).T).view(tokens, n_slots, n_out)
    out = every[torch.arange(tokens), indices.clamp(min=0)]
    return out * (indices >= 0).unsqueeze(1).to(dtype)


def apply_gate(x: torch.Tensor, h: torch.Tensor, gate: SlotGate) -> torch.Tensor:
    """Weight each candidate's block of the shrink output `h` = x·Aᵀ (tokens, ≥ gate rows) by the token's gate
    weight and zero the gate and header columns, in place (h is always a fresh tensor here). x: the layer
    input of the same tokens. The gate logits are computed again (the shrink wrote them to h in the
    activation dtype)."""
    weights = gate_weights(x.float(), gate.rows.T, gate.bias.unsqueeze(0), gate.kind, gate.top_k)
    h[:, :gate.gate_start] *= weights[:, gate.column_expert].to(h.dtype)
    h[:, gate.gate_start:] = 0
    return h


def _gate_tokens(x: torch.Tensor, outputs: torch.Tensor, indices: torch.Tensor, gates: dict[int, SlotGate]
                 ) -> torch.Tensor:
    for slot, gate in gates.items():
        mask = indices == slot
        if bool(mask.all()):
            return apply_gate(x, outputs, gate)
        rows = mask.nonzero().squeeze(1)
        if rows.numel():
            outputs[rows] = apply_gate(x[rows], outputs[rows], gate)
    return outputs


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    data = buffer_slots(lora_a_weights, "a")  # prepared when the slots were set (adapters/engine/slots.py)
    a = lora_a_weights.squeeze(1) if lora_a_weights.dim() == 4 else lora_a_weights  # (slots, rank, in)
    slots = set(lora_indices_tensor.tolist())  # a Python set: cheaper than torch.unique for a batch's tokens
    rank = data.used_rank(slots)
    if rank == 0:  # no adapter of this batch has weights here, e.g. the LM head's LoRA wrapper: nothing to do
        output_tensor[:, : a.shape[1]] = 0
        return
    outputs = _per_slot(inputs, a[:, :rank], lora_indices_tensor, output_tensor.dtype, slots)
    gates = {slot: gate for slot, gate in data.gates.items() if slot in slots}
    if gates:
        outputs = _gate_tokens(inputs, outputs, lora_indices_tensor, gates)
    output_tensor[:, :rank] = scaling * outputs
    output_tensor[:, rank : a.shape[1]] = 0


def _expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor | None:
    """(tokens, out), or None when no adapter of the batch has weights here (its delta is zero)."""
    data = buffer_slots(lora_b_weights, "b")
    b = lora_b_weights.squeeze(1) if lora_b_weights.dim() == 4 else lora_b_weights  # (slots, out, rank)
    slots = set(indices.tolist())
    rank = data.used_rank(slots)
    if rank == 0:
        return None
    return _per_slot(inputs[:, :rank], b[:, :, :rank], indices, dtype, slots)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        # vLLM's LM head wrapper calls this with a (slots, vocab, rank) B of zeros when adapters do not target
        # the head: with 8 adapters in a batch the all-slots matmul over 8 x 49k outputs was 7% of decode.
        if not add_inputs:
            output_tensor[:, : min(lora_b_weights.shape[-2], output_tensor.shape[1])] = 0
        return
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
):
    outputs = _expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _limit_spin(busy_ms: float) -> None:
    """vLLM's shared-memory queues spin (sched_yield) for 1 s after every read before sleeping on a socket.
    The engine core and the worker are both readers, so after each request they keep about a core busy for a
    second, and during decode the engine core spins while the worker computes: CPU the gateway, the API server
    and the next request's embedding need. Past `busy_ms` since its last read, a reader now sleeps on the
    writer's notification (a socket message vLLM sends on every write). With no spin window at all reads
    stalled for vLLM's 5 s re-check (a lost wake-up, not understood), so each sleep is capped as well: 10 ms
    while traffic is recent, 50 ms after a second of quiet (docs/architecture.md, "spin window")."""
    import time

    try:
        from vllm.distributed.device_communicators import shm_broadcast

        original = shm_broadcast.SpinCondition.wait
    except (ImportError, AttributeError):  # another vLLM: its own waiting, not an engine that fails to start
        log.warning("flock's vLLM plugin: no SpinCondition in this vLLM; FLOCK_VLLM_SPIN_MS ignored")
        return
    if getattr(original, "flock", False):
        return
    busy_s = busy_ms / 1000

    def wait(self, timeout_ms: int | None = None) -> None:
        self.busy_loop_s = busy_s
        cap = 10 if time.monotonic() - self.last_read < 1.0 else 50
        return original(self, cap if timeout_ms is None else min(timeout_ms, cap))

    wait.flock = True  # type: ignore[attr-defined]
    shm_broadcast.SpinCondition.wait = wait  # type: ignore[method-assign]


def gpu_gate_supported(version: str) -> bool:
    """The CUDA gated path may be installed on this vLLM version."""
    return version in GPU_TESTED_VLLM


def gate_blocker(enforce_eager: bool, tensor_parallel_size: int, fully_sharded_loras: bool) -> str | None:
    """Why the CUDA gated path cannot serve an engine started with these options, or None when it can.
    - eager: the wrapper decides per step, in Python, whether to launch its kernel and which tokens are gated,
      which torch.compile and CUDA-graph capture would freeze;
    - one tensor-parallel rank: a row-parallel layer's shard (o_proj, down_proj) sees part of x, and the gate
      needs all of it (its logits and LN statistics);
    - not --fully-sharded-loras: those layers call vLLM's shrink and expand apart, past the wrapper's gate."""
    if not enforce_eager:
        return "per-token modes on CUDA need --enforce-eager"
    if tensor_parallel_size != 1:
        return "per-token modes on CUDA need --tensor-parallel-size 1"
    if fully_sharded_loras:
        return "per-token modes on CUDA do not work with --fully-sharded-loras"
    return None


def _engine_blocker() -> str | None:
    """gate_blocker for this engine's configuration (vLLM's current config, set while its worker loads the model
    and creates the LoRA manager; without one, the gated path is not chosen)."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None or config.model_config is None:
        return "no vLLM configuration at hand"
    lora = config.lora_config
    return gate_blocker(bool(config.model_config.enforce_eager), int(config.parallel_config.tensor_parallel_size),
                        bool(lora is not None and lora.fully_sharded_loras))


def install_cpu_wrapper(platform_cls: type) -> None:
    """Make `platform_cls` (vLLM's CPU platform) choose adapters/engine/punica_cpu.py's PunicaWrapperFlockCPU:
    vLLM's CPU wrapper with the whole-layer LoRA path. Re-entrant."""
    if getattr(getattr(platform_cls, "get_punica_wrapper", None), "flock", False):
        return

    def get_punica_wrapper(cls) -> str:
        return CPU_WRAPPER

    get_punica_wrapper.flock = True  # type: ignore[attr-defined]
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)  # type: ignore[attr-defined]


def slot_was_set(index: int, modules: dict[str, Any], wrappers: Iterable[Any], cleared: frozenset[str] = frozenset()
                 ) -> None:
    """vLLM just wrote slot `index` of every LoRA module: prepare the slot's per-slot data. A punica wrapper with
    a `slot_set` (flock's CPU and CUDA wrappers) prepares the modules it serves, its own tables with them; the
    buffers of any other module (vLLM's own wrapper: FLOCK_LORA_WHOLE_LAYER off) are updated here, for the ops.
    `cleared`: the modules vLLM reset (the adapter has no weights there): known empty, not read back."""
    preparing = {id(w): w for w in wrappers if hasattr(w, "slot_set")}
    for wrapper in preparing.values():
        wrapper.slot_set(index, modules, cleared)
    for name, module in modules.items():
        if id(getattr(module, "punica_wrapper", None)) not in preparing:
            slot_data.set_module_slot(module, index, cleared=name in cleared)


def install_slot_hook() -> None:
    """Wrap vLLM's LoRAModelManager.activate_adapter, the one place vLLM writes adapters into slots (every LoRA
    layer's set_lora, or reset_lora where the adapter has no weights), to prepare the slot's per-slot data right
    after: the engine never looks for it again per step. Re-entrant. Checked on PINNED_VLLM only: on another
    version register() logs an error, since a slot written some other way would keep stale ranks and gates."""
    from vllm.lora import model_manager

    manager = model_manager.LoRAModelManager
    if getattr(manager.activate_adapter, "flock", False):
        return
    activate = manager.activate_adapter

    def activate_adapter(self, lora_id: int) -> bool:
        done = activate(self, lora_id)
        if done:  # the slot's weights are written
            # The modules vLLM reset rather than set (the same test as its activate_adapter's): most modules for
            # an adapter on a few target modules, whose buffers need no reading back.
            lora_model = self._registered_adapters[lora_id]
            cleared = frozenset(name for name in self.modules
                                if not self._get_lora_layer_weights(lora_model, name))
            # vLLM sets adapters both inside model steps (inference mode) and in its add_lora utility call
            # (outside): tables made in one and updated in place in the other must not meet as inference tensors
            # outside inference mode, so they are always made and updated inside it.
            with torch.inference_mode():
                slot_was_set(self.lora_index_to_id.index(lora_id), self.modules,
                             self.punica_wrapper_mapping.values(), cleared)
        return done

    activate_adapter.flock = True  # type: ignore[attr-defined]
    manager.activate_adapter = activate_adapter  # type: ignore[method-assign]


def install_gpu_gate(platform_cls: type, version: str) -> bool:
    """Make `platform_cls` (vLLM's CUDA platform) choose the gated punica wrapper, and have vLLM's LoRA model
    manager tell it about every adapter it sets into a slot. False, with an error logged, on a vLLM version the
    path was not tested with: a gated composite must never reach vLLM's own kernels, which would add every
    candidate's delta ungated (the gateway sends none, as GET /flock/capabilities then says gated: false)."""
    if not gpu_gate_supported(version):
        log.error("flock's vLLM plugin: the per-token gate on CUDA is tested with vLLM %s, not %s: this backend "
                  "serves no per-token routing mode (GET /flock/capabilities: gated false)",
                  ", ".join(GPU_TESTED_VLLM), version)
        return False
    if not getattr(getattr(platform_cls, "get_punica_wrapper", None), "flock", False):
        original = platform_cls.get_punica_wrapper  # type: ignore[attr-defined]  # bound to platform_cls

        def get_punica_wrapper(cls) -> str:
            blocker = _engine_blocker()
            if blocker is None:
                return GATED_WRAPPER
            log.warning("flock's vLLM plugin: %s; vLLM's own LoRA wrapper is used and this backend serves no "
                        "per-token routing mode (GET /flock/capabilities: gated false)", blocker)
            return original()

        get_punica_wrapper.flock = True  # type: ignore[attr-defined]
        platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)  # type: ignore[attr-defined]
    install_slot_hook()
    log.info("flock vLLM plugin: gated slots on CUDA go through %s (in eager mode)", GATED_WRAPPER)
    return True


LAST_GOOD_BYTES = 512 << 20  # adapters kept in case their file breaks while vLLM still serves them
_last_good: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
_last_good_bytes = 0  # kept as it changes: summing every kept tensor on each read cost more than the read
# (a third of an adapter change's time with 1,000 adapters read: docs/performance.md, many experts)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


def _remember(path: str, tensors: dict[str, torch.Tensor]) -> None:
    global _last_good_bytes
    old = _last_good.pop(path, None)
    if old is not None:
        _last_good_bytes -= _nbytes(old)
    _last_good[path] = tensors
    _last_good_bytes += _nbytes(tensors)
    while _last_good_bytes > LAST_GOOD_BYTES and len(_last_good) > 1:
        _, dropped = _last_good.popitem(last=False)
        _last_good_bytes -= _nbytes(dropped)


class BytesSafeOpen:
    """`safetensors.safe_open`'s reading interface over the file's bytes, for vLLM's LoRA loader.

    safe_open memory-maps the file: an adapter rewritten in place while vLLM loads it (truncated meanwhile) kills
    the worker with SIGBUS, and every request in the batch with it (seen twice in the 20-minute soak). Read
    first, a truncated file is a parse error. That is not enough: vLLM also re-reads an adapter inside a model
    step when it has left its CPU LoRA cache, and an exception there ends the engine (seen in the soak after
    this reader came in). So the last tensors read well from each path are kept (LAST_GOOD_BYTES at most, least
    recently read out first), and a path that no longer reads well gives those: what vLLM would still hold had
    it not evicted the adapter. The gateway quarantines such an expert on its own check. Adapters are a few MB."""

    def __init__(self, path: str, framework: str = "pt", device: str = "cpu"):
        from safetensors.torch import load

        try:
            with open(path, "rb") as f:
                self._tensors = load(f.read())
        except Exception as exc:
            if path not in _last_good:
                raise
            log.warning("adapter file %s unreadable (%s): serving the version read before", path, exc)
            self._tensors = _last_good[path]
            _last_good.move_to_end(path)
            return
        _remember(path, self._tensors)

    def __enter__(self) -> BytesSafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def register() -> None:
    """Re-entrant: vLLM calls it in the API server, the engine core and every worker."""
    global _patched
    if _patched:
        return
    import vllm

    if vllm.__version__ != PINNED_VLLM:
        log.error("flock's vLLM plugin is tested with vLLM %s, not %s: it prepares per-slot LoRA data when "
                  "LoRAModelManager.activate_adapter sets an adapter into a slot, and a vLLM that writes slots "
                  "elsewhere would be served stale ranks and gates", PINNED_VLLM, vllm.__version__)
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # sgmv_* (prefill) call bgmv_* through lora_ops' globals; punica_cpu imported the names directly.
    for module in (lora_ops, punica_cpu):
        for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                         ("bgmv_expand_slice", bgmv_expand_slice)):
            if hasattr(module, name):
                setattr(module, name, fn)
    from vllm.lora import lora_model

    lora_model.safetensors = types.SimpleNamespace(safe_open=BytesSafeOpen)  # type: ignore[assignment]  # its only use
    settings = EngineSettings()
    _limit_spin(settings.vllm_spin_ms)
    install_slot_hook()
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and settings.lora_whole_layer:
        # lora_whole_layer off keeps vLLM's wrapper and slice-by-slice path (through the ops above): for A/B runs.
        install_cpu_wrapper(type(current_platform))
    if current_platform.is_cuda():
        install_gpu_gate(type(current_platform), vllm.__version__)
    _patched = True
    log.info("flock vLLM plugin: CPU LoRA ops replaced (per-slot matmuls; no-adapter tokens get no delta); "
             "adapters read without memory maps")
