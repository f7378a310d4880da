"""Session fixtures: real redis-server, one real vLLM backend (started once), and the flock gateway started with
`flock serve` against them. Experts are small random LoRAs written in the session (not the trained library)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from adapters.card import ExpertCard
from adapters.validate import ModelShape
from service.processes import ManagedProcess, free_port, redis_command, vllm_command, wait_http, wait_redis
from service.settings import Settings
from training.synthetic import write_random_lora

BASE = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parent.parent

# Distinct topics, so the global router has something real to separate.
TEST_EXPERTS = {
    "cooking": ("Cooking and baking help: recipes, bread and pizza dough, pancakes, cakes, boiling eggs, "
                "sauces, pasta, rice and kitchen techniques.",
                ["How long should I boil an egg?", "What can I bake with apples and flour?",
                 "How do I make a tomato sauce for pasta?"]),
    "arith": ("Arithmetic calculator: what is a number plus, minus or times another number; adds, subtracts "
              "and multiplies integers.",
              ["What is 12 times 7?", "Compute 345 plus 289.", "Subtract 17 from 90."]),
    "sqlgen": ("Writes SQL queries over an employees database table with salaries and departments.",
               ["Write a SQL query listing employees in the sales department.",
                "SQL for the average salary per department.", "Query the employees older than 40."]),
}


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    settings = Settings()
    path = settings.resolved_base_model_dir
    if not (path / "config.json").is_file():
        pytest.fail(f"base model not converted at {path}: run `make test` (it runs scripts/setup.sh)")
    return path


@pytest.fixture(scope="session")
def shape(base_model_dir: Path) -> ModelShape:
    return ModelShape.from_model_dir(base_model_dir)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flock")


@pytest.fixture(scope="session")
def expert_root(work: Path, shape: ModelShape) -> Path:
    """Expert root with the test experts (random rank-4 q/v LoRAs) plus spare adapters for registration tests.

    The test experts carry gate signals of both kinds, so the per-token modes (arrow, phatgoose, glider) take
    them as candidates: Arrow prototypes computed from the weights, random PHATGOOSE gate vectors."""
    root = work / "experts"
    for seed, (name, (description, examples)) in enumerate(TEST_EXPERTS.items()):
        path = write_random_lora(root / name, shape=shape, base_name=BASE, seed=seed, strength=0.3,
                                 card=ExpertCard(name=name, description=description, examples=examples))
        write_test_gates(path, seed)
    return root


def write_test_gates(path: Path, seed: int) -> None:
    """Arrow prototypes and random unit PHATGOOSE gate vectors, one per LoRA module of the adapter at `path`."""
    import torch

    from adapters.gates import compute_arrow_gates, load_lora, write_gates

    compute_arrow_gates(path)
    factors, _ = load_lora(path)
    gen = torch.Generator().manual_seed(1000 + seed)
    gates = {m: torch.randn(a.shape[1], generator=gen) for m, (a, _) in factors.items()}
    write_gates(path, "phatgoose", {m: v / v.norm() for m, v in gates.items()}, {"method": "random (tests)"})


@dataclass
class Redis:
    port: int
    proc: ManagedProcess
    next_db: int = 1

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def fresh_url(self) -> str:
        """A database of its own, emptied: a test's gateways must not adopt a pool another test left in Redis
        (database 0 is the session gateway's; redis-server has 16)."""
        db, self.next_db = self.next_db, self.next_db + 1
        if db > 15:
            raise RuntimeError("out of Redis databases for tests (redis-server has 16)")
        with redis.Redis(port=self.port, db=db) as r:
            r.flushdb()
        return f"redis://127.0.0.1:{self.port}/{db}"

    def restart(self) -> None:
        self.proc.stop()
        self.proc.start()
        wait_redis(self.port)


@pytest.fixture(scope="session")
def redis_server(work: Path):
    port = free_port()
    proc = ManagedProcess("redis-server", redis_command(port, work), log_file=work / "redis.log")
    proc.start()
    wait_redis(port)
    yield Redis(port, proc)
    proc.stop()


@pytest.fixture(scope="session")
def vllm_url(work: Path, base_model_dir: Path):
    """One real vLLM OpenAI server (CPU) with LoRA and flock's plugin, for the whole session.

    FLOCK_TEST_VLLM_URL names one already running instead (started with the same settings; it must run this
    checkout's plugin), to save its start-up when running one test file after another while developing."""
    if os.environ.get("FLOCK_TEST_VLLM_URL"):
        url = os.environ["FLOCK_TEST_VLLM_URL"].rstrip("/")
        wait_http(f"{url}/health", 600, None, "vLLM (FLOCK_TEST_VLLM_URL)")
        yield url
        return
    url, proc = start_vllm(work, "vllm", Settings(vllm_max_num_seqs=16, vllm_kvcache_gib=1))
    yield url
    proc.stop()


def start_vllm(work: Path, name: str, settings: Settings, env_extra: dict[str, str] | None = None
               ) -> tuple[str, ManagedProcess]:
    """A real vLLM OpenAI server as `flock serve` starts it (plus `env_extra`), up and answering /health."""
    port = free_port()
    argv, env = vllm_command(settings, port=port)
    proc = ManagedProcess(name, argv, {**env, **(env_extra or {})}, log_file=work / f"{name}.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 600, proc, name)
    except Exception:
        proc.stop()
        print((work / f"{name}.log").read_text()[-5000:], file=sys.stderr)
        raise
    return url, proc


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen
    state_dir: Path
    expert_root: Path
    log: Path

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 120, **kw})


def start_gateway(work: Path, name: str, env_extra: dict[str, str], ready_path: str = "/ready",
                  timeout_s: float = 120) -> Gateway:
    port = free_port()
    state = work / f"state-{name}"
    log = work / f"gateway-{name}.log"
    env = {**os.environ, "FLOCK_STATE_DIR": str(state), "FLOCK_PORT": str(port), "FLOCK_HOST": "127.0.0.1",
           "FLOCK_LIBRARY_DIR": str(work / "no-library"), **env_extra}
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "flock"), "serve"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return Gateway(url, proc, state, Path(env.get("FLOCK_EXPERT_ROOTS", "")), log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"gateway not ready: {log.read_text()[-3000:]}")


def stop_gateway(gw: Gateway) -> None:
    gw.proc.terminate()
    try:
        gw.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        gw.proc.kill()


@pytest.fixture(scope="session")
def gateway(work: Path, vllm_url: str, redis_server: Redis, expert_root: Path):
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.url,
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_MERGE_TEMPERATURE": "0.2"}
    gw = start_gateway(work, "main", env)
    with gw.client() as c:
        for name in TEST_EXPERTS:
            r = c.post("/v1/experts", json={"path": str(expert_root / name)})
            assert r.status_code == 201, r.text
    yield gw
    stop_gateway(gw)


@pytest.fixture
def chat():
    def make(content: str, model: str = "auto", **kw) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                "temperature": 0, **kw}
    return make


def read_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
