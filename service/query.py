"""What the router reads of a request: the text it embeds."""

from __future__ import annotations

from service.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest


def query_text(body: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> str:
    """The text the router embeds: the last user message, or the (first) text prompt."""
    if isinstance(body, ResponsesRequest):
        return responses_text(body)
    if isinstance(body, ChatCompletionRequest):
        for message in reversed(body.messages):
            if message.role == "user":
                content = message.content
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
                return content or ""
        return ""
    prompt = body.prompt
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""  # token ids: nothing to embed, the router abstains


def responses_text(body: ResponsesRequest) -> str:
    """What the router reads of a Responses request: the input text, or the last user item's text."""
    if isinstance(body.input, str):
        return body.input
    for item in reversed(body.input):
        if item.get("role", "user") == "user" and item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content
                                if isinstance(p, dict) and p.get("type") in ("input_text", "text"))
            return content if isinstance(content, str) else ""
    return ""
