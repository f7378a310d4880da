"""What the router reads of a request: the last user message and, for chats, the user turns before it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from router.query import HISTORY_TURNS, Query
from service.errors import APIError
from service.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponsesRequest


def message_text(message: ChatMessage) -> str:
    """A message's text: a string content, or its text parts joined (other parts carry nothing to embed)."""
    content = message.content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def chat_query(messages: list[ChatMessage]) -> Query:
    """The last user message, with the user turns before it (at most `HISTORY_TURNS`, the newest) as history.
    Assistant, system and tool messages are not read; a chat without a user turn routes on "" (the base model)."""
    return newest_turns(message_text(m) for m in reversed(messages) if m.role == "user")


def newest_turns(users_newest_first: Iterator[str]) -> Query:
    """A Query from user turns given newest first: the newest, with up to HISTORY_TURNS before it. Only those
    are read, however long the conversation."""
    users = list(itertools.islice(users_newest_first, HISTORY_TURNS + 1))
    if not users:
        return Query("")
    users.reverse()
    return Query(users[-1], users[:-1])


def _item_text(item: dict) -> str:
    content = item.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") in ("input_text", "text"))
    return content if isinstance(content, str) else ""


def responses_query(body: ResponsesRequest) -> Query:
    """A Responses request routes like a chat: its input text, or its user items (the last, with the user turns
    before it as history). Items' content is a string or input_text parts."""
    if isinstance(body.input, str):
        return Query(body.input)
    return newest_turns(_item_text(i) for i in reversed(body.input)
                        if i.get("role", "user") == "user" and i.get("type", "message") == "message")


def query_text(body: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> str:
    """The routed text (see `_query_text`), refused with a 400 when it is not valid text: JSON's \\uD800 escapes
    parse to lone surrogates, which the embedder, the cache key and vLLM cannot encode."""
    query = _query_text(body)
    for text in (query, *getattr(query, "history", ())):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "a message contains a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF "
                           "escape), which is not valid text", code="invalid_value", param="messages") from None
    return query


def _query_text(body: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> str:
    """What the router routes: for a chat, the last user message with its earlier user turns (a `Query`: the
    last message's text, as a str, carrying the history); for a completion, the (first) text prompt. Typed as
    str because the gateway passes it on as one; `Router.route` reads the history."""
    if isinstance(body, ResponsesRequest):
        return responses_query(body)
    if isinstance(body, ChatCompletionRequest):
        return chat_query(body.messages)
    prompt = body.prompt
    if isinstance(prompt, str):
        return Query(prompt)
    if prompt and isinstance(prompt[0], str):
        return Query(prompt[0])
    return Query("")  # token ids: nothing to embed, the router abstains
