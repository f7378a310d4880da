"""A client that goes away cancels the request in vLLM, mid-stream or while waiting for a non-streamed answer:
generation stops within seconds instead of running on to max_tokens (real gateway, real vLLM; vLLM's own /metrics
is the witness)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import BASE

pytestmark = pytest.mark.integration

MAX_TOKENS = 400


def vllm_metric(url: str, name: str) -> float:
    """Sum of a vLLM metric over its label sets (one per served model name / engine)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def generated(url: str) -> float:
    return vllm_metric(url, "vllm:generation_tokens_total")


def running(url: str) -> float:
    return vllm_metric(url, "vllm:num_requests_running")


def settle(url: str, quiet_s: float, timeout_s: float) -> float:
    """Seconds until vLLM's generated-token counter has not moved for quiet_s (then minus quiet_s)."""
    start = time.monotonic()
    last, last_change = generated(url), time.monotonic()
    while time.monotonic() - start < timeout_s:
        time.sleep(0.1)
        now = generated(url)
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s and running(url) == 0:
            return last_change - start
    raise AssertionError(f"vLLM still generating {timeout_s} s after the client left")


CASES = [("/v1/chat/completions", BASE), ("/v1/chat/completions", "cooking"), ("/v1/completions", "cooking")]


def long_request(endpoint: str, model: str, **kw) -> dict:
    text = "Tell me a very long story."
    body = {"messages": [{"role": "user", "content": text}]} if endpoint == "/v1/chat/completions" else \
        {"prompt": text}
    return {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **body, **kw}


def carries_token(line: str) -> bool:
    """An SSE event with generated text (a chat stream's first event carries only the role)."""
    return line.startswith("data: {") and (('"content":"' in line and '"content":""' not in line)
                                          or ('"text":"' in line and '"text":""' not in line))


@pytest.mark.parametrize("endpoint,model", CASES)
def test_client_disconnect_stops_generation(gateway, vllm_url, endpoint, model):
    settle(vllm_url, quiet_s=1.0, timeout_s=60)  # nothing else running
    before = generated(vllm_url)
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        with client.stream("POST", endpoint, json=long_request(endpoint, model, stream=True)) as r:
            assert r.status_code == 200
            received = 0
            for line in r.iter_lines():
                received += carries_token(line)
                if received >= 3:
                    break
    # Both closed: the connection to the gateway is gone.
    stopped_after = settle(vllm_url, quiet_s=1.0, timeout_s=30)
    tokens = generated(vllm_url) - before
    print(f"\n{endpoint} {model}: vLLM stopped {stopped_after:.2f} s after the client left, {tokens:.0f} of "
          f"{MAX_TOKENS} tokens generated")
    assert received == 3
    assert stopped_after < 3.0
    assert received <= tokens < MAX_TOKENS / 2  # it did run, and stopped long before max_tokens


@pytest.mark.parametrize("endpoint,model", CASES)
def test_client_timeout_stops_non_streamed_generation(gateway, vllm_url, endpoint, model):
    """A non-streamed request whose client gives up (its read timeout) before the answer: the gateway notices the
    closed connection and cancels its request to vLLM, which aborts the generation."""
    settle(vllm_url, quiet_s=1.0, timeout_s=60)
    before = generated(vllm_url)
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(60, read=2.0)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(endpoint, json=long_request(endpoint, model))
    stopped_after = settle(vllm_url, quiet_s=1.0, timeout_s=30)
    tokens = generated(vllm_url) - before
    print(f"\n{endpoint} {model}: vLLM stopped {stopped_after:.2f} s after the client left, {tokens:.0f} of "
          f"{MAX_TOKENS} tokens generated")
    assert stopped_after < 3.0
    assert 0 < tokens < MAX_TOKENS / 2
