"""Wire schemas of the gateway: the OpenAI request fields flock reads or limits, its own additions
(`routing`), and the response shapes published in the OpenAPI document.

Request models allow extra fields: any OpenAI/vLLM sampling parameter flock does not know is passed through
to vLLM untouched, and vLLM validates it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from router.decision import ExpertChoice, RoutingDecision, RoutingParams
from service.errors import APIError

__all__ = [
    "ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "RouteRequest", "RouteResponse", "ExpertChoice",
    "RoutingDecision", "RoutingParams", "ErrorResponse", "ModelCard", "ModelList", "ExpertIn", "ExpertOut",
    "ExpertList", "ChatCompletionResponse", "CompletionResponse", "dumps", "loads",
]


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, with orjson (several times faster than the stdlib on the proxy's hot path); the stdlib
    for what orjson refuses (integers beyond 64 bits, which a client may pass through to vLLM)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        try:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # JSON's \ud800 escape parses to a lone surrogate, which is not text
            raise APIError(400, "the body contains a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), "
                           "which is not valid text", code="invalid_value") from None


def loads(data: bytes | str) -> Any:
    """Parse JSON with orjson; the stdlib for what orjson rejects (NaN, Infinity)."""
    try:
        return orjson.loads(data)
    except ValueError:
        return json.loads(data)


_PASS_THROUGH = ConfigDict(extra="allow")


class ChatMessage(BaseModel):
    model_config = _PASS_THROUGH
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _parts_are_typed(cls, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        """Content parts name their type; a text part carries a string (other parts pass through to vLLM)."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                if not isinstance(part.get("type"), str):
                    raise ValueError(f"content part {i} has no 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} is of type 'text' but has no string 'text'")
        return content


def _needs_user_turn(messages: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
    """A chat routed with model 'auto' is routed on its user turns: one must be there."""
    if messages and info.data.get("model") == "auto" and not any(m.role == "user" for m in messages):
        raise ValueError("a chat routed with model 'auto' needs at least one user message")
    return messages


class SamplingFields(BaseModel):
    """Fields common to both generation endpoints, with the bounds the gateway enforces itself."""

    model_config = _PASS_THROUGH
    model: str = Field(description="'auto' routes; an expert name uses that expert; the base model's name none.")
    # Ranges as OpenAI states them; the gateway's own caps (max_tokens, n) are settings, checked in limits.py.
    max_tokens: int | None = Field(None, ge=1, le=1 << 31)
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    routing: RoutingParams | None = Field(None, description="flock: how to route when model is 'auto'.")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 31)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    check_user_turn = field_validator("messages")(_needs_user_turn)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text, texts or token ids.")
    logprobs: int | None = Field(None, ge=0, le=20)


class ResponsesRequest(BaseModel):
    """POST /v1/responses (OpenAI's Responses API, served by vLLM): routed like a chat. Fields flock does not
    read pass through to vLLM."""

    model_config = _PASS_THROUGH
    model: str = Field(description="'auto' routes; an expert name uses that expert; the base model's name none.")
    input: str | list[dict[str, Any]] = Field(description="Text, or input items (messages).")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1 << 31)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stream: bool | None = False
    previous_response_id: str | None = Field(
        None, description="Continue a conversation flock kept (docs/operations.md#the-responses-api); it is "
        "routed as a whole.")
    routing: RoutingParams | None = Field(None, description="flock: how to route when model is 'auto'.")


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "auto"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    routing: RoutingParams | None = None
    explain: bool = Field(False, description="Also return every expert's score and the abstain threshold.")

    check_user_turn = field_validator("messages")(_needs_user_turn)


class RouteResponse(BaseModel):
    routing: RoutingDecision
    scores: dict[str, float] | None = Field(None, description="With explain: every expert's score (cosine), the "
                                            "conversation's earlier turns folded in.")
    threshold: float | None = Field(None, description="With explain: the abstain threshold (below it for every "
                                    "expert, the base model answers).")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flock"
    parent: str | None = None
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ExpertIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096, description="Adapter directory inside an expert root.")
    name: str | None = Field(None, description="Overrides card.json's name.")
    description: str | None = Field(None, description="Overrides card.json's description.")
    examples: list[str] | None = Field(None, max_length=64)
    replace: bool = Field(False, description="Replace an expert of the same name.")
    tenant: str | None = Field(None, description="The owner (admin keys only; a tenant key's experts are its "
                               "tenant's). Empty: a shared expert.")


class ExpertOut(BaseModel):
    name: str
    tenant: str | None = Field(None, description="The owning tenant; null: shared.")
    description: str
    examples: list[str]
    path: str
    rank: int
    target_modules: list[str]
    status: Literal["ok", "quarantined"] = Field("ok", description="quarantined: its files are broken; left out "
                                                 "of routing until they change or an admin checks it.")
    problem: str | None = Field(None, description="Why it is quarantined.")


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    pool_version: str
    data: list[ExpertOut]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    """Documented shape of a non-streaming answer (the body is vLLM's, plus `routing`)."""

    model_config = _PASS_THROUGH
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None
    routing: RoutingDecision


class CompletionResponse(ChatCompletionResponse):
    object: Literal["text_completion"]  # type: ignore[assignment]
