"""`flock serve`: start what is missing (redis-server, one vLLM), run the gateway, restart a managed process
that dies, and stop everything on Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import uvicorn

from service import models
from service.app import create_app
from service.processes import CHILD_STOP_S, ManagedProcess, redis_command, vllm_command, wait_http, wait_redis
from service.settings import Settings

log = logging.getLogger("flock.serve")


def _announce_when_ready(settings: Settings, vllm: ManagedProcess | None) -> None:
    url = f"http://{settings.host}:{settings.port}"
    try:
        if vllm is not None:
            log.info("waiting for vLLM to load the base model (about a minute on 2 cores); log: %s", vllm.log_file)
            wait_http(f"{settings.backend_urls[0]}/health", 600, vllm, "vLLM")
        wait_http(f"{url}/ready", 600, None, "gateway")
        log.info("flock is ready: %s/v1 (OpenAI base URL), %s/metrics, model 'auto' routes", url, url)
    except Exception as exc:  # reported, not fatal: the supervisor restarts vLLM
        log.error("vLLM did not become ready: %s", exc)


async def _supervise(processes: list[ManagedProcess], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(2)
        for p in processes:
            if not p.alive and not stop.is_set():
                p.restarts += 1
                log.warning("%s exited (code %s); restarting (restart %d)", p.name,
                            p.proc.returncode if p.proc else "?", p.restarts)
                p.stop()
                try:
                    p.start()
                except OSError as exc:  # e.g. the executable is briefly missing: keep supervising, try again
                    log.error("%s could not be restarted (%s); trying again in 2 s", p.name, exc)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise SystemExit(0)


def serve(settings: Settings) -> None:
    # SIGTERM (docker stop, kill, a test's teardown) must unwind to the `finally` that stops the managed processes.
    # uvicorn shuts down gracefully on it and then raises it again; with the default action the process would die
    # right there and leave vLLM and redis-server running, orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    models.convert_base_model(settings.resolved_base_model_dir, progress=log.info)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    logs = settings.state_dir / "logs"
    logs.mkdir(exist_ok=True)
    managed: list[ManagedProcess] = []
    vllm = None
    try:
        if not settings.redis_url:
            redis = ManagedProcess("redis-server", redis_command(settings.managed_redis_port, settings.state_dir),
                                   log_file=logs / "redis.log")
            redis.start()
            managed.append(redis)
            wait_redis(settings.managed_redis_port)
            settings.redis_url = f"redis://127.0.0.1:{settings.managed_redis_port}/0"
        if not settings.backend_urls:
            argv, env = vllm_command(settings)
            vllm = ManagedProcess("vLLM", argv, env, log_file=logs / "vllm.log")
            vllm.start()
            managed.append(vllm)
            settings.backend_urls = [f"http://127.0.0.1:{settings.vllm_port}"]
        threading.Thread(target=_announce_when_ready, args=(settings, vllm), daemon=True).start()
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=5)
        # The config's loop factory: uvloop when installed (it comes with vLLM). asyncio.run alone would give the
        # slower default loop, since uvicorn chooses the loop only when it runs the server itself.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(_run(config, managed))
    finally:
        for p in reversed(managed):
            p.stop(CHILD_STOP_S)  # a hung vLLM is killed, within the time its own supervisor waits for us


async def _run(config: uvicorn.Config, managed: list[ManagedProcess]) -> None:
    server = uvicorn.Server(config)
    stop = asyncio.Event()
    supervisor = asyncio.create_task(_supervise(managed, stop))
    try:
        await server.serve()
    finally:
        stop.set()
        supervisor.cancel()
