"""What the router reads of a request: the last user message and, for chats, the user turns before it.

`Query` is a `str` (the last user message, so code that takes the query as text keeps working: `len(query)`,
logging, a plain `Router.route("text")`) that also carries `history`, the earlier user turns of the
conversation, oldest first. A plain str is a Query without history.

`routing_texts` is what is embedded of one message: the message itself when it is short; for a longer one its
tail (`TAIL_CHARS` characters, from a sentence boundary) and the tail's last sentence, embedded together, the
message scoring on each expert the better of the two. The request of a long prompt is almost always at its end
(a document, then what to do with it); the embedder reads at most 256 word pieces anyway, from the head, which
for a long prompt is the context, not the request; and one MiniLM pass over 256 word pieces costs 30-120 ms
here. The last sentence finds a request that the unrelated text before it dilutes in the tail's embedding.
Cutting by characters first keeps the routing path bounded whatever the length: the tokenizer never sees
more than `TAIL_CHARS` characters (the fast tokenizer tokenizes everything before it truncates: 13 ms for
32k characters). Measured in docs/routing.md.
"""

from __future__ import annotations

import re

TAIL_CHARS = 192  # longest text embedded per message; longer messages are cut to their tail (docs/routing.md)
HISTORY_TURNS = 3  # earlier user turns the router reads (the decision depends on these and no others)
_BOUNDARY = re.compile(r"(?<=[.!?:;\n])\s+|\n")
_SPACE = re.compile(r"\s")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def routing_text(text: str, tail_chars: int = TAIL_CHARS) -> str:
    """`text`, or for a longer one its last `tail_chars` characters, started at a sentence (else word) boundary
    inside that window so the embedder does not read half a word or half a clause. O(tail_chars)."""
    if len(text) <= tail_chars:
        return text
    tail = text[-tail_chars:]
    # The first sentence boundary in the first half of the window, else the first space.
    m = _BOUNDARY.search(tail, 0, tail_chars // 2)
    if m is not None:
        return tail[m.end():]
    m = _SPACE.search(tail, 0, tail_chars // 4)
    return tail[m.end():] if m is not None else tail


def routing_texts(text: str, tail_chars: int = TAIL_CHARS) -> tuple[str, ...]:
    """The texts embedded for one message: (text,) when it fits in `tail_chars`, else (tail, last sentence of
    the tail) or (tail,) when the tail is one sentence. All within `tail_chars` characters: O(tail_chars)."""
    if len(text) <= tail_chars:
        return (text,)
    tail = routing_text(text, tail_chars)
    parts = [p for p in _SENTENCE_END.split(tail) if p.strip()]
    last = parts[-1].strip() if parts else ""
    return (tail, last) if last and last != tail.strip() else (tail,)


class Query(str):
    """The last user message (the str itself) and the earlier user turns (`history`, oldest first)."""

    history: tuple[str, ...]

    def __new__(cls, text: str, history: tuple[str, ...] | list[str] = ()) -> Query:
        self = super().__new__(cls, text)
        self.history = tuple(history)[-HISTORY_TURNS:] if HISTORY_TURNS else ()
        return self

    @classmethod
    def of(cls, query: str) -> Query:
        return query if isinstance(query, Query) else cls(query)

    def turns(self) -> tuple[tuple[str, ...], ...]:
        """What the decision depends on: for each user turn, oldest first and the last message last, the texts
        embedded of it (`routing_texts`)."""
        return tuple(routing_texts(t) for t in (*self.history, str(self)))

    def __reduce__(self) -> tuple[type[Query], tuple[str, tuple[str, ...]]]:  # pickling, copying keep the history
        return Query, (str(self), self.history)
