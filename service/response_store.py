"""`previous_response_id` on /v1/responses: the gateway keeps each answered conversation itself and sends vLLM
the whole conversation as `input` items.

vLLM's own store (VLLM_ENABLE_RESPONSES_API_STORE=1) is a dict inside one vLLM process that is never emptied
(vLLM warns of the leak), lost on a restart and known to that backend only, while flock spreads requests over
backends and fails over between them. Kept by the gateway (in Redis when flock has one, so every replica sees
it, else in this process), a conversation continues on any backend, and routing reads its user turns by the
same rules as a chat's (router/conversation.py).

What is kept per response: the input items of the conversation so far, then the answer's output items as
input items (an assistant message with its text; function calls as they are, so that a `function_call_output`
can answer them; reasoning left out, as vLLM's own store does). `instructions` are not carried over, as in
OpenAI's API. Entries are scoped to the API key that created them and expire after FLOCK_RESPONSES_TTL_S.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import APIError
from service.protocol import ResponsesRequest, dumps, loads

log = logging.getLogger(__name__)
KEY_PREFIX = "flock:response:"


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items (a string input is one user message)."""
    return [{"role": "user", "content": body.input}] if isinstance(body.input, str) else list(body.input)


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as input items of the next turn."""
    items: list[dict[str, Any]] = []
    for item in output:
        kind = item.get("type")
        if kind == "message":
            text = "".join(str(p.get("text", "")) for p in item.get("content") or () if isinstance(p, dict))
            items.append({"role": "assistant", "content": text})
        elif kind == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments") if k in item})
    return items


class ResponseStore:
    """Conversations by response id: in Redis (`redis_url`) or in this process (the newest `max_entries`)."""

    def __init__(self, redis_url: str | None, ttl_s: int, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.redis = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0) \
            if redis_url else None
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key_id: str, response_id: str) -> list[dict[str, Any]] | None:
        key = f"{KEY_PREFIX}{key_id}:{response_id}"
        if self.redis is not None:
            try:
                raw = await self.redis.get(key)
            except (RedisError, OSError) as exc:
                raise APIError(503, f"the store of earlier responses (Redis) is unreachable: {exc}; retry shortly",
                               code="service_unavailable", type_="server_error",
                               headers={"Retry-After": "1"}) from None
        else:
            entry = self._local.get(key)
            raw = entry[1] if entry is not None and entry[0] > time.monotonic() else None
        return loads(raw) if raw is not None else None

    async def put(self, key_id: str, response_id: str, items: list[dict[str, Any]]) -> None:
        key, raw = f"{KEY_PREFIX}{key_id}:{response_id}", dumps(items)
        if self.redis is not None:
            await self.redis.set(key, raw, ex=self.ttl_s)
            return
        self._local[key] = (time.monotonic() + self.ttl_s, raw)
        self._local.move_to_end(key)
        while len(self._local) > self.max_entries:
            self._local.popitem(last=False)

    async def expand(self, body: ResponsesRequest, key_id: str) -> ResponsesRequest:
        """A request continuing a stored conversation, as one carrying the whole conversation in `input`."""
        if body.previous_response_id is None:
            return body
        earlier = await self.get(key_id, body.previous_response_id)
        if earlier is None:
            raise APIError(400, f"Previous response with id {body.previous_response_id!r} not found (flock keeps "
                           f"a response for {self.ttl_s} s, for the key that created it)",
                           param="previous_response_id", code="previous_response_not_found")
        return body.model_copy(update={"input": earlier + input_items(body), "previous_response_id": None})

    async def remember(self, body: ResponsesRequest, key_id: str, response: dict[str, Any]) -> None:
        """Keep an answered conversation (unless the client sent `store: false`)."""
        if getattr(body, "store", True) is False or not response.get("id"):
            return
        if response.get("status") not in ("completed", "incomplete"):
            return
        try:
            await self.put(key_id, response["id"], input_items(body) + output_as_input(response.get("output") or []))
        except (RedisError, OSError) as exc:  # the answer stands; only a continuation of it will not be found
            log.warning("response %s not stored: %s", response["id"], exc)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
