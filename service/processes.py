"""The processes `flock serve` may manage: redis-server and a vLLM OpenAI server with LoRA and flock's plugin.

The command lines live here so that `flock serve`, the test suite and `flock bench` start them identically.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.settings import Settings

log = logging.getLogger(__name__)


def vllm_command(settings: Settings, port: int | None = None) -> tuple[list[str], dict[str, str]]:
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(settings.resolved_base_model_dir),
        "--served-model-name", settings.base_model_name,
        "--host", "127.0.0.1", "--port", str(port or settings.vllm_port),
        "--dtype", settings.resolved_vllm_dtype,
        "--max-model-len", str(settings.vllm_max_model_len),
        "--max-num-seqs", str(settings.vllm_max_num_seqs),
        "--enable-lora", "--max-loras", str(settings.vllm_max_loras),
        "--max-lora-rank", str(settings.vllm_max_lora_rank),
        "--max-cpu-loras", str(max(settings.vllm_max_cpu_loras, settings.vllm_max_loras)),
        "--disable-uvicorn-access-log",
    ]
    if settings.vllm_tool_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", settings.vllm_tool_parser]
    if settings.vllm_chat_template:
        argv += ["--chat-template", str(settings.vllm_chat_template)]
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kvcache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": settings.vllm_threads,
        **settings.engine_env(),
        # flock's plugins: the LoRA ops (general plugin) and GET /flock/capabilities (endpoint plugin, which vLLM
        # loads only when named here). vLLM's own LoRA resolvers are not used.
        "VLLM_PLUGINS": "flock",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return argv, env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port: int, workdir: Path) -> list[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run `make run` (installs it as root) or set FLOCK_REDIS_URL")
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "yes"]


CHILD_STOP_S = 10.0  # how long flock serve waits for redis-server or vLLM to stop before killing it


@dataclass
class ManagedProcess:
    """A child in its own process group (vLLM forks workers), restarted by `flock serve` if it dies."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    log_file: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    restarts: int = 0

    def start(self) -> None:
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s (pid %d)%s", self.name, self.proc.pid, f", log: {self.log_file}" if self.log_file else "")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout_s`. Longer than a gateway takes to stop its own
        children (CHILD_STOP_S after uvicorn's 5 s): a gateway killed first would leave its vLLM running."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        else:  # the leader is gone; make sure its workers are too
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        log.info("stopped %s", self.name)


def wait_http(url: str, timeout_s: float, proc: ManagedProcess | None = None, what: str = "") -> None:
    """Poll url until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{what or proc.name} exited with code {proc.proc.returncode}; see {proc.log_file}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what or url} not ready after {timeout_s:.0f} s")


def wait_redis(port: int, timeout_s: float = 20) -> None:
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.2)
    raise TimeoutError(f"redis-server on port {port} not ready after {timeout_s:.0f} s")
