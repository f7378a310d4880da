"""POST /v1/responses through the real gateway and vLLM, with the official openai client: routed like a chat,
plain and streamed (routing in the first event)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import BASE

pytestmark = pytest.mark.integration


def test_responses_with_the_openai_client(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120)
    resp = client.responses.create(model="auto", input="What is 12 times 7?", max_output_tokens=8, temperature=0)
    # The test experts are random LoRAs: their text may be blank (vLLM then lists no output item), but the answer
    # is a complete Responses object that generated tokens.
    assert resp.status in ("completed", "incomplete") and resp.usage.output_tokens > 0
    assert resp.model_extra["routing"]["experts"][0]["name"] == "arith"
    assert resp.model == "arith"
    resp = client.responses.create(model="auto", instructions="Answer briefly.", max_output_tokens=8,
                                   input=[{"role": "user", "content": "How long should I boil an egg?"}])
    assert resp.model_extra["routing"]["experts"][0]["name"] == "cooking" and resp.usage.output_tokens > 0
    resp = client.responses.create(model="SmolLM2-135M-Instruct", input="What is the capital of France?",
                                   max_output_tokens=12, temperature=0)
    assert "Paris" in resp.output_text  # the base model, through the gateway, answers in text


def test_responses_stream(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120)
    text, kinds = "", []
    # The base model writes text (a random test expert may write none, and then no text delta is sent).
    with client.responses.stream(model="SmolLM2-135M-Instruct", input="What is the capital of France?",
                                 max_output_tokens=8, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "Paris" in text
    # The routing decision rides in the first event (read raw: the client's typed events drop unknown fields).
    with httpx.stream("POST", gateway.url + "/v1/responses", timeout=120, json={
            "model": "auto", "input": "What is 12 times 7?", "max_output_tokens": 4, "stream": True}) as r:
        first = next(e for e in r.iter_text() if "data: " in e)
    data = json.loads(first.split("data: ", 1)[1].split("\n\n", 1)[0])
    assert data["type"] == "response.created" and data["routing"]["experts"][0]["name"] == "arith"


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_the_conversation(gateway, stream):
    """The gateway keeps the conversation (in Redis) and sends it whole to vLLM; routing follows it: a follow-up
    that alone names no task stays with the conversation's expert."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120)

    def create(**kw):
        if not stream:
            return client.responses.create(max_output_tokens=16, temperature=0, **kw)
        with client.responses.stream(max_output_tokens=16, temperature=0, **kw) as events:
            return events.get_final_response()

    first = create(model=BASE, input="My name is Ada Lovelace. Remember it.")
    follow = create(model=BASE, input="What is my name?", previous_response_id=first.id)
    alone = create(model=BASE, input="What is my name?")
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # the whole talk
    assert "Lovelace" in follow.output_text and "Lovelace" not in alone.output_text  # known from the history
    routed = create(model="auto", input="What is 12 times 7?")
    with httpx.Client(base_url=gateway.url, timeout=120) as http:
        body = {"model": "auto", "input": "And the next one?", "max_output_tokens": 4}
        assert http.post("/v1/responses", json=body).json()["routing"]["experts"] == []  # alone: no task named
        r = http.post("/v1/responses", json={**body, "previous_response_id": routed.id})
        assert r.json()["routing"]["experts"][0]["name"] == "arith"
        r = http.post("/v1/responses", json={**body, "previous_response_id": "resp_unknown"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"
