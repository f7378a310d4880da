"""The SSE relay: vLLM's server-sent events passed to the client as they arrive, read as events, not bytes.

`routing` goes into the first data event; the usage event (always requested from vLLM, to count tokens) is
dropped unless the client asked for it; a backend that fails mid-stream ends the stream with an OpenAI-style
error event and no [DONE].

`system_fingerprint`: vLLM stamps it on the trailing usage chunk when usage is requested, else on each chunk
that finishes a choice. As flock always requests usage, a client that did not ask for it would lose the
fingerprint with the dropped usage chunk; so its finishing chunks are held back until the usage chunk (sent in
the same engine step) and carry its fingerprint, as vLLM direct would send them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from service.backend import BackendResponse, BackendStreamError
from service.protocol import dumps, loads

log = logging.getLogger(__name__)


@dataclass
class Event:
    """One server-sent event: its raw bytes (without the blank line that ends it) and its data, parsed."""

    raw: bytes
    data: dict | None  # the JSON of its `data:` field; None for [DONE], comments and other fields

    def with_data(self, data: dict) -> bytes:
        """The event's bytes with its data replaced (other fields, such as a Responses `event:` line, kept)."""
        fields = [line for line in self.raw.split(b"\n") if not line.startswith(b"data:")]
        return b"\n".join([*fields, b"data: " + dumps(data)])

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        payload = b"\n".join(line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:"))
        data = None
        if payload.startswith(b"{"):
            try:
                data = loads(payload)
            except ValueError:
                data = None
        return cls(raw, data if isinstance(data, dict) else None)

    @property
    def has_token(self) -> bool:
        """A chunk carrying generated text (chat delta content, a completion's text, a Responses text delta)."""
        if (self.data or {}).get("type") == "response.output_text.delta":
            return bool(self.data.get("delta")) if self.data else False
        for choice in (self.data or {}).get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                return True
        return False

    @property
    def finishes(self) -> bool:
        """A chat or completion chunk that finishes a choice (vLLM's fingerprint goes on these)."""
        return any(c.get("finish_reason") for c in (self.data or {}).get("choices") or ())

    @property
    def usage_only(self) -> dict | None:
        """The usage of the final usage-only chunk (no choices), else None."""
        if self.data is not None and not self.data.get("choices") and self.data.get("usage"):
            return self.data["usage"]
        return None

    @property
    def final_response(self) -> dict | None:
        """The response object of a Responses stream's last event (completed or incomplete), else None."""
        if self.data is not None and self.data.get("type") in ("response.completed", "response.incomplete"):
            response = self.data.get("response")
            return response if isinstance(response, dict) else None
        return None

    @property
    def response_usage(self) -> dict | None:
        """The usage a Responses stream reports in its last event (an event passed on as it is)."""
        return (self.final_response or {}).get("usage")


def released(held: list[Event], fingerprint: str | None) -> list[bytes]:
    """The held finishing chunks, stamped with `fingerprint` where they lack one; `held` is emptied."""
    out = []
    for event in held:
        if fingerprint is not None and event.data is not None and not event.data.get("system_fingerprint"):
            event.data["system_fingerprint"] = fingerprint
            out.append(event.with_data(event.data) + b"\n\n")
        else:
            out.append(event.raw + b"\n\n")
    held.clear()
    return out


def events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete events in `buffer` (split on the blank line; CRLF accepted) and what remains."""
    buffer = buffer.replace(b"\r\n", b"\n")
    *done, rest = buffer.split(b"\n\n")
    return [e for e in done if e], rest


@dataclass
class StreamObserver:
    """What the gateway records about a stream: time to first token, tokens, backend latency, broken streams."""

    on_first_token: Callable[[float], None]
    on_usage: Callable[[dict], None]
    on_broken: Callable[[str], None]
    on_end: Callable[[float], None]
    # A Responses stream's final response object, before its last event is passed on (so a client that
    # continues the conversation at once finds it stored).
    on_response: Callable[[dict], Awaitable[None]] | None = None


async def relay(resp: BackendResponse, routing: dict, wants_usage: bool, observe: StreamObserver, *,
                model: str | None = None) -> AsyncIterator[bytes]:
    """`model`: the name every chunk carries instead of the backend's (a composite's readable name)."""
    t0 = resp.lease.start
    first, got_token, buffer = True, False, b""
    held: list[Event] = []  # finishing chunks waiting for the usage chunk's fingerprint (usage not wanted)
    try:
        async for chunk in resp.iter_raw():
            done, buffer = events(buffer + chunk)
            for raw in done:
                event = Event.parse(raw)
                nested = (event.data or {}).get("response")  # Responses events carry the response object
                if model is not None and event.data is not None and isinstance(nested, dict) and "model" in nested:
                    nested["model"] = model
                    raw = event.with_data(event.data)
                if event.data is not None and (first or (model is not None and "model" in event.data)):
                    if first:
                        event.data["routing"] = routing
                        first = False
                    if model is not None and "model" in event.data:
                        event.data["model"] = model
                    raw = event.with_data(event.data)
                if not got_token and event.has_token:
                    got_token = True
                    observe.on_first_token(time.perf_counter() - t0)
                if (usage := event.response_usage) is not None:
                    observe.on_usage(usage)
                if observe.on_response is not None and (final := event.final_response) is not None:
                    await observe.on_response(final)
                usage = event.usage_only
                if usage is not None:
                    observe.on_usage(usage)
                    for chunk_ in released(held, (event.data or {}).get("system_fingerprint")):
                        yield chunk_
                    if not wants_usage:
                        continue
                elif not wants_usage and event.finishes:
                    held.append(Event(raw, event.data))
                    continue
                elif held and event.data is None:  # [DONE] (or another non-data event) with no usage chunk seen
                    for chunk_ in released(held, None):
                        yield chunk_
                yield raw + b"\n\n"
        for chunk_ in released(held, None):
            yield chunk_
        if buffer.strip():
            yield buffer
    except BackendStreamError as exc:
        # The tokens already sent cannot be taken back, so no retry; an error event rather than an exception
        # (which would make the server cut the client's connection mid-event). A partial event is dropped.
        log.warning("backend %s failed mid-stream (%s)", resp.lease.backend.url, exc.kind)
        observe.on_broken(exc.kind)
        for chunk_ in released(held, None):
            yield chunk_
        error = {"message": f"model backend failed mid-stream ({exc.kind}); retry the request",
                 "type": "server_error", "param": None, "code": "backend_stream_broken"}
        yield b"data: " + dumps({"error": error}) + b"\n\n"
    finally:
        # Runs on normal end and on client disconnect: closing the upstream response aborts the vLLM request.
        await resp.aclose()
        observe.on_end(time.perf_counter() - t0)
