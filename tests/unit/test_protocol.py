"""Bad chats get an OpenAI-shaped 400 naming the field, never a 500: a chat without a user turn (model 'auto'),
assistant-only histories, content parts that are not text, and the message-count limit. A small app with the
gateway's schemas and error handlers (no model, no server)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.errors import APIError, install_error_handlers
from service.limits import check_limits
from service.protocol import ChatCompletionRequest, RouteRequest
from service.query import query_text
from service.settings import Settings


def app() -> TestClient:
    a = FastAPI()
    install_error_handlers(a)

    @a.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        return {"query": str(query_text(body)), "history": list(getattr(query_text(body), "history", ()))}

    @a.post("/v1/route")
    async def route(body: RouteRequest) -> dict:
        return {}

    return TestClient(a)


USER = {"role": "user", "content": "What is 2 + 2?"}


@pytest.mark.parametrize("path,messages,param,words", [
    ("/v1/chat/completions", [{"role": "system", "content": "Be brief."}], "messages", "user message"),
    ("/v1/chat/completions", [{"role": "assistant", "content": "Hi"}, {"role": "assistant", "content": "?"}],
     "messages", "user message"),
    ("/v1/route", [{"role": "assistant", "content": "Hi"}], "messages", "user message"),
    ("/v1/chat/completions", [{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages.0.content",
     "string 'text'"),
    ("/v1/chat/completions", [{"role": "user", "content": [{"text": "x"}]}], "messages.0.content", "'type'"),
    ("/v1/chat/completions", [{"role": "user", "content": ["just a string"]}], "messages.0.content", ""),
    ("/v1/chat/completions", [{"role": "user", "content": 42}], "messages.0.content", ""),
    ("/v1/chat/completions", [], "messages", ""),
])
def test_bad_chats_get_a_400_naming_the_field(path, messages, param, words):
    r = app().post(path, json={"model": "auto", "messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param) and words in error["message"]


def test_good_chats_pass():
    c = app()
    # A chat without a user turn is fine when no routing is asked for (an expert or the base model by name).
    assert c.post("/v1/chat/completions", json={"model": "cooking", "messages": [
        {"role": "system", "content": "x"}]}).status_code == 200
    # Non-text parts pass through (vLLM judges them); the router reads the text parts.
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "Sort 3, 1, 2"}]
    r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200 and r.json()["query"] == "Sort 3, 1, 2"
    many = [USER | {"content": f"turn {i}"} for i in range(256)]
    r = c.post("/v1/chat/completions", json={"model": "auto", "messages": many})
    assert r.status_code == 200 and r.json()["query"] == "turn 255" and len(r.json()["history"]) == 3


def test_the_message_count_limit_is_a_400():
    settings = Settings()
    fits = ChatCompletionRequest(model="auto", messages=[USER] * settings.max_messages)  # type: ignore[list-item]
    check_limits(settings, fits)
    over = ChatCompletionRequest(model="auto", messages=[USER] * (settings.max_messages + 1))  # type: ignore[list-item]
    with pytest.raises(APIError) as exc:
        check_limits(settings, over)
    assert exc.value.status == 400 and exc.value.code == "too_many_messages" and exc.value.param == "messages"
