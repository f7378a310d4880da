"""`flock bench --peer litellm`: the gateway beside a LiteLLM proxy, both in front of the same instant fake backend
(bench/fake_backend.py) and driven by the same load generator (wrk) at increasing concurrency.

- flock: `flock serve` with routing on a cache hit (model "auto", one prompt repeated, so every decision comes
  from the routing cache).
- LiteLLM: `litellm --config <generated>` from its own virtualenv (`make peer-litellm`; litellm[proxy] pins
  packages that conflict with flock's), forwarding to the fake backend with no routing.
- direct: the fake backend itself, so "added" latency is a gateway's percentile minus the direct percentile at
  the same concurrency, measured with the same generator.

wrk is a C event loop: the bench records the CPU it used per run, and its rate against the fake backend directly,
so the report can show that the generator was not what limited either gateway.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from service.settings import REPO_ROOT, Settings

PEER_VERSION = "litellm[proxy]==1.80.0"
DEFAULT_VENV = REPO_ROOT / ".venv-litellm"
ADDED_P99_LIMIT_MS = 20.0
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 4, 16)
PROMPT = "Give me a recipe for banana bread, please. Order hit."  # routes to cooking; repeated: a cache hit
DIRECT_MODEL = "cooking"
LITELLM_LOG_CONFIG = {  # uvicorn's loggers at WARNING: no access log line per request (flock serve writes none either)
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
}
# LiteLLM as its production guide has it (no debug logging, no .env loading), with no network at start-up.
LITELLM_ENV = {"LITELLM_MODE": "PRODUCTION", "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
GOALS = [("gateway_vs_litellm_rps_ratio", ">=", 1.5), ("gateway_vs_litellm_added_ratio", "<=", 1.0)]


class PeerMissing(RuntimeError):
    """The peer (LiteLLM's virtualenv) or the load generator (wrk) is not installed; the message says how."""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- what the run needs -----------------------------------------------------------------------------------
def litellm_executable(venv: Path) -> Path:
    """The `litellm` command in `venv`, or PeerMissing saying how to make it."""
    exe = Path(venv) / "bin" / "litellm"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise PeerMissing(
            f"LiteLLM is not installed at {exe}. `flock bench --peer litellm` runs it from its own virtualenv "
            f"({PEER_VERSION} pins packages that conflict with flock's): run `make peer-litellm` (or "
            f"`bash scripts/peer_litellm.sh`) to create {DEFAULT_VENV.name}/ and install wrk, or pass --peer-venv DIR.")
    return exe


def wrk_executable() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        raise PeerMissing("wrk, the bench's load generator, is not installed: run `make peer-litellm` (installs it "
                          "with apt-get as root) or install it yourself (apt-get install wrk; brew install wrk).")
    return exe


def litellm_config(backend: str, model: str = DIRECT_MODEL) -> str:
    """LiteLLM's proxy config: one OpenAI-compatible model forwarded to `backend`'s /v1, no routing, no database,
    no callbacks. JSON is YAML, so no YAML writer is needed."""
    config = {
        "model_list": [{"model_name": model,
                        "litellm_params": {"model": f"openai/{model}", "api_base": f"{backend.rstrip('/')}/v1",
                                           "api_key": "none"}}],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        "general_settings": {},
    }
    return json.dumps(config, indent=2) + "\n"


def request_body(model: str, prompt: str = PROMPT) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1})


