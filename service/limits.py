"""Request limits the gateway enforces itself, before routing (each a 400 in the OpenAI error shape)."""

from __future__ import annotations

from service.errors import APIError
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.settings import Settings


def prompt_chars(body: ChatCompletionRequest | CompletionRequest) -> int:
    """Characters of text in the request: every message's text, list-of-parts content included, or the prompt(s)."""
    if isinstance(body, ChatCompletionRequest):
        total = 0
        for message in body.messages:
            content = message.content
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
        return total
    prompt = body.prompt
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str))


def check_limits(settings: Settings, body: ChatCompletionRequest | CompletionRequest) -> None:
    s = settings
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {s.max_tokens_limit}", param="max_tokens",
                       code="max_tokens_too_large")
    if body.n is not None and body.n > s.max_n:
        raise APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")
    if isinstance(body, ChatCompletionRequest) and len(body.messages) > s.max_messages:
        raise APIError(400, f"at most {s.max_messages} messages are accepted", param="messages",
                       code="too_many_messages")
    chars = prompt_chars(body)
    if chars > s.max_prompt_chars:
        raise APIError(400, f"prompt is {chars} characters; the limit is {s.max_prompt_chars}",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
