"""`flock serve` without FLOCK_REDIS_URL manages its own redis-server: starts it, restarts it when it dies, and
stops it on SIGTERM (service/serve.py, service/processes.py). No vLLM is needed: the backend is a closed port."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import redis

from tests.conftest import free_port, start_gateway, stop_gateway
from tests.integration.test_failover import processes, wait_for

pytestmark = pytest.mark.integration


def redis_child(gateway_pid: int) -> int | None:
    for pid, state, ppid, _, cmdline in processes():
        if ppid == gateway_pid and b"redis-server" in cmdline and state != "Z":
            return pid
    return None


def pings(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


def test_serve_manages_redis(work, expert_root):
    port = free_port()
    env = {"FLOCK_REDIS_URL": "", "FLOCK_MANAGED_REDIS_PORT": str(port), "FLOCK_EXPERT_ROOTS": str(expert_root),
           "FLOCK_BACKEND_URLS": f"http://127.0.0.1:{free_port()}"}
    gw = start_gateway(work, "managed-redis", env, ready_path="/health")
    try:
        first = redis_child(gw.proc.pid)
        assert first is not None and pings(port), "flock serve did not start redis-server"
        wait_for(lambda: httpx.get(f"{gw.url}/ready", timeout=5).json()["redis"] is True, 10)

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: redis_child(gw.proc.pid) not in (None, first) and pings(port), 20)
        assert gw.proc.poll() is None
        wait_for(lambda: httpx.get(f"{gw.url}/ready", timeout=5).json()["redis"] is True, 10)
        assert "redis-server exited" in gw.log.read_text()
        second = redis_child(gw.proc.pid)
    finally:
        stop_gateway(gw)  # SIGTERM
    assert gw.proc.returncode == 0
    wait_for(lambda: not pings(port) and not any(pid == second and state != "Z"
                                                  for pid, state, *_ in processes()), 10)
