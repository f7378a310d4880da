"""Boundary-value request bodies for the fuzz tests: a valid body per endpoint with one or two fields replaced
by values at or past the edges of what JSON and the schema allow (±inf, NaN, 1e308, integers beyond 64 bits,
empty and huge strings and lists, deep nesting, wrong types), plus raw bodies that are not JSON at all.
Deterministic for a seed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_OBJECT = '{"a":' * 5000 + "1" + "}" * 5000

# Raw JSON text (not Python values): NaN and Infinity are the non-standard tokens many parsers accept.
VALUES = [
    "0", "-1", "1", "2", "3", "8", "9", "20", "21", "128", "129", "2147483647", "2147483648", "9223372036854775807",
    "9223372036854775808", "18446744073709551616", "-9223372036854775809", "1" + "0" * 400, "-" + "9" * 400,
    "1e308", "-1e308", "1e309", "5e-324", "-0.0", "0.5", "2.0000001", "1000", "1000.5", "NaN", "Infinity",
    "-Infinity", '"NaN"', '"Infinity"', '"1e308"', '""', '"x"', '"' + "y" * 20000 + '"', '"\\u0000"',
    '"\\ud800"', "[]", "[[]]", "{}", '{"": null}', "null", "true", "false", "[1, 2, 3]", '["a", 1, null]',
    DEEP_LIST, DEEP_OBJECT, '[{"role": "user", "content": "hi"}]', '[{"type": "text"}]',
    '[{"type": "text", "text": 1}]', '[{"type": "image_url", "image_url": {"url": "x"}}]',
]

ENDPOINTS: dict[str, tuple[str, dict]] = {
    "chat": ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}],
                                      "max_tokens": 2}),
    "completions": ("/v1/completions", {"model": "auto", "prompt": "Sort 3, 1, 2", "max_tokens": 2}),
    "responses": ("/v1/responses", {"model": "auto", "input": "Translate cat to French", "max_output_tokens": 2}),
    "route": ("/v1/route", {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}),
    "experts": ("/v1/experts", {"path": "/nonexistent/expert"}),
    "tokenize": ("/tokenize", {"model": "auto", "prompt": "hello"}),
}

FIELDS: dict[str, list[str]] = {
    "chat": ["model", "messages", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "seed",
             "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "stream_options",
             "routing", "routing.mode", "routing.alpha", "routing.top_k", "messages.0.content", "messages.0.role",
             "stop", "logit_bias", "user", "response_format", "tools"],
    "completions": ["model", "prompt", "max_tokens", "n", "temperature", "top_p", "seed", "logprobs", "echo",
                    "best_of", "routing.alpha", "routing.top_k", "stream"],
    "responses": ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                  "previous_response_id", "routing.mode", "routing.alpha"],
    "route": ["messages", "routing", "routing.mode", "routing.alpha", "routing.top_k", "model"],
    "experts": ["path", "name", "description", "examples", "replace"],
    "tokenize": ["model", "prompt", "messages", "add_special_tokens"],
}

RAW = ["", "{", "}", "null", "[]", '"text"', "1e999", "{\"model\": \"auto\"", DEEP_LIST, DEEP_OBJECT, "\x00\xff"]


def _render(value, overrides: dict[str, str], prefix: str = "") -> str:
    """JSON text of `value` with the values at the dotted paths in `overrides` replaced by raw JSON text (a path
    that is not in `value` is added)."""
    if prefix in overrides:
        return overrides[prefix]
    if isinstance(value, dict):
        extra = [(k[len(prefix) + 1:] if prefix else k).split(".", 1)[0] for k in overrides
                 if not prefix or k.startswith(prefix + ".")]
        items = []
        for k in dict.fromkeys([*value, *extra]):
            sub = f"{prefix}.{k}" if prefix else k
            items.append(f"{json.dumps(k)}: {_render(value.get(k, {}), overrides, sub)}")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, overrides, f"{prefix}.{i}" if prefix else str(i))
                               for i, v in enumerate(value)) + "]"
    return json.dumps(value)


def bodies(n: int, seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(endpoint name, path, body bytes), n of them."""
    rng = random.Random(seed)
    names = list(ENDPOINTS)
    for i in range(n):
        name = names[i % len(names)]
        path, base = ENDPOINTS[name]
        if rng.random() < 0.03:
            yield name, path, rng.choice(RAW).encode("utf-8", "surrogatepass")
            continue
        overrides: dict[str, str] = {}
        for field in rng.sample(FIELDS[name], k=rng.choice([1, 1, 2])):
            overrides[field] = rng.choice(VALUES)
        if "routing" in overrides and any(k.startswith("routing.") for k in overrides):
            overrides.pop("routing")
        if "messages" in overrides:
            for k in [k for k in overrides if k.startswith("messages.")]:
                overrides.pop(k)
        yield name, path, _render(base, overrides).encode("utf-8", "surrogatepass")