WRK_SCRIPT = """-- written by bench/peer.py: one POST, repeated; done() prints what the bench reads as one JSON line
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('FLOCK_WRK {{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "errors": %d}}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_script(body: str) -> str:
    if "]==]" in body:
        raise ValueError("the request body cannot hold the Lua long-string terminator ]==]")
    return WRK_SCRIPT.format(body=body)


# --- one measurement ----------------------------------------------------------------------------------
@dataclass
class Point:
    """One wrk run: a target at one concurrency."""

    target: str
    concurrency: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    wrk_cpu: float  # wrk's CPU seconds over the run's wall seconds: 1.0 is one core busy
    cpu_ms_per_request: float = float("nan")  # the target's own CPU (its processes) per answered request


def parse_wrk(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("FLOCK_WRK "):
            return json.loads(line[len("FLOCK_WRK "):])
    raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")


def group_cpu_s(pgids: list[int]) -> float:
    """CPU seconds (user + system) of every live process in these process groups, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in pgids:  # after the name: state, ppid, pgrp, ..., utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def run_wrk(wrk: str, script: Path, url: str | list[str], target: str, concurrency: int, seconds: float,
            pgids: list[int] | None = None) -> Point:
    """wrk with one thread (a C event loop; one is plenty below 64 connections) for `seconds`, its CPU time read
    from the kernel's accounting of the child; the target's CPU from its process groups (`pgids`). Several URLs
    (gateway processes side by side): one wrk each, at the same time, sharing the connections; the point sums
    their rates and takes the worst of their percentiles."""
    urls = [url] if isinstance(url, str) else url
    cpu0 = group_cpu_s(pgids) if pgids else 0.0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([wrk, "-t1", f"-c{max(1, concurrency // len(urls))}", f"-d{max(1, round(seconds))}s",
                               "-T10s", "-s", str(script), u], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for u in urls]
    summaries, wrk_cpu_s = [], 0.0
    for proc in procs:
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-2000:]}")
        summaries.append(parse_wrk(out))
        wrk_cpu_s += usage.ru_utime + usage.ru_stime
    wall = time.perf_counter() - t0
    cpu = group_cpu_s(pgids) - cpu0 if pgids else float("nan")
    requests = sum(s["requests"] for s in summaries)

    def worst(key: str) -> float:
        return max(s[key] for s in summaries) / 1e3

    return Point(target=target, concurrency=concurrency,
                 rps=sum(s["requests"] / (max(s["duration_us"], 1) / 1e6) for s in summaries),
                 p50_ms=worst("p50_us"), p90_ms=worst("p90_us"), p99_ms=worst("p99_us"), max_ms=worst("max_us"),
                 requests=requests, errors=sum(s["errors"] for s in summaries) or int(requests == 0),
                 wrk_cpu=wrk_cpu_s / wall, cpu_ms_per_request=cpu * 1e3 / max(1, requests))


# --- the figures ----------------------------------------------------------------------------------------
def litellm_target(workers: int) -> str:
    return f"litellm-{workers}w"


def added(points: list[Point], target: str) -> dict[int, tuple[float, float]]:
    """Per concurrency: (p50, p99) of `target` minus the direct run's at the same concurrency, in ms."""
    direct = {p.concurrency: p for p in points if p.target == "direct" and p.requests}
    return {p.concurrency: (p.p50_ms - direct[p.concurrency].p50_ms, p.p99_ms - direct[p.concurrency].p99_ms)
            for p in points if p.target == target and p.concurrency in direct and p.requests}


def sustained_rps(points: list[Point], target: str, limit_ms: float = ADDED_P99_LIMIT_MS) -> float:
    """The highest rate `target` reached at a concurrency where its p99 added latency stayed within limit_ms and
    no request failed; 0 when none did."""
    extra = added(points, target)
    ok = [p.rps for p in points if p.target == target and p.concurrency in extra
          and extra[p.concurrency][1] <= limit_ms and p.errors == 0]
    return max(ok, default=0.0)


def peak_rps(points: list[Point], target: str) -> float:
    """The highest rate `target` reached at any concurrency without a failed request, whatever its latency."""
    return max((p.rps for p in points if p.target == target and p.errors == 0), default=0.0)


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(points: list[Point]) -> dict:
    """The two goal ratios, the best flock configuration measured against the best LiteLLM one (the highest
    sustained rate; the lowest p50 added latency at concurrency 1), and every target's figures."""
    targets = list(dict.fromkeys(p.target for p in points if p.target != "direct"))
    by_target = {}
    for t in targets:
        mine = [p for p in points if p.target == t]
        by_target[t] = {"sustained_rps": sustained_rps(points, t), "peak_rps": peak_rps(points, t),
                        "added_ms_p50_c1": added(points, t).get(1, (float("nan"), 0.0))[0],
                        "cpu_ms_per_request_median": statistics.median(p.cpu_ms_per_request for p in mine)}

    def best(prefix: str, key: str, pick=max, default: float = 0.0) -> float:
        values = [by_target[t][key] for t in targets if t.startswith(prefix) and not math.isnan(by_target[t][key])]
        return pick(values, default=default)

    nan = float("nan")
    flock = {"sustained_rps": best("flock", "sustained_rps"), "peak_rps": best("flock", "peak_rps"),
             "added_ms_p50_c1": best("flock", "added_ms_p50_c1", min, nan)}
    best_rps, best_peak = best("litellm", "sustained_rps"), best("litellm", "peak_rps")
    best_added = best("litellm", "added_ms_p50_c1", min, nan)
    direct = [p for p in points if p.target == "direct"]
    return {
        "gateway_vs_litellm_rps_ratio": ratio(flock["sustained_rps"], best_rps),
        "gateway_vs_litellm_added_ratio": ratio(flock["added_ms_p50_c1"], best_added),
        # The highest rates whatever the latency: a ratio still defined when LiteLLM never meets the p99 limit.
        "gateway_vs_litellm_peak_rps_ratio": ratio(flock["peak_rps"], best_peak),
        "flock_sustained_rps": flock["sustained_rps"],
        "litellm_sustained_rps": best_rps,
        "flock_added_ms_p50_c1": flock["added_ms_p50_c1"],
        "litellm_added_ms_p50_c1": best_added,
        "direct_max_rps": max((p.rps for p in direct), default=0.0),
        "wrk_cpu_max": max((p.wrk_cpu for p in points), default=0.0),
        "added_p99_limit_ms": ADDED_P99_LIMIT_MS,
        "by_target": by_target,
    }


