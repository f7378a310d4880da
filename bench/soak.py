"""`flock soak`: mixed traffic for minutes while faults strike, and an account of every request.

The stack is real: redis-server, two `flock serve` replicas sharing it, and vLLM. Replica A manages the vLLM
(its supervisor restarts it); replica B uses A's vLLM. With `backend` given, both use that vLLM instead and the
vLLM fault is left out (the short version in `make test` does that: vLLM's kill-and-restart is covered by
tests/integration/test_failover.py, and one more vLLM start would cost the suite a minute).

Traffic: every routing mode, an expert by name, the base model, the Responses API, random sampling parameters,
streamed and not, clients that hang up mid-stream, and experts registered and removed.

Faults, one at a time at random moments, each opening a *documented window* in which some errors are expected:
- `redis`: redis-server SIGKILLed, restarted empty on the same port. Expected: none (the gateways work from
  memory and re-publish the pool when Redis is back).
- `replica`: replica B SIGKILLed, restarted. Expected: transport errors on requests sent to B.
- `vllm`: the vLLM SIGKILLed; A's supervisor restarts it. Expected: 503 backend_unavailable, streams ending with
  backend_stream_broken, and 503 on registrations (the adapter cannot be checked on a backend).
- `expert`: one registered expert's weights replaced by a truncated copy, repaired later. Expected: 503
  expert_unavailable or 502 adapter_load_failed on requests naming that expert; auto-routed ones never fail.
An error outside its window is a finding; the goal is 0. Disk use, RSS and open files are sampled throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.stack import gateway_env, say
from router.decision import ALWAYS_MIX
from service.processes import ManagedProcess, free_port, redis_command, wait_http, wait_redis
from service.settings import Settings
from training.tasks import TASKS

MODES = ("global", "merge", "glider", "arrow", "phatgoose")
FAULTS = ("redis", "replica", "expert", "vllm")
VICTIM = "soak-victim"  # the expert whose files the `expert` fault corrupts
TRANSPORT = "transport"  # the error code given to a connection refused, reset or cut


@dataclass
class Outcome:
    t0: float
    t1: float
    replica: int
    kind: str  # auto:<mode> | expert | victim | base | responses | register | remove
    stream: bool
    status: int | None  # None: no HTTP status (transport error) or a stream that broke
    code: str = ""  # OpenAI error code, TRANSPORT, or "disconnected" for a client that hung up on purpose


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0  # when the stack was whole again (plus a grace period)


@dataclass
class Sample:
    t: float
    disk_mb: float
    rss_mb: dict[str, float]
    open_files: dict[str, int]


@dataclass
class SoakReport:
    seconds: float
    requests: int
    outcomes: dict[str, int]
    ok_by_kind: dict[str, int]  # successful requests per kind (auto:<mode>, expert, register, remove, ...)
    faults: list[dict]
    unexplained: int  # errors outside every documented window: the goal is 0
    unexplained_examples: list[dict]
    explained: int
    unexplained_by: dict[str, int]  # "kind status code" -> count, over every unexplained error
    unexplained_by_minute: dict[int, int]  # minute of the run -> count: where they cluster
    resources: dict[str, dict[str, float]]  # series name -> first, last, max
    pool_intact: bool
    samples: list[Sample] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("samples")
        return out


# ----------------------------------------------------------------------------------------------- processes


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every live process, from /proc/*/stat."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found.append((int(entry.name), fields[0], int(fields[1]), int(fields[2])))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _proc_children(pid: int) -> list[int]:
    return [p for p, _, ppid, _ in _processes() if ppid == pid]


def _group(pgid: int) -> list[int]:
    return [p for p, state, _, group in _processes() if group == pgid and state != "Z"]


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _disk_mb(paths: list[Path]) -> float:
    total = 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
    return total / 2**20


class SoakStack:
    """redis-server, replica A (manages vLLM unless `backend` is given) and replica B, all restartable."""

    def __init__(self, settings: Settings, library: Path, work: Path, backend: str | None):
        self.settings, self.library, self.work, self.external = settings, Path(library).resolve(), work, backend
        work.mkdir(parents=True, exist_ok=True)
        self.experts = work / "experts"  # victim and churn copies; an expert root of both replicas
        self.experts.mkdir(exist_ok=True)
        self.redis_port = free_port()
        self.redis = ManagedProcess("redis-server", redis_command(self.redis_port, work), log_file=work / "redis.log")
        self.vllm_url = backend.rstrip("/") if backend else f"http://127.0.0.1:{free_port()}"
        self.replicas: list[ManagedProcess] = []
        self.urls: list[str] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _gateway(self, i: int) -> ManagedProcess:
        port = int(self.urls[i].rsplit(":", 1)[1]) if i < len(self.urls) else free_port()
        manages_vllm = i == 0 and not self.external
        env = gateway_env(self.settings, library=self.library, backend="" if manages_vllm else self.vllm_url,
                          redis_url=f"redis://127.0.0.1:{self.redis_port}/0", state_dir=self.work / f"state{i}",
                          port=port)
        env["FLOCK_EXPERT_ROOTS"] += f",{self.experts}"
        env["FLOCK_LOG_LEVEL"] = "info"
        if manages_vllm:
            env["FLOCK_VLLM_PORT"] = self.vllm_url.rsplit(":", 1)[1]
        if i == len(self.urls):
            self.urls.append(f"http://127.0.0.1:{port}")
        return ManagedProcess(f"gateway{i}", [sys.executable, "-m", "cli", "serve"], env,
                              log_file=self.work / f"gateway{i}.log")

    def _start(self) -> None:
        self.redis.start()
        wait_redis(self.redis_port)
        for i in range(2):
            gw = self._gateway(i)
            self.replicas.append(gw)
            say(f"starting replica {i} (log {gw.log_file})")
            gw.start()
            if i == 0 and not self.external:
                wait_http(f"{self.vllm_url}/health", 900, gw, "vLLM managed by replica 0")
            wait_http(f"{self.urls[i]}/ready", 300, gw, f"replica {i}")

    # The faults. Each returns once the stack is whole again.
    def restart_redis(self, down_s: float) -> None:
        assert self.redis.proc is not None
        os.killpg(self.redis.proc.pid, signal.SIGKILL)
        self.redis.proc.wait()
        time.sleep(down_s)
        self.redis.start()
        wait_redis(self.redis_port)

    def restart_replica(self, down_s: float) -> None:
        b = self.replicas[1]
        assert b.proc is not None
        os.killpg(b.proc.pid, signal.SIGKILL)
        b.proc.wait()
        time.sleep(down_s)
        self.replicas[1] = self._gateway(1)
        self.replicas[1].start()
        wait_http(f"{self.urls[1]}/ready", 300, self.replicas[1], "replica 1")

    def vllm_pid(self) -> int | None:
        a = self.replicas[0].proc
        if a is None or self.external:
            return None
        for pid in _proc_children(a.pid):
            try:
                if b"vllm.entrypoints" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                pass
        return None

    def kill_vllm(self) -> None:
        pid = self.vllm_pid()
        if pid is None:
            raise RuntimeError("no vLLM child of replica 0 to kill")
        os.killpg(pid, signal.SIGKILL)
        time.sleep(2)
        wait_http(f"{self.vllm_url}/health", 900, None, "vLLM after its restart")
        for url in self.urls:  # both gateways have taken the backend back
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not _backends_up(url):
                time.sleep(0.5)

    def sample(self, t: float) -> Sample:
        rss, files = {}, {}
        for i, gw in enumerate(self.replicas):
            if gw.proc is not None and gw.proc.poll() is None:
                rss[f"gateway{i}"] = _rss_mb([gw.proc.pid])
                files[f"gateway{i}"] = _open_files(gw.proc.pid)
        pid = self.vllm_pid()
        if pid is not None:
            rss["vllm"] = _rss_mb(_group(pid))
        if self.redis.proc is not None and self.redis.proc.poll() is None:
            rss["redis"] = _rss_mb([self.redis.proc.pid])
        disk = _disk_mb([self.work / "state0", self.work / "state1", self.experts])
        return Sample(t, round(disk, 2), {k: round(v, 1) for k, v in rss.items()}, files)

    def close(self) -> None:
        for proc in reversed(self.replicas):
            proc.stop()
        self.redis.stop()


def _backends_up(url: str) -> bool:
    try:
        return all(httpx.get(f"{url}/ready", timeout=2).json().get("backends", {}).values())
    except (httpx.HTTPError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------- traffic


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"].get("code") or "error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unparsed"


class Traffic:
    """Concurrent clients over both replicas, and one thread that registers and removes experts."""

    def __init__(self, stack: SoakStack, clients: int, seed: int):
        self.stack, self.clients, self.rng = stack, clients, random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.prompts = [e.prompt for t in TASKS.values() for e in t.generate("test", 6, seed)]
        self.prompts += ["Write a haiku about autumn.", "Who wrote Hamlet?", "Give me a tip for sleeping well."]
        self.experts = sorted(p.name for p in stack.library.iterdir() if (p / "card.json").is_file())
        self.stop = threading.Event()
        self.faults_done = threading.Event()

    def body(self, rng: random.Random, kind: str, stream: bool) -> dict:
        body: dict = {"messages": [{"role": "user", "content": rng.choice(self.prompts)}],
                      "max_tokens": rng.randint(1, 12), "temperature": rng.choice([0, 0.5, 1.0]),
                      "top_p": rng.choice([None, 0.9, 1.0]), "seed": rng.randint(0, 1000), "stream": stream}
        body = {k: v for k, v in body.items() if v is not None}
        if kind.startswith("auto:"):
            mode = kind.split(":", 1)[1]
            body["model"] = "auto"
            routing: dict = {"mode": mode}
            if mode != "global":
                routing["top_k"] = rng.choice([2, 3])
            if mode == "glider":
                routing["solo_margin"] = ALWAYS_MIX  # a gated composite, not the one expert a sure query gets
            body["routing"] = routing
        elif kind == "expert":
            body["model"] = rng.choice(self.experts)
        elif kind == "victim":
            body["model"] = VICTIM
        else:
            body["model"] = self.stack.settings.base_model_name
        return body

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        replica = rng.randrange(len(self.stack.urls))
        url = self.stack.urls[replica]
        kind = rng.choices(["auto:global", "auto:merge", "auto:glider", "auto:arrow", "auto:phatgoose", "expert",
                            "victim", "base", "responses"], [25, 10, 10, 5, 5, 15, 5, 10, 5])[0]
        stream = rng.random() < 0.4
        hang_up = stream and rng.random() < 0.25
        out = Outcome(time.monotonic(), 0.0, replica, kind, stream, None)
        try:
            if kind == "responses":
                path = "/v1/responses"
                body: dict = {"model": "auto", "input": rng.choice(self.prompts), "max_output_tokens": 8,
                              "stream": stream}
            else:
                path, body = "/v1/chat/completions", self.body(rng, kind, stream)
            if stream:
                async with client.stream("POST", url + path, json=body) as r:
                    out.status = r.status_code
                    data = b""
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if hang_up and b"data: " in data:
                            out.code = "disconnected"
                            break
                    if r.status_code != 200:
                        out.code = _error_code(data)
                    elif not out.code and b"backend_stream_broken" in data:
                        out.status, out.code = None, "backend_stream_broken"
                    elif not out.code and path.endswith("completions") and b"data: [DONE]" not in data:
                        out.status, out.code = None, "stream_cut"
            else:
                r = await client.post(url + path, json=body)
                out.status = r.status_code
                if r.status_code != 200:
                    out.code = _error_code(r.content)
        except httpx.HTTPError:
            out.status, out.code = None, TRANSPORT
        out.t1 = time.monotonic()
        self.outcomes.append(out)
        if out.status == 503 or out.code == TRANSPORT:
            await asyncio.sleep(0.5)  # as a client honouring Retry-After would; keeps the count meaningful

    def running(self, deadline: float) -> bool:
        """Until `deadline`, and past it until every planned fault has struck and the stack is whole again."""
        return time.monotonic() < deadline or not self.faults_done.is_set()

    async def clients_loop(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(180, connect=5)) as client:
            async def loop(i: int) -> None:
                rng = random.Random(self.rng.random() + i)
                while self.running(deadline):
                    await self.one(client, rng)
            await asyncio.gather(*(loop(i) for i in range(self.clients)))

    def churn(self, deadline: float) -> None:
        """Register a copy of a library expert under a new name, remove it a moment later; every few seconds."""
        rng, k = random.Random(11), 0
        with httpx.Client(timeout=180) as client:
            while self.running(deadline - 10) and not self.stop.is_set():
                k += 1
                name = f"soak-churn-{k}"
                path = copy_expert(self.stack.library / rng.choice(self.experts), self.stack.experts / name, name)
                replica = rng.randrange(len(self.stack.urls))
                base = self.stack.urls[replica]
                registered = self.pool_change(client, replica, "register", "POST", f"{base}/v1/experts",
                                              {"path": str(path)})
                if registered:
                    time.sleep(rng.uniform(1, 3))  # auto-routed traffic may pick it meanwhile
                # The pool must end clean: a removal is retried, and also sent when the registration's answer was
                # lost (it may have landed); then a 404 means there was nothing (left) to remove.
                for attempt in range(30):
                    if self.pool_change(client, replica, "remove", "DELETE", f"{base}/v1/experts/{name}", None,
                                        gone_ok=attempt > 0 or not registered):
                        break
                    time.sleep(2)
                shutil.rmtree(path, ignore_errors=True)
                self.stop.wait(rng.uniform(2, 6))

    def pool_change(self, client: httpx.Client, replica: int, kind: str, method: str, url: str, body: dict | None,
                    gone_ok: bool = False) -> bool:
        """One registration or removal, recorded; True when it landed."""
        out = Outcome(time.monotonic(), 0.0, replica, kind, False, None)
        try:
            r = client.request(method, url, json=body)
            out.status = r.status_code
            if r.status_code not in (200, 201, 204):
                out.code = _error_code(r.content)
        except httpx.HTTPError:
            out.code = TRANSPORT
        out.t1 = time.monotonic()
        if gone_ok and out.status == 404:
            out.status, out.code = 204, ""
        self.outcomes.append(out)
        return out.status in (200, 201, 204)


def copy_expert(src: Path, dst: Path, name: str) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card["name"] = name
    (dst / "card.json").write_text(json.dumps(card, indent=2))
    return dst


# ---------------------------------------------------------------------------------------------- accounting

# Per fault kind: which outcomes its window explains, as (outcome kinds, replica or None for any, codes).
EXPLAINED: dict[str, tuple[set[str] | None, int | None, set[str]]] = {
    "redis": (None, None, set()),
    "replica": (None, 1, {TRANSPORT, "stream_cut"}),
    "vllm": (None, None, {"backend_unavailable", "routing_mode_unavailable", "backend_stream_broken", "stream_cut",
                          "adapter_load_failed",
                          "composite_build_failed", "backend_error", "backend_timeout"}),
    "expert": ({"victim"}, None, {"expert_unavailable", "adapter_load_failed"}),
}


def explained(o: Outcome, faults: list[Fault]) -> bool:
    for f in faults:
        kinds, replica, codes = EXPLAINED[f.kind]
        if (o.t0 <= f.end and o.t1 >= f.start and o.code in codes and (kinds is None or o.kind in kinds)
                and (replica is None or o.replica == replica)):
            return True
    return False


# Answers that are a documented limit doing its job, not a failure, at any time: a key's share of new
# composites per minute (FLOCK_COMPOSITE_BUILDS_PER_MIN), which varied merge/glider traffic does reach.
LIMITS = {(429, "composite_rate_limited")}


def account(outcomes: list[Outcome], faults: list[Fault]) -> tuple[Counter, list[Outcome], int]:
    by: Counter = Counter()
    unexplained, n_explained = [], 0
    for o in outcomes:
        ok = o.status in (200, 201, 204) and o.code in ("", "disconnected")
        by["disconnected" if o.code == "disconnected" else "ok" if ok else f"{o.status}:{o.code}"] += 1
        if ok or (o.status, o.code) in LIMITS:
            continue
        if explained(o, faults):
            n_explained += 1
        else:
            unexplained.append(o)
    return by, unexplained, n_explained


# --------------------------------------------------------------------------------------------------- run


def run(settings: Settings, library: Path, work: Path, seconds: float, *, backend: str | None = None,
        clients: int = 6, faults: tuple[str, ...] = FAULTS, seed: int = 1, sample_every_s: float = 5.0,
        grace_s: float = 5.0) -> SoakReport:
    if backend:
        faults = tuple(f for f in faults if f != "vllm")
    stack = SoakStack(settings, library, work, backend)
    try:
        return _soak(stack, seconds, clients, faults, seed, sample_every_s, grace_s)
    finally:
        stack.close()


def _soak(stack: SoakStack, seconds: float, clients: int, fault_kinds: tuple[str, ...], seed: int,
          sample_every_s: float, grace_s: float) -> SoakReport:
    victim = copy_expert(stack.library / sorted(os.listdir(stack.library))[0], stack.experts / VICTIM, VICTIM)
    r = httpx.post(f"{stack.urls[0]}/v1/experts", json={"path": str(victim)}, timeout=180)
    if r.status_code != 201:
        raise RuntimeError(f"could not register {VICTIM}: {r.status_code} {r.text}")
    deadline = time.monotonic() + 60
    while not all(_victim_serves(url, stack.settings) for url in stack.urls):  # replica 1 has synced the pool
        if time.monotonic() > deadline:
            raise RuntimeError(f"{VICTIM} did not become servable on both replicas within 60 s")
        time.sleep(0.5)
    traffic = Traffic(stack, clients, seed)
    start = time.monotonic()
    deadline = start + seconds
    samples: list[Sample] = []
    faults: list[Fault] = []
    rng = random.Random(seed)
    # Faults spread over the run: one slot each, in a random order, at a random moment inside its slot.
    order = list(fault_kinds) * max(1, int(seconds // (60 * len(fault_kinds) or 1)))
    rng.shuffle(order)
    slot = (seconds - 20) / max(1, len(order))
    plan = [(start + 10 + i * slot + rng.uniform(0, slot * 0.4), kind) for i, kind in enumerate(order)]

    def faults_thread() -> None:
        """Each planned fault strikes (late, if the one before took long to recover; the run waits for it)."""
        try:
            for at, kind in plan:
                while time.monotonic() < at and not traffic.stop.is_set():
                    time.sleep(0.2)
                if traffic.stop.is_set():
                    return
                fault = Fault(kind, time.monotonic())
                say(f"fault: {kind}")
                try:
                    strike(stack, kind)
                finally:
                    fault.end = time.monotonic() + grace_s
                    faults.append(fault)
                    say(f"fault: {kind} over after {fault.end - fault.start - grace_s:.1f} s")
            time.sleep(grace_s)  # traffic on the whole stack after the last fault too
        finally:
            traffic.faults_done.set()

    def sampler() -> None:
        while not traffic.stop.is_set():
            samples.append(stack.sample(time.monotonic() - start))
            traffic.stop.wait(sample_every_s)

    threads = [threading.Thread(target=f, daemon=True) for f in (faults_thread, sampler)]
    threads.append(threading.Thread(target=traffic.churn, args=(deadline,), daemon=True))
    for t in threads:
        t.start()
    try:
        asyncio.run(traffic.clients_loop(deadline))
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(timeout=900)
    samples.append(stack.sample(time.monotonic() - start))
    by, unexplained, n_explained = account(traffic.outcomes, faults)
    return SoakReport(
        seconds=round(time.monotonic() - start, 1), requests=len(traffic.outcomes), outcomes=dict(by),
        ok_by_kind=dict(Counter(o.kind for o in traffic.outcomes if o.status in (200, 201, 204) and not o.code)),
        faults=[{"kind": f.kind, "at_s": round(f.start - start, 1), "window_s": round(f.end - f.start, 1)}
                for f in faults],
        unexplained=len(unexplained),
        unexplained_examples=[{**asdict(o), "t0": round(o.t0 - start, 2), "t1": round(o.t1 - start, 2)}
                              for o in unexplained[:20]],
        explained=n_explained,
        unexplained_by=dict(Counter(f"{o.kind} {o.status} {o.code}" for o in unexplained).most_common()),
        unexplained_by_minute=dict(sorted(Counter(int((o.t0 - start) // 60) for o in unexplained).items())),
        resources=summarise(samples), pool_intact=pool_intact(stack, traffic.experts), samples=samples)


def strike(stack: SoakStack, kind: str) -> None:
    if kind == "redis":
        stack.restart_redis(down_s=3)
    elif kind == "replica":
        stack.restart_replica(down_s=2)
    elif kind == "vllm":
        stack.kill_vllm()
    elif kind == "expert":
        weights = stack.experts / VICTIM / "adapter_model.safetensors"
        good = weights.read_bytes()
        # Replaced, not rewritten in place: truncating an adapter file vLLM had loaded killed vLLM's worker with
        # SIGBUS in the soak (vLLM reads adapters through memory maps; see docs/operations.md).
        _replace(weights, good[: len(good) // 3])
        time.sleep(12)  # the watcher (5 s) quarantines it; requests naming it fail meanwhile
        _replace(weights, good)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the watcher to let it back in on both replicas
            if all(_victim_serves(url, stack.settings) for url in stack.urls):
                return
            time.sleep(1)
    else:
        raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".soak-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _victim_serves(url: str, settings: Settings) -> bool:
    try:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": VICTIM, "messages": [{"role": "user", "content": "1 + 1?"}], "max_tokens": 1})
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def pool_intact(stack: SoakStack, library_experts: list[str]) -> bool:
    """After every fault, both replicas still list the library and the victim, and no churn leftovers."""
    want = set(library_experts) | {VICTIM}
    for url in stack.urls:
        try:
            names = {e["name"] for e in httpx.get(f"{url}/v1/experts", timeout=10).json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        if not want <= names or any(n.startswith("soak-churn-") for n in names):
            say(f"pool on {url}: missing {sorted(want - names)}, extra {sorted(n for n in names if 'churn' in n)}")
            return False
    return True


def summarise(samples: list[Sample]) -> dict[str, dict[str, float]]:
    series: dict[str, list[float]] = {"disk_mb": [s.disk_mb for s in samples]}
    for s in samples:
        for k, v in s.rss_mb.items():
            series.setdefault(f"rss_mb.{k}", []).append(v)
        for k, v in s.open_files.items():
            series.setdefault(f"open_files.{k}", []).append(float(v))
    return {k: {"first": v[0], "last": v[-1], "max": max(v)} for k, v in series.items() if v}


def chart(report: SoakReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in report.samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s.disk_mb for s in report.samples])
    axes[0].set_ylabel("state dirs (MB)")
    for name in sorted({k for s in report.samples for k in s.rss_mb}):
        axes[1].plot(t, [s.rss_mb.get(name, float("nan")) for s in report.samples], label=name)
    axes[1].set_ylabel("RSS (MB)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, loc="upper left")
    for name in sorted({k for s in report.samples for k in s.open_files}):
        axes[2].plot(t, [s.open_files.get(name, float("nan")) for s in report.samples], label=name)
    axes[2].set_ylabel("open files")
    axes[2].legend(fontsize=7, loc="upper left")
    axes[2].set_xlabel("minutes")
    colours = {"redis": "tab:red", "replica": "tab:purple", "vllm": "tab:orange", "expert": "tab:green"}
    for f in report.faults:
        for ax in axes:
            ax.axvspan(f["at_s"] / 60, (f["at_s"] + f["window_s"]) / 60, color=colours[f["kind"]], alpha=0.2)
    fig.suptitle(f"flock soak: {report.requests} requests in {report.seconds / 60:.0f} min, "
                 f"{len(report.faults)} faults (shaded), {report.unexplained} unexplained errors", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
