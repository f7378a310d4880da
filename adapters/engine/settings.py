"""The engine's part of flock's settings table (service/settings.py includes these fields).

Declared here, below everything, because vLLM's processes read them: `service/processes.py` passes each field
to the managed vLLM as its FLOCK_ variable (`engine_env`), and the plugin reads them back with `EngineSettings()`.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_", env_file=None, extra="ignore")

    # --- the engine: flock's plugin inside vLLM (passed to the vLLM processes) -------------------------
    lora_kernel: bool = Field(
        True, description="Small LoRA batches (decode steps), and gated composites' batches up to 256 tokens, "
        "go through flock's per-token CPU kernel (adapters/engine/sgmv.cpp, built by make setup or on first "
        "use). False: torch's matmuls only (for A/B runs).")
    lora_whole_layer: bool = Field(
        True, description="One shrink and one expand matmul per LoRA layer for all slices and adapters "
        "(adapters/engine/lora_linear.py). False: vLLM's slice-by-slice path through flock's ops (for A/B runs).")
    vllm_spin_ms: float = Field(
        2.0, ge=0.1, description="How long vLLM's engine core and worker spin waiting for each other before "
        "sleeping until woken (vLLM's own window is 1000 ms, which keeps about a core busy for a second after "
        "every request).")

    def engine_env(self) -> dict[str, str]:
        """These settings as the environment of a vLLM process."""
        return {f"FLOCK_{name.upper()}": (str(int(value)) if isinstance(value, bool) else f"{value:g}")
                for name, value in self.model_dump().items() if name in EngineSettings.model_fields}