def table(result: dict) -> str:
    goals = {k: (op, v) for k, op, v in GOALS}
    rows = ["| figure | value | goal |", "|---|---|---|"]
    for key, value in result.items():
        if isinstance(value, float) or key in goals:
            goal = f"{goals[key][0]} {goals[key][1]:g}" if key in goals else ""
            rows.append(f"| `{key}` | {'n/a' if value is None else f'{value:.3f}'} | {goal} |")
    rows += ["", "| concurrency | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | "
             "CPU ms/request | wrk CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    points = [Point(**p) for p in result["points"]]
    extra = {t: added(points, t) for t in {p.target for p in points}}
    for p in sorted(points, key=lambda p: (p.concurrency, p.target)):
        a50, a99 = extra[p.target].get(p.concurrency, (0.0, 0.0))
        rows.append(f"| {p.concurrency} | {p.target} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {a50:.2f} | "
                    f"{a99:.2f} | {p.errors} | {p.cpu_ms_per_request:.2f} | {p.wrk_cpu:.2f} |")
    return "\n".join(rows)


# --- the run --------------------------------------------------------------------------------------------
def flock_target(processes: int) -> str:
    return "flock" if processes == 1 else f"flock-{processes}p"


def run(settings: Settings, venv: Path, *, quick: bool = False, seconds: float | None = None,
        litellm_workers: tuple[int, ...] = (1, 2), flock_processes: tuple[int, ...] = (1, 2)) -> dict:
    """Start the fake backend, redis-server, `flock serve` (8 synthetic experts; as many replicas as the largest of
    `flock_processes`, sharing the Redis) and one LiteLLM proxy per worker count; then for each concurrency run wrk
    against every target in turn (the order rotates per level). flock has one event loop per process; "flock-2p"
    is two `flock serve` processes side by side (what replicas behind a load balancer give on this host), each
    driven by its own wrk with half the connections, against LiteLLM's own `--num_workers`."""
    from bench.run import machine, write_experts
    from bench.stack import gateway_env
    from service.processes import ManagedProcess, free_port, redis_command, wait_http, wait_redis

    litellm = litellm_executable(venv)
    wrk = wrk_executable()
    levels = QUICK_CONCURRENCY if quick else CONCURRENCY
    seconds = seconds or (2.0 if quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="flock-peer-") as tmp:
        work = Path(tmp)
        say("writing 8 synthetic experts for flock's pool")
        library = write_experts(settings, work / "experts")
        taken: set[int] = set()

        def port() -> int:  # free_port() can hand out a port twice before anything binds it
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        fake_port, redis_port = port(), port()
        fake = f"http://127.0.0.1:{fake_port}"
        (work / "litellm.yaml").write_text(litellm_config(fake))
        (work / "litellm-log.json").write_text(json.dumps(LITELLM_LOG_CONFIG))
        procs = {
            "direct": ManagedProcess("fake backend", [sys.executable, "-m", "uvicorn", "bench.fake_backend:app",
                                                      "--port", str(fake_port), "--log-level", "warning",
                                                      "--no-access-log"], log_file=work / "fake.log"),
            "redis": ManagedProcess("redis-server", redis_command(redis_port, work)),
        }
        gateways = [f"flock-{i}" for i in range(max(flock_processes))]
        gw_urls = []
        for name in gateways:
            gw_port = port()
            procs[name] = ManagedProcess(name, [sys.executable, "-m", "cli", "serve"],
                                         gateway_env(settings, library=library, backend=fake,
                                                     redis_url=f"redis://127.0.0.1:{redis_port}/0",
                                                     state_dir=work / name, port=gw_port),
                                         log_file=work / f"{name}.log")
            gw_urls.append(f"http://127.0.0.1:{gw_port}")
        urls: dict[str, list[str]] = {"direct": [fake]}
        models = {"direct": DIRECT_MODEL}
        for n in flock_processes:
            urls[flock_target(n)], models[flock_target(n)] = gw_urls[:n], "auto"
        for n in litellm_workers:
            t, peer_port = litellm_target(n), port()
            procs[t] = ManagedProcess(f"LiteLLM ({n} workers)", [
                str(litellm), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(peer_port),
                "--num_workers", str(n), "--telemetry", "False", "--log_config", str(work / "litellm-log.json")],
                {**os.environ, **LITELLM_ENV}, log_file=work / f"{t}.log")
            urls[t], models[t] = [f"http://127.0.0.1:{peer_port}"], DIRECT_MODEL
        targets = list(urls)
        peers = [t for t in targets if t.startswith("litellm")]
        points: list[Point] = []
        try:
            procs["direct"].start()
            procs["redis"].start()
            wait_redis(redis_port)
            wait_http(f"{fake}/health", 60, procs["direct"])
            for name in gateways + peers:
                procs[name].start()
            for name, url in zip(gateways, gw_urls):
                wait_http(f"{url}/ready", 180, procs[name], "flock serve")
            for t in peers:
                wait_http(f"{urls[t][0]}/health/liveliness", 180, procs[t], procs[t].name)
            check_targets(urls, models)
            for name in gateways + peers:  # each answered on its own port (none lost its port to another)
                if not procs[name].alive:
                    raise RuntimeError(f"{name} exited; see {procs[name].log_file}")
            # Each process was started in its own session, so its pid is its process group's id (workers included);
            # flock's CPU includes redis-server's, where its routing cache lives.
            pgids = {t: [pid_of(procs[t])] for t in ["direct", *peers]}
            for n in flock_processes:
                pgids[flock_target(n)] = [pid_of(procs[g]) for g in gateways[:n]] + [pid_of(procs["redis"])]
            say(f"process groups whose CPU is counted: {pgids}")
            scripts = {}
            for t in targets:
                scripts[t] = work / f"{t}.lua"
                scripts[t].write_text(wrk_script(request_body(models[t])))
                # Warm-up, not counted: 8 connections reach every worker, whose first requests import lazily.
                run_wrk(wrk, scripts[t], [f"{u}/v1/chat/completions" for u in urls[t]], t, 8, 3)
            for i, c in enumerate(levels):
                k = i % len(targets)
                for t in targets[k:] + targets[:k]:
                    if c < len(urls[t]):  # fewer connections than processes: not measured
                        continue
                    p = run_wrk(wrk, scripts[t], [f"{u}/v1/chat/completions" for u in urls[t]], t, c, seconds,
                                pgids[t])
                    points.append(p)
                    say(f"  c={c:<3} {t:<11} {p.rps:7.0f} req/s  p50 {p.p50_ms:7.2f} ms  p99 {p.p99_ms:7.2f} ms  "
                        f"errors {p.errors}  CPU {p.cpu_ms_per_request:5.2f} ms/req  wrk CPU {p.wrk_cpu:.2f}")
            check_targets(urls, models)  # flock still answers from the routing cache after the load
        finally:
            for proc in reversed(list(procs.values())):
                proc.stop()
    return {**summarize(points), "points": [asdict(p) for p in points],
            "workload": {"concurrency": list(levels), "seconds_per_run": seconds,
                         "generator": "wrk -t1 (keep-alive connections, closed loop)",
                         "body": "chat completion, max_tokens 1; flock: model auto, one prompt (routing cache hit)",
                         "litellm": PEER_VERSION, "litellm_workers": list(litellm_workers),
                         "flock_processes": list(flock_processes),
                         "litellm_env": LITELLM_ENV, "litellm_access_log": False},
            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick}


def pid_of(proc) -> int:
    if proc.proc is None:
        raise RuntimeError(f"{proc.name} was not started")
    return int(proc.proc.pid)


def check_targets(urls: dict[str, list[str]], models: dict[str, str]) -> None:
    """Each target answers the bench's request with 200, and flock's decisions come from the routing cache."""
    with httpx.Client(timeout=30) as client:
        for t, target_urls in urls.items():
            for url in target_urls:
                for _ in range(2):  # the first flock request may fill the cache
                    r = client.post(f"{url}/v1/chat/completions", content=request_body(models[t]),
                                    headers={"content-type": "application/json"})
                if r.status_code != 200:
                    raise RuntimeError(f"{t} ({url}) answered {r.status_code}: {r.text[:500]}")
                if t.startswith("flock") and r.headers.get("x-flock-cache") != "hit":
                    raise RuntimeError(f"flock's routing was not a cache hit ({url}): {dict(r.headers)}")
