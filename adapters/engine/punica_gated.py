"""vLLM's GPU punica wrapper with gated slots: the CUDA path of flock's per-token gate.

`PunicaWrapperGated` subclasses vLLM's `PunicaWrapperGPU` (adapters/engine/plugin.py makes the CUDA platform
choose it). A slot holding a gated composite (adapters/gated_composite.py) is taken off vLLM's kernels: its
tokens are mapped to −1 ("no adapter") in the metadata vLLM's Triton shrink and expand read, so those kernels
add nothing for them, and the Triton kernel of adapters/engine/triton_gated.py adds their gated delta instead
(shrink → per-token gate → expand). Plain adapters and no-adapter tokens stay on vLLM's kernels, untouched.

Per-slot data is prepared when an adapter is set into a slot (`slot_set`, which the plugin calls after vLLM's
`activate_adapter` has written the slot's weights): for every LoRA linear layer, each slice's gate header is
read once (adapters/engine/slots.set_module_slot) into small per-slot tables (GatedLayer), and whether the
adapter is gated at all. A step then only looks its layer up by the layer's stacked-weights tuple, the object
vLLM passes on every call (never by data pointer and version), and launches one kernel per slice when the batch
has a gated token.

Eager mode only: the choice to launch, and the token → gated-slot map, are made in Python on each step, which
torch.compile and CUDA-graph capture would freeze at capture time; and one tensor-parallel rank without
--fully-sharded-loras (plugin.gate_blocker says why). The plugin installs this wrapper only then, and
GET /flock/capabilities reports gated: false otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from adapters.engine.slots import buffer_slots, set_module_slot
from adapters.engine.triton_gated import META_FIELDS, gated_lora_slice

log = logging.getLogger(__name__)


class GatedLayer:
    """One LoRA linear layer's per-slot gate tables, one set per slice (all on the layer's device)."""

    def __init__(self, a_stacked: tuple[torch.Tensor, ...]):
        self.a_stacked = a_stacked  # held: the key of this layer is the identity of this tuple
        slots, _, max_rank, _ = a_stacked[0].shape
        device = a_stacked[0].device
        n = len(a_stacked)
        self.meta = torch.zeros(n, slots, META_FIELDS, dtype=torch.int32, device=device)  # kind 0: not gated
        self.columns = torch.full((n, slots, max_rank), -1, dtype=torch.int32, device=device)
        self.bias = torch.full((n, slots, max_rank), float("-inf"), device=device)
        self.rowsum = torch.zeros(n, slots, max_rank, device=device)
        self.gated: set[int] = set()  # slots gated on some slice of this layer

    def set_slot(self, index: int) -> bool:
        """Fill slot `index`'s tables from its buffers' gate headers (slots.set_module_slot read them when the
        slot was written); True when it holds a gated composite here. A slice whose header this engine cannot
        apply had its LoRA removed there, loudly (adapters/engine/slots.py); the slot stays gated, off vLLM's
        kernels."""
        self.meta[:, index] = 0
        self.columns[:, index] = -1
        self.bias[:, index] = float("-inf")
        self.rowsum[:, index] = 0
        gated = False
        for i, a in enumerate(self.a_stacked):
            data = buffer_slots(a, "a")
            gate = data.gates.get(index)
            gated |= index in data.refused
            if gate is None:
                continue
            gated = True
            device = self.meta.device
            self.meta[i, index] = torch.tensor([gate.kind, gate.top_k, gate.n, gate.gate_start], dtype=torch.int32,
                                               device=device)
            self.columns[i, index, :gate.gate_start] = gate.column_expert.to(device, torch.int32)
            self.bias[i, index, :gate.n] = gate.bias.to(device)
            self.rowsum[i, index, :gate.n] = gate.rows.sum(dim=1).to(device)
        (self.gated.add if gated else self.gated.discard)(index)
        return gated


class PunicaWrapperGated(PunicaWrapperGPU):  # type: ignore[misc]  # vLLM marks it @final; a seam all the same
    """PunicaWrapperGPU whose gated slots go through flock's Triton kernel; everything else through vLLM's."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.layers: dict[int, GatedLayer] = {}
        self.slot_gated = [False] * self.max_loras  # per slot: holds a gated composite
        self.slot_gated_device = torch.zeros(self.max_loras, dtype=torch.bool, device=device)
        # token -> its slot where that slot is gated, else -1 (what the gated kernel reads)
        self.gated_token_slots = torch.full((max_num_batched_tokens,), -1, dtype=torch.int32, device=device)
        self.batch_gated = False  # this step's batch has a token on a gated slot

    def layer(self, a_stacked: tuple[torch.Tensor, ...]) -> GatedLayer:
        found = self.layers.get(id(a_stacked))
        if found is None or found.a_stacked is not a_stacked:
            found = self.layers[id(a_stacked)] = GatedLayer(a_stacked)
        return found

    def slot_set(self, index: int, modules: dict[str, Any], cleared: frozenset[str] = frozenset()) -> None:
        """Prepare slot `index`'s per-layer gate tables after vLLM wrote an adapter's weights into it (or reset
        the slot: the `cleared` modules): every LoRA linear layer that this wrapper serves."""
        gated = False
        for name, module in modules.items():
            if getattr(module, "punica_wrapper", None) is not self:
                continue
            set_module_slot(module, index, cleared=name in cleared)
            stacked = getattr(module, "lora_a_stacked", None)
            if isinstance(stacked, tuple):
                gated |= self.layer(stacked).set_slot(index)
        self.slot_gated[index] = gated
        self.slot_gated_device[index] = gated

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int, vocab_size: int,
                        **kwargs: Any) -> None:
        """PunicaWrapperGPU.update_metadata, with gated slots' tokens given −1 in the metadata of vLLM's kernels
        and their slot in `gated_token_slots` instead."""
        self.is_prefill = mapping.is_prefill
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        ids = set(mapping.index_mapping)
        self.batch_gated = any(gated and lora_index_to_id[slot] in ids for slot, gated in enumerate(self.slot_gated))
        indices = self.token_lora_indices
        if self.batch_gated:
            on_gated = (indices >= 0) & self.slot_gated_device[indices.clamp(min=0)]
            self.gated_token_slots.fill_(-1)
            self.gated_token_slots[: indices.shape[0]] = torch.where(on_gated, indices, -1).to(torch.int32)
            indices = torch.where(on_gated, -1, indices)
        with gpu_sync_allowed():
            self.token_mapping_meta.prepare_tensors(indices)
            self.prompt_mapping_meta.prepare_tensors(self.sampler_indices)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *,
                        buffer: torch.Tensor | None = None, **kwargs: Any) -> None:  # type: ignore[override]
        # (vLLM's GPU wrapper and its ABC type `buffer` differently; this follows the GPU wrapper's)
        super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        if not self.batch_gated:
            return
        layer = self.layers.get(id(lora_a_stacked))
        if layer is None or layer.a_stacked is not lora_a_stacked or not layer.gated:
            return  # no gated composite has weights on this layer
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        slots = self.gated_token_slots[: x2.shape[0]]
        offset = 0
        for i, (a, b) in enumerate(zip(lora_a_stacked, lora_b_stacked)):
            gated_lora_slice(y2, x2, slots, a, b, layer.meta[i], layer.columns[i], layer.bias[i], layer.rowsum[i],
                             offset, scale)
            offset += output_slices[i]
