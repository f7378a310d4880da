"""Client libraries people use against OpenAI-compatible servers, unmodified, against the real gateway (real vLLM
and Redis behind it): LangChain's ChatOpenAI with bind_tools, and LiteLLM as a client. They come from the `test`
extra (pip install -e '.[test]'); without it these tests are skipped, except under CI=true, where they fail."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from tests.conftest import BASE
from tests.integration.test_tools import WEATHER

pytestmark = pytest.mark.integration


def client_library(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed: pip install -e '.[test]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_langchain_bind_tools_through_a_routed_request(gateway):
    chat_models = client_library("langchain_openai")
    llm = chat_models.ChatOpenAI(base_url=gateway.url + "/v1", api_key="unused", model="auto", temperature=0,
                                 max_tokens=150, timeout=120, max_retries=0)  # room for the whole <tool_call>
    # The tool as an OpenAI schema: the 135M test model copies a schema that lists `properties` before `type`
    # (LangChain's order for a Python function) instead of filling it in.
    with_tools = llm.bind_tools([WEATHER], tool_choice="required")
    reply = with_tools.invoke("What is the weather in Paris today?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"], dict)
    # Plain text through LangChain, on the base model.
    text = chat_models.ChatOpenAI(base_url=gateway.url + "/v1", api_key="unused", model=BASE, temperature=0,
                                  max_tokens=12, timeout=120).invoke("What is the capital of France?")
    assert "Paris" in text.content


def test_litellm_as_a_client(gateway):
    litellm = client_library("litellm")
    kw = {"api_base": gateway.url + "/v1", "api_key": "unused", "temperature": 0, "timeout": 120}
    resp = litellm.completion(model=f"openai/{BASE}", messages=[{"role": "user", "content":
                              "What is the capital of France?"}], max_tokens=12, **kw)
    assert "Paris" in resp.choices[0].message.content and resp.usage.completion_tokens > 0
    routed = litellm.completion(model="openai/auto", max_tokens=8, **kw,
                                messages=[{"role": "user", "content": "How long should I boil an egg?"}])
    assert routed.model.endswith("cooking")  # the expert that served, as the gateway names it
    text = ""
    for chunk in litellm.completion(model=f"openai/{BASE}", stream=True, max_tokens=12, **kw,
                                    messages=[{"role": "user", "content": "What is the capital of France?"}]):
        text += chunk.choices[0].delta.content or ""
    assert "Paris" in text
