"""Request limits the gateway enforces itself, before routing (each a 400 in the OpenAI error shape)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from service.errors import APIError
from service.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from service.settings import Settings

Generation = ChatCompletionRequest | CompletionRequest | ResponsesRequest


def _parts_chars(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return 0


def prompt_chars(body: Generation) -> int:
    """Characters of text in the request: every message's text, list-of-parts content included, or the prompt(s)."""
    if isinstance(body, ResponsesRequest):
        items = [body.input] if isinstance(body.input, str) else [i.get("content") for i in body.input]
        return len(body.instructions or "") + sum(_parts_chars(c) for c in items)
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


def check_limits(settings: Settings, body: Generation) -> None:
    s = settings
    if isinstance(body, ResponsesRequest):
        max_tokens = body.max_output_tokens
        messages = 0 if isinstance(body.input, str) else len(body.input)
    else:
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        messages = len(body.messages) if isinstance(body, ChatCompletionRequest) else 0
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {s.max_tokens_limit}", param="max_tokens",
                       code="max_tokens_too_large")
    n = getattr(body, "n", None)
    if n is not None and n > s.max_n:
        raise APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")
    if messages > s.max_messages:
        raise APIError(400, f"at most {s.max_messages} messages are accepted",
                       param="input" if isinstance(body, ResponsesRequest) else "messages", code="too_many_messages")
    chars = prompt_chars(body)
    if chars > s.max_prompt_chars:
        raise APIError(400, f"prompt is {chars} characters; the limit is {s.max_prompt_chars}",
                       param={ChatCompletionRequest: "messages", CompletionRequest: "prompt"}.get(type(body), "input"),
                       code="context_length_exceeded")


class BuildLimiter:
    """At most `per_minute` new composites built per key in any 60 s (0: no limit). Building one costs seconds of
    CPU and tens of MB of disk, and a request chooses which: without a cap one client could keep the gateway
    building. Per gateway process, not shared through Redis."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._builds: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> None:
        """Count one build for `key_id`, or raise a 429 when it has had its share this minute."""
        if self.per_minute <= 0:
            return
        now = self.clock()
        with self._lock:
            recent = self._builds.setdefault(key_id, deque())
            while recent and now - recent[0] >= 60:
                recent.popleft()
            if len(recent) >= self.per_minute:
                retry = max(1, int(60 - (now - recent[0])) + 1)
                raise APIError(429, f"this key had {self.per_minute} new composites built in the last minute; "
                               "reuse a routing setting, or retry later", code="composite_rate_limited",
                               headers={"Retry-After": str(retry)})
            recent.append(now)
