"""Backend faults with real processes only (vLLM, redis-server, `flock serve`):

- two vLLM backends behind one gateway: each adapter stays on its rendezvous-hash owner while both are up;
  when one is SIGKILLed during traffic (expert and base-model requests, streamed and not), requests fail over to
  the other, the dead one is ejected (/ready, flock_backend_up) and every later request succeeds;
- `flock serve` without FLOCK_BACKEND_URLS restarts the vLLM it manages after a SIGKILL: meanwhile requests get a
  fast 503 with Retry-After (never a hang), afterwards the same expert answers again without a gateway restart
  (its adapter reloaded), and the two-backend gateway takes the restarted backend back.

One extra vLLM serves both: it is the one `flock serve` manages (gateway "managed") and also the second backend of
gateway "pair" (the session vLLM is the first), so one kill exercises fail-over and restart, and only one vLLM
beyond the session's is ever started (about a minute to start on 2 cores, and a minute to restart).
Last, SIGTERM to `flock serve` must stop its vLLM too (uvicorn re-raises the signal after its graceful shutdown,
which used to kill flock before it could stop the processes it manages, leaving them orphaned).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.card import ExpertCard
from tests.conftest import BASE, Gateway, free_port, start_gateway, stop_gateway
from tests.integration.test_disconnect import vllm_metric
from training.synthetic import write_random_lora

pytestmark = pytest.mark.integration

MANAGED_EXPERT = "arith"  # from the session expert root; the managed gateway serves it


def owner(urls: list[str], adapter: str) -> str:
    """The backend BackendPool.candidates puts first for an adapter ("" = base model) when none is saturated."""
    return max(urls, key=lambda u: int.from_bytes(hashlib.blake2b(f"{u}|{adapter}".encode(), digest_size=8).digest(),
                                                     "big"))


def vllm_models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def processes() -> Iterator[tuple[int, str, int, int, bytes]]:
    """(pid, state, ppid, process group, command line) of every live process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid, pgid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            yield int(entry.name), state, int(ppid), int(pgid), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue


def managed_vllm_pid(gateway_pid: int) -> int:
    """The vLLM API server `flock serve` started: its direct child running vllm.entrypoints (the leader of its own
    process group, which holds vLLM's engine and worker processes too)."""
    for pid, _, ppid, _, cmdline in processes():
        if ppid == gateway_pid and b"vllm.entrypoints" in cmdline:
            return pid
    raise AssertionError(f"no vLLM child of flock serve (pid {gateway_pid})")


def group_alive(pgid: int) -> bool:
    return any(g == pgid and state != "Z" for _, state, _, g, _ in processes())


