"""Tool calling end to end: the managed vLLM starts with a tool-call parser and a chat template that renders
tools, and a routed request with `tools` gets tool calls back (the official openai client)."""

from __future__ import annotations

import json

import openai
import pytest

from service.processes import vllm_command
from service.settings import Settings

pytestmark = pytest.mark.integration

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_managed_vllm_has_tool_calling_on():
    argv, _ = vllm_command(Settings())
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--chat-template") + 1].endswith("smollm2_tools.jinja")
    argv, _ = vllm_command(Settings(vllm_tool_parser="", vllm_chat_template=""))
    assert "--enable-auto-tool-choice" not in argv and "--chat-template" not in argv


def test_routed_request_with_tools_gets_a_tool_call(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120)
    resp = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "What is the weather in Paris today?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=150, temperature=0)  # room for the whole <tool_call>
    calls = resp.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    assert "routing" in resp.model_extra
    # The tool's answer goes back in the history; the request is routed and answered.
    messages = [{"role": "user", "content": "What is the weather in Paris today?"},
                {"role": "assistant", "tool_calls": [c.model_dump() for c in calls]},
                {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    resp = client.chat.completions.create(model="auto", messages=messages, tools=[WEATHER], max_tokens=12,
                                          temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
