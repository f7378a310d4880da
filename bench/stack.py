"""A local stack for `flock bench` and `flock eval`: redis-server, vLLM (unless a backend is given) and
`flock serve` seeded from an expert library, torn down on close(). The gateway gets a fresh state directory,
so its pool is exactly the library."""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from service.processes import ManagedProcess, free_port, redis_command, vllm_command, wait_http, wait_redis
from service.settings import Settings


def say(msg: str) -> None:
    print(f"[flock {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gateway_env(settings: Settings, *, library: Path, backend: str, redis_url: str, state_dir: Path, port: int
                ) -> dict[str, str]:
    """The environment of `flock serve`: the library as seed and expert root, fresh state."""
    library = Path(library).resolve()
    return {**os.environ, "FLOCK_BACKEND_URLS": backend, "FLOCK_REDIS_URL": redis_url,
            "FLOCK_LIBRARY_DIR": str(library), "FLOCK_EXPERT_ROOTS": f"{library},{state_dir / 'experts'}",
            "FLOCK_STATE_DIR": str(state_dir), "FLOCK_HOST": "127.0.0.1", "FLOCK_PORT": str(port),
            "FLOCK_BASE_MODEL_NAME": settings.base_model_name, "FLOCK_LOG_LEVEL": "warning"}


class LocalStack:
    """redis-server + vLLM (unless `backend` is given) + `flock serve` on the library in `library`;
    `gateway_env` overrides the gateway's environment (FLOCK_* settings)."""

    def __init__(self, settings: Settings, library: Path, backend: str | None, work: Path,
                 gateway_env: dict[str, str] | None = None):
        self.stack = ExitStack()
        try:
            self._start(settings, library, backend, work, gateway_env or {})
        except BaseException:
            self.stack.close()
            raise

    def _start(self, settings: Settings, library: Path, backend: str | None, work: Path,
               overrides: dict[str, str]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.library = Path(library)
        self.settings = settings
        self.redis_port = free_port()
        redis = ManagedProcess("redis-server", redis_command(self.redis_port, work), log_file=work / "redis.log")
        redis.start()
        self.stack.callback(redis.stop)
        wait_redis(self.redis_port)
        if backend is None:
            port = free_port()
            argv, env = vllm_command(settings, port=port)
            vllm = ManagedProcess("vLLM", argv, env, log_file=work / "vllm.log")
            say(f"starting vLLM (log {work / 'vllm.log'})")
            vllm.start()
            self.stack.callback(vllm.stop)
            backend = f"http://127.0.0.1:{port}"
            wait_http(f"{backend}/health", 600, vllm, "vLLM")
        self.vllm = backend.rstrip("/")
        port = free_port()
        env = gateway_env(settings, library=library, backend=self.vllm, redis_url=self.redis_url,
                          state_dir=work / "state", port=port) | overrides
        gw = ManagedProcess("gateway", [sys.executable, "-m", "cli", "serve"], env,
                            log_file=work / "gateway.log")
        say(f"starting the gateway on the library {library} (log {work / 'gateway.log'})")
        gw.start()
        self.stack.callback(gw.stop)
        self.gateway = f"http://127.0.0.1:{port}"
        wait_http(f"{self.gateway}/ready", 180, gw, "gateway")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def close(self) -> None:
        self.stack.close()