def backend_up_gauge(gw: Gateway, backend: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    match = re.search(rf'^flock_backend_up\{{backend="{re.escape(backend)}"\}} (\S+)$', text, re.M)
    assert match, f"no flock_backend_up for {backend}"
    return float(match.group(1))


def gateway_error_count(gw: Gateway, kind: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    match = re.search(rf'^flock_errors_total\{{type="{re.escape(kind)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@dataclass
class Managed:
    gateway: Gateway
    vllm_url: str


@pytest.fixture(scope="module")
def managed(request, work: Path, redis_server, expert_root: Path) -> Iterator[Managed]:
    """`flock serve` with no FLOCK_BACKEND_URLS: it starts (and supervises) its own vLLM. Its own Redis database,
    so its pool registry is not shared with the session gateway's."""
    port = free_port()
    env = {"FLOCK_VLLM_PORT": str(port), "FLOCK_VLLM_KVCACHE_GIB": "1", "FLOCK_VLLM_MAX_NUM_SEQS": "16",
           "FLOCK_REDIS_URL": redis_server.fresh_url(), "FLOCK_EXPERT_ROOTS": str(expert_root)}
    with ThreadPoolExecutor(1) as ex:
        starting = ex.submit(start_gateway, work, "managed", env, timeout_s=600)
        # When this file runs alone, the session vLLM loads at the same time as the managed one.
        try:
            request.getfixturevalue("vllm_url")
        except BaseException:
            stop_gateway(starting.result())
            raise
        gw = starting.result()
    try:
        with gw.client() as c:
            r = c.post("/v1/experts", json={"path": str(expert_root / MANAGED_EXPERT)})
            assert r.status_code == 201, r.text
        yield Managed(gw, f"http://127.0.0.1:{port}")
    finally:
        stop_gateway(gw)  # flock serve stops its vLLM on SIGTERM


@dataclass
class Pair:
    gateway: Gateway
    urls: list[str]  # [session vLLM, managed vLLM]
    experts: dict[str, str]  # expert name -> the backend url that owns it


@pytest.fixture(scope="module")
def pair(work: Path, redis_server, expert_root: Path, shape, managed: Managed, vllm_url: str) -> Iterator[Pair]:
    """A gateway over two backends: the session vLLM and the managed one. Its experts (names used nowhere else,
    so /v1/models on each vLLM shows where this gateway placed them) are chosen two per owner."""
    urls = [vllm_url, managed.vllm_url]
    experts: dict[str, str] = {}
    i = 0
    while len(experts) < 4:
        name, i = f"fo{i}", i + 1
        if list(experts.values()).count(owner(urls, name)) < 2:
            experts[name] = owner(urls, name)
    for seed, name in enumerate(experts, start=40):
        write_random_lora(expert_root / name, shape=shape, base_name=BASE, seed=seed, strength=0.3,
                          card=ExpertCard(name=name, description=f"Failover test expert {name}."))
    env = {"FLOCK_BACKEND_URLS": ",".join(urls), "FLOCK_REDIS_URL": redis_server.fresh_url(),
           "FLOCK_EXPERT_ROOTS": str(expert_root)}
    gw = start_gateway(work, "pair", env)
    try:
        with gw.client() as c:
            for name in experts:
                r = c.post("/v1/experts", json={"path": str(expert_root / name)})
                assert r.status_code == 201, r.text
        yield Pair(gw, urls, experts)
    finally:
        stop_gateway(gw)


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8,
            "temperature": 0, **kw}


def test_adapters_stay_on_their_rendezvous_owner(pair: Pair):
    with pair.gateway.client() as c:
        for _ in range(3):
            for name in pair.experts:
                r = c.post("/v1/chat/completions", json=chat(name))
                assert r.status_code == 200, r.text
                assert r.json()["model"] == name
    loaded = {url: vllm_models(url) for url in pair.urls}
    for name, url in pair.experts.items():
        assert [u for u in pair.urls if name in loaded[u]] == [url], (name, loaded)


@dataclass
class Outcome:
    model: str
    stream: bool
    sent: float
    done: float
    status: int | None  # None: the connection broke
    streaming_since: float | None = None  # when the first body bytes of a 200 stream arrived
    error: str = ""
    served: str = ""  # the model vLLM answered as (body's or first event's "model")
    experts: str = ""  # the x-flock-experts header


def served_as(model: str) -> tuple[str, str]:
    """(model vLLM answers as, x-flock-experts) for a request to `model`: the expert's own adapter, or none."""
    return (model, "none") if model == BASE else (model, f"{model}=1")


def one_request(client: httpx.Client, model: str, stream: bool, max_tokens: int = 16) -> Outcome:
    out = Outcome(model, stream, time.monotonic(), 0.0, None)
    try:
        if stream:
            with client.stream("POST", "/v1/chat/completions",
                               json=chat(model, stream=True, max_tokens=max_tokens)) as r:
                out.status = r.status_code
                out.experts = r.headers.get("x-flock-experts", "")
                body = b""
                for chunk in r.iter_bytes():
                    if out.streaming_since is None:
                        out.streaming_since = time.monotonic()
                    body += chunk
                first = re.search(rb'^data: (\{.*)$', body, re.M)
                if first and b'"model":' in first.group(1):
                    out.served = json.loads(first.group(1)).get("model", "")
                if r.status_code == 200 and not body.rstrip().endswith(b"data: [DONE]"):
                    out.status = None
                    out.error = "backend_stream_broken" if b'"backend_stream_broken"' in body else body[-300:].decode()
        else:
            r = client.post("/v1/chat/completions", json=chat(model, max_tokens=max_tokens))
            out.status = r.status_code
            out.experts = r.headers.get("x-flock-experts", "")
            if r.status_code != 200:
                out.error = r.text[:300]
            else:
                out.served = r.json()["model"]
    except httpx.HTTPError as exc:
        out.status, out.error = None, f"{type(exc).__name__}: {exc}"
    out.done = time.monotonic()
    return out


def traffic(gw: Gateway, models: list[str], stop: threading.Event, outcomes: list[Outcome], worker: int) -> None:
    """One client in a loop, cycling over models, streamed and not, until stop is set."""
    with gw.client() as client:
        k = worker
        while not stop.is_set():
            outcomes.append(one_request(client, models[k % len(models)], stream=(k // len(models)) % 2 == 1))
            k += 1


def wait_for(predicate, timeout_s: float, every_s: float = 0.2) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_kill_managed_backend_fails_over_then_restarts(pair: Pair, managed: Managed):
    session_url, victim = pair.urls
    gw = pair.gateway
    assert httpx.get(gw.url + "/ready").json()["backends"] == {session_url: True, victim: True}
    models = list(pair.experts) + [BASE]
    victim_models = {m for m in models if owner(pair.urls, "" if m == BASE else m) == victim}

    # 1. Traffic through the pair gateway (the victim's models twice as often); SIGKILL the managed vLLM's API
    # server while it is generating for some of it.
    outcomes: list[Outcome] = []
    stop = threading.Event()
    workers = 6
    mix = [m for m in models for _ in range(2 if m in victim_models else 1)]
    victim_expert = next(m for m in models if m in victim_models and m != BASE)
    broken_before = gateway_error_count(gw, "backend_stream_broken")
    long = Outcome(victim_expert, True, 0.0, 0.0, None)
    long_started = threading.Event()

    def long_stream() -> None:
        """A stream the victim is surely in the middle of when it is killed: it must end with the gateway's
        backend_stream_broken error event."""
        long.sent = time.monotonic()
        try:
            body = chat(victim_expert, stream=True, max_tokens=1000, ignore_eos=True)
            with gw.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
                long.status, body = r.status_code, b""
                for chunk in r.iter_bytes():
                    if long.streaming_since is None and b"data: {" in chunk:
                        long.streaming_since = time.monotonic()
                        long_started.set()
                    body += chunk
            long.error = "backend_stream_broken" if b'"backend_stream_broken"' in body else body[-300:].decode()
        except httpx.HTTPError as exc:
            long.error = f"{type(exc).__name__}: {exc}"
        finally:
            long.done = time.monotonic()
            long_started.set()

    with ThreadPoolExecutor(workers + 1) as pool:
        futures = [pool.submit(traffic, gw, mix, stop, outcomes, w) for w in range(workers)]
        futures.append(pool.submit(long_stream))
        try:
            time.sleep(3)
            assert long_started.wait(60) and long.streaming_since is not None, long
            # ignore_eos keeps it generating all 1000 tokens (a random expert may otherwise stop at once).
            wait_for(lambda: vllm_metric(victim, "vllm:num_requests_running") >= 2, 60, every_s=0.05)
            pid = managed_vllm_pid(managed.gateway.proc.pid)
            assert long.done == 0.0, f"the long stream ended before the kill: {long}"
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)

            # 2. Meanwhile the managed gateway, whose only backend is gone, answers 503 + Retry-After at once.
            with managed.gateway.client() as c:
                start = time.monotonic()
                r = c.post("/v1/chat/completions", json=chat(MANAGED_EXPERT), timeout=30)
                first_503_s = time.monotonic() - start
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.json()["error"]["code"] == "backend_unavailable"

            wait_for(lambda: httpx.get(gw.url + "/ready").json()["backends"][victim] is False, 15)
            ejected_after = time.monotonic() - killed_at
            assert backend_up_gauge(gw, victim) == 0 and backend_up_gauge(gw, session_url) == 1
            assert httpx.get(gw.url + "/ready").status_code == 200  # one backend left is enough
            time.sleep(8)  # traffic goes on, on the survivor
        finally:
            stop.set()  # also when an assertion failed: the clients would loop for ever
    for f in futures:
        f.result()

    before = [o for o in outcomes if o.done < killed_at]
    around = [o for o in outcomes if o.sent <= killed_at <= o.done]
    after = [o for o in outcomes if o.sent > killed_at]
    # Only a stream the victim had already started answering may break: its tokens are lost with the process.
    # They end with the gateway's error event (not a cut connection).
    unavoidable = [o for o in around if o.stream and o.model in victim_models and o.error == "backend_stream_broken"
                   and o.streaming_since is not None and o.streaming_since < killed_at]
    failed = [o for o in outcomes if o.status != 200 and o not in unavoidable]
    failed_over = gw.log.read_text().count("unreachable (")
    print(f"\nfail-over: {len(before)} requests before the kill, {len(around)} in flight at it "
          f"({len(unavoidable)} victim streams broken), {len(after)} after, {failed_over} sent again to the survivor; "
          f"victim ejected after {ejected_after:.2f} s; managed gateway's first 503 in {first_503_s:.3f} s")
    assert before and after and failed_over >= 1
    assert not failed, [(o.model, o.stream, o.status, o.error) for o in failed]
    # The stream the victim was generating when it died ended with the error event, and it was counted.
    assert long.status == 200 and long.streaming_since < killed_at < long.done, long
    assert long.error == "backend_stream_broken", long.error
    assert gateway_error_count(gw, "backend_stream_broken") >= broken_before + 1 + len(unavoidable)
    with gw.client() as client:  # every model, streamed and not, on the survivor alone
        sweep = [one_request(client, m, stream) for m in models for stream in (False, True)]
    assert all(o.status == 200 for o in sweep), [(o.model, o.stream, o.status, o.error) for o in sweep]
    # Every answer, failed over or not, came from the adapter asked for (a survivor that had not loaded it must
    # not answer with the base model or another adapter).
    wrong = [(o.model, o.stream, o.served, o.experts) for o in outcomes + sweep
             if o.status == 200 and (o.served, o.experts) != served_as(o.model)]
    assert not wrong, wrong

    # 3. Until the supervisor's restart has loaded the model, every request is a fast 503, never a hang.
    latencies: list[float] = []

    def expert_answers() -> bool:
        with managed.gateway.client() as c:
            start = time.monotonic()
            r = c.post("/v1/chat/completions", json=chat(MANAGED_EXPERT), timeout=30)
            latencies.append(time.monotonic() - start)
        if r.status_code == 200:
            return True
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert latencies[-1] < 2.0, f"503 took {latencies[-1]:.2f} s"
        return False

    wait_for(expert_answers, 300, every_s=1.0)
    recovered_after = time.monotonic() - killed_at
    assert managed_vllm_pid(managed.gateway.proc.pid) != pid  # a new vLLM, same gateway process
    assert managed.gateway.proc.poll() is None
    assert MANAGED_EXPERT in vllm_models(managed.vllm_url)  # its adapter was loaded again
    print(f"restart: expert answered again {recovered_after:.1f} s after the kill; {len(latencies) - 1} 503s in the "
          f"meantime, slowest {max(latencies[:-1], default=0):.3f} s")

    # 4. The pair gateway takes the restarted backend back, and the victim's adapters return to it.
    wait_for(lambda: httpx.get(gw.url + "/ready").json()["backends"][victim] is True, 15)
    with gw.client() as c:
        for name in pair.experts:
            r = c.post("/v1/chat/completions", json=chat(name))
            assert r.status_code == 200, r.text
    assert {n for n, u in pair.experts.items() if u == victim} <= vllm_models(victim)


def test_sigterm_stops_the_managed_vllm(managed: Managed):
    pgid = managed_vllm_pid(managed.gateway.proc.pid)
    stop_gateway(managed.gateway)  # SIGTERM, as docker stop or systemd send it
    try:
        assert managed.gateway.proc.returncode == 0
        wait_for(lambda: not group_alive(pgid), 10)
    finally:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
