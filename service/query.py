"""What the router reads of a request: the last user message and, for chats, the user turns before it."""

from __future__ import annotations

from router.query import HISTORY_TURNS, Query
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
    users: list[str] = []
    for message in reversed(messages):  # only the newest turns are read, however long the chat
        if message.role == "user":
            users.append(message_text(message))
            if len(users) > HISTORY_TURNS:
                break
    if not users:
        return Query("")
    users.reverse()
    return Query(users[-1], users[:-1])


def responses_query(body: ResponsesRequest) -> Query:
    """A Responses request routes like a chat: its input text, or its user items (the last, with the user turns
    before it as history). Items' content is a string or input_text parts."""
    if isinstance(body.input, str):
        return Query(body.input)
    users: list[str] = []
    for item in reversed(body.input):
        if item.get("role", "user") == "user" and item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, list):
                users.append(" ".join(str(p.get("text", "")) for p in content
                                      if isinstance(p, dict) and p.get("type") in ("input_text", "text")))
            else:
                users.append(content if isinstance(content, str) else "")
            if len(users) > HISTORY_TURNS:
                break
    if not users:
        return Query("")
    users.reverse()
    return Query(users[-1], users[:-1])


def query_text(body: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> str:
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
