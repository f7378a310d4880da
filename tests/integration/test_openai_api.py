"""The OpenAI Python client, unmodified, against the gateway (real vLLM and Redis behind it)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.conftest import BASE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(gateway) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_routes_to_matching_expert(client: OpenAI):
    resp = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "How do I bake bread with yeast and flour?"}],
        max_tokens=8, temperature=0)
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens > 0
    routing = resp.model_extra["routing"]
    assert routing["mode"] == "global"
    assert [e["name"] for e in routing["experts"]] == ["cooking"]
    assert resp.model == "cooking"


def test_out_of_domain_goes_to_base(client: OpenAI):
    resp = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert resp.model_extra["routing"]["experts"] == []
    assert "Paris" in resp.choices[0].message.content


def test_completions_direct_expert_and_base(client: OpenAI):
    direct = client.completions.create(model="arith", prompt="12 + 30 =", max_tokens=5, temperature=0)
    assert direct.model_extra["routing"] == {"mode": "direct", "experts": [
        {"name": "arith", "weight": 1.0, "score": None}], "gate": None, "cached": False}
    base = client.completions.create(model=BASE, prompt="12 + 30 =", max_tokens=5, temperature=0)
    assert base.model_extra["routing"]["experts"] == []
    assert base.choices[0].text != direct.choices[0].text  # the adapter really changes the output


def test_streaming_matches_non_streaming(client: OpenAI):
    messages = [{"role": "user", "content": "Give me a recipe for pancakes."}]
    full = client.chat.completions.create(model="auto", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="auto", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].model_extra["routing"]["experts"][0]["name"] == "cooking"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streaming_without_usage_has_no_usage_chunk(client: OpenAI):
    stream = client.completions.create(model="arith", prompt="1 + 1 =", max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks and all(c.choices for c in chunks)


@pytest.mark.parametrize("include_usage", [False, True])
def test_streams_keep_the_system_fingerprint_as_vllm_direct_sends_it(client: OpenAI, vllm_url: str, include_usage):
    """The same stream from vLLM direct and through the gateway carries the same fingerprint on the same chunk
    (the finishing one, or the usage chunk when usage is asked for), though the gateway always asks for usage."""
    kw = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4,
          "temperature": 0, "stream": True, "stream_options": {"include_usage": include_usage}}
    direct = OpenAI(base_url=vllm_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stamped(chunks: list) -> list[tuple[int, str]]:
        return [(i - len(chunks), c.system_fingerprint) for i, c in enumerate(chunks) if c.system_fingerprint]

    want = stamped(list(direct.chat.completions.create(model=BASE, **kw)))
    got = stamped(list(client.chat.completions.create(model=BASE, **kw)))
    assert want and want[0][1].startswith("vllm-") and got == want


def test_models_lists_auto_base_and_experts(client: OpenAI):
    ids = {m.id for m in client.models.list()}
    assert {"auto", BASE, "cooking", "arith", "sqlgen"} <= ids


def test_unknown_model_is_404(client: OpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-expert", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"


def test_context_length_exceeded(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hello " * 3000}],
                                       max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"


def test_invalid_parameters_are_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], temperature=7)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"routing": {"mode": "no-such-mode"}})
    assert err.value.body["code"] == "invalid_routing_mode"
