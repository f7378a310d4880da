"""What the router reads of a request: the text it embeds."""

from __future__ import annotations

from service.protocol import ChatCompletionRequest, CompletionRequest


def query_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The text the router embeds: the last user message, or the (first) text prompt."""
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
