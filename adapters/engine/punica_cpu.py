"""vLLM's CPU punica wrapper with flock's whole-layer LoRA (adapters/engine/lora_linear.py).

`PunicaWrapperFlockCPU` subclasses vLLM's `PunicaWrapperCPU`; adapters/engine/plugin.py makes the CPU platform
choose it (FLOCK_LORA_WHOLE_LAYER, on by default). It uses the wrapper's seams instead of patching vLLM:

- `slot_set`: after vLLM wrote an adapter into a slot (the plugin calls it after `activate_adapter`), the slot's
  per-slot data of every layer this wrapper serves is prepared: each buffer's ranks and gate headers
  (adapters/engine/slots.py) and each linear layer's matrices (lora_linear.LayerSlots);
- `update_metadata`: the step's token -> slot plan (lora_linear.StepPlan), made when vLLM writes the mapping;
- `add_lora_linear`: one shrink and one expand for the whole layer, or vLLM's slice-by-slice path (through
  flock's replacement ops) where that does not apply.

A step looks its layer up by the identity of the stacked-weights tuple vLLM passes on every call (the layer's
own attribute), never by data pointer and version.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from adapters.engine import lora_linear
from adapters.engine.slots import set_module_slot


class PunicaWrapperFlockCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU whose linear layers take the whole-layer path, with per-slot data prepared at set time."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs: Any):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.layers: dict[int, lora_linear.LayerSlots] = {}
        self.plan: lora_linear.StepPlan | None = None  # None until vLLM first writes a mapping

    def layer(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]
              ) -> lora_linear.LayerSlots:
        """The layer's slots; read whole the first time a layer is met (before any adapter was set into it)."""
        found = self.layers.get(id(a_stacked))
        if found is None or found.a_stacked is not a_stacked:
            found = self.layers[id(a_stacked)] = lora_linear.LayerSlots(a_stacked, b_stacked)
        return found

    def slot_set(self, index: int, modules: dict[str, Any], cleared: frozenset[str] = frozenset()) -> None:
        """vLLM just wrote slot `index` of every LoRA layer (set_lora or reset_lora, for the `cleared` ones):
        prepare that slot's data in each layer this wrapper serves."""
        for name, module in modules.items():
            if getattr(module, "punica_wrapper", None) is not self:
                continue
            set_module_slot(module, index, cleared=name in cleared)
            a, b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
            if isinstance(a, tuple) and isinstance(b, tuple):  # a linear layer (the whole-layer path's)
                found = self.layers.get(id(a))
                if found is not None and found.a_stacked is a:
                    if name in cleared and found.holds_nothing(index):
                        continue  # empty before, empty now (most layers, for an adapter on a few modules)
                    found.set_slot(index)
                else:
                    self.layer(a, b)  # reads every slot, this one included

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int, vocab_size: int,
                        **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.plan = lora_linear.StepPlan.of(self.token_lora_indices)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...], *,
                        buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> None:
        if (buffer is None and kwargs.get("add_inputs", True) and self.plan is not None
                and lora_linear.apply(y, x, self.plan, self.layer(lora_a_stacked, lora_b_stacked).for_dtype(y.dtype),
                                      scale)):
            return None
        return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer,
                                       **kwargs)
