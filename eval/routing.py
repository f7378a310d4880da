"""Routing accuracy without generation: the service's Router on the library pool, and global-router variants
compared side by side on the same query embeddings.

Each variant is an `ExpertIndex` (one unit vector per expert + its own abstain threshold) plus a query side:

* `description`: query embedding vs description embeddings;
* `centroid`: each expert is the normalised mean embedding of its card's examples plus `train_per_expert`
  prompts from its task's train split (when the expert's name is a task of `training.tasks`; 0 by default:
  the library's cards carry 32 train-split prompts, so with 0 this is exactly the service's centroid index);
* `generated`: the cards' LLM-written descriptions (`extra.generated_description`, the hand-written one where
  missing) instead of the hand-written ones; only when at least one card has one;
* `glider`: GLIDER's query side: the base model writes one sentence describing the task of the query, and that
  sentence is embedded and scored against the description embeddings.

The variant the service is configured with (`FLOCK_EXPERT_VECTOR`, `Router.expert_vector`) is also queried
through `Router.route` exactly as the gateway does, and its records are those; its latency is the service's.
Every threshold comes from `router.index.calibrate_threshold` on the cards' examples (in-domain) against
`router.calibration.OUT_OF_DOMAIN_PROMPTS`, both passed through the variant's query side; never on test prompts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from eval.metrics import routing_summary, top_expert
from eval.testset import EvalExample
from router.calibration import OUT_OF_DOMAIN_PROMPTS
from router.decision import RoutingParams
from router.index import ExpertIndex, calibrate_threshold, unit_rows
from training.tasks import TASKS

EmbedMany = Callable[[list[str]], Awaitable[np.ndarray]]
Progress = Callable[[str], None]
CENTROID_SEED = 11  # train-split prompts for centroids (the test set uses another split entirely)
EMBED_CHUNK = 64


@dataclass(frozen=True)
class ExpertSpec:
    """What the variants need to know about one expert of the pool."""

    name: str
    description: str
    examples: tuple[str, ...] = ()
    generated_description: str | None = None
    rank: int = 8

    @property
    def task(self) -> str | None:
        return self.name if self.name in TASKS else None


def expert_specs(pool) -> list[ExpertSpec]:
    """The pool's experts (sorted by name, as the Router's index is)."""
    out = []
    for e in pool.experts():
        generated = e.card.extra.get("generated_description") if isinstance(e.card.extra, dict) else None
        out.append(ExpertSpec(name=e.name, description=e.card.description, examples=tuple(e.card.examples),
                              generated_description=generated if isinstance(generated, str) and generated else None,
                              rank=e.rank))
    return out


@dataclass
class Variant:
    name: str
    index: ExpertIndex
    query_side: str  # "prompt": the query is embedded; "glider": the LLM's instruction for it is
    note: str
    details: dict = field(default_factory=dict)


async def embed_chunked(embed_many: EmbedMany, texts: list[str]) -> np.ndarray:
    parts = [await embed_many(texts[i:i + EMBED_CHUNK]) for i in range(0, len(texts), EMBED_CHUNK)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), dtype=np.float32)


def best_scores(queries: np.ndarray, experts: np.ndarray) -> np.ndarray:
    if len(queries) == 0 or len(experts) == 0:
        return np.zeros(0, dtype=np.float32)
    return (queries @ experts.T).max(axis=1)


def calibrate(experts: np.ndarray, in_domain: np.ndarray, out_domain: np.ndarray) -> float:
    return float(calibrate_threshold(best_scores(in_domain, experts), best_scores(out_domain, experts)))


def make_index(specs: list[ExpertSpec], vectors: np.ndarray, threshold: float) -> ExpertIndex:
    return ExpertIndex(names=[s.name for s in specs], vectors=vectors.astype(np.float32), threshold=threshold,
                       ranks={s.name: s.rank for s in specs})


def centroid_texts(spec: ExpertSpec, train_per_expert: int, seed: int = CENTROID_SEED) -> tuple[list[str], int]:
    """(texts, how many came from the task's train split): the card's examples, then train-split prompts."""
    texts = list(spec.examples)
    extra: list[str] = []
    if train_per_expert > 0 and spec.task is not None:
        extra = [e.prompt for e in TASKS[spec.task].generate("train", train_per_expert, seed)]
    return texts + extra, len(extra)


async def description_variant(specs: list[ExpertSpec], embed_many: EmbedMany,
                              ood_vectors: np.ndarray | None = None) -> Variant:
    vectors = await embed_chunked(embed_many, [s.description for s in specs])
    in_vecs = await embed_chunked(embed_many, [x for s in specs for x in s.examples])
    if ood_vectors is None:
        ood_vectors = await embed_chunked(embed_many, list(OUT_OF_DOMAIN_PROMPTS))
    threshold = calibrate(vectors, in_vecs, ood_vectors)
    return Variant("description", make_index(specs, vectors, threshold), "prompt",
                   "query vs hand-written description embeddings")


async def centroid_variant(specs: list[ExpertSpec], embed_many: EmbedMany, *, train_per_expert: int = 0,
                           ood_vectors: np.ndarray | None = None) -> Variant:
    rows, sources = [], {}
    for s in specs:
        texts, n_train = centroid_texts(s, train_per_expert)
        sources[s.name] = {"card_examples": len(s.examples), "train_prompts": n_train}
        # As router.index.expert_vectors: the description counts as one more example.
        rows.append(np.asarray(await embed_chunked(embed_many, [s.description, *texts])).mean(axis=0))
    dim = rows[0].shape[0] if rows else 0
    vectors = unit_rows(np.stack(rows)) if rows else np.zeros((0, dim), dtype=np.float32)
    in_vecs = await embed_chunked(embed_many, [x for s in specs for x in s.examples])
    if ood_vectors is None:
        ood_vectors = await embed_chunked(embed_many, list(OUT_OF_DOMAIN_PROMPTS))
    threshold = calibrate(vectors, in_vecs, ood_vectors)
    return Variant("centroid", make_index(specs, vectors, threshold), "prompt",
                   f"query vs centroid of the description, the card examples and {train_per_expert} "
                   "train-split prompts",
                   {"sources": sources, "train_per_expert": train_per_expert, "train_seed": CENTROID_SEED})


async def generated_variant(specs: list[ExpertSpec], embed_many: EmbedMany,
                            ood_vectors: np.ndarray | None = None) -> Variant | None:
    have = [s.name for s in specs if s.generated_description]
    if not have:
        return None
    vectors = await embed_chunked(embed_many, [s.generated_description or s.description for s in specs])
    in_vecs = await embed_chunked(embed_many, [x for s in specs for x in s.examples])
    if ood_vectors is None:
        ood_vectors = await embed_chunked(embed_many, list(OUT_OF_DOMAIN_PROMPTS))
    threshold = calibrate(vectors, in_vecs, ood_vectors)
    return Variant("generated", make_index(specs, vectors, threshold), "prompt",
                   "query vs LLM-generated card descriptions (hand-written where missing)",
                   {"experts_with_generated_description": have})


# --- GLIDER's query side --------------------------------------------------------------------------------
GLIDER_PROMPT_VERSION = "1"
GLIDER_INSTRUCTION = "Write one sentence describing the task this request asks for."
# Few-shot pairs from domains outside the task suite, so the prompt gives no task away.
GLIDER_SHOTS: tuple[tuple[str, str], ...] = (
    ("Give me a recipe for banana bread.", "The task is to provide a baking recipe."),
    ("Summarize this paragraph in one line: The committee met on Monday and agreed to delay the vote.",
     "The task is to summarize a paragraph in one sentence."),
    ("Write a Python function that reverses a string.", "The task is to write a Python function for string reversal."),
    ("Rewrite in the passive voice: The dog chased the ball.",
     "The task is to rewrite a sentence in the passive voice."),
)
GLIDER_MAX_TOKENS = 48


def glider_key(query: str) -> str:
    return "flock:glider:" + hashlib.sha256(query.encode()).hexdigest()


def glider_messages(query: str) -> list[dict]:
    messages = [{"role": "system", "content": GLIDER_INSTRUCTION}]
    for request, answer in GLIDER_SHOTS:
        messages += [{"role": "user", "content": f"{GLIDER_INSTRUCTION}\nRequest: {request}"},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"{GLIDER_INSTRUCTION}\nRequest: {query}"})
    return messages


def clean_instruction(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


class JsonCache:
    """The GLIDER cache in a local JSON file (when no Redis URL is given); written on flush()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self._dirty = False

    async def get(self, key: str) -> dict | None:
        return self.data.get(key)

    async def set(self, key: str, value: dict) -> None:
        self.data[key] = value
        self._dirty = True

    async def flush(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self._dirty = False

    async def close(self) -> None:
        await self.flush()

    def describe(self) -> str:
        return f"json:{self.path}"


class RedisCache:
    """The GLIDER cache in Redis, under flock:glider:<sha256 of the query>, without expiry."""

    def __init__(self, url: str):
        import redis.asyncio as aioredis

        self.url = url
        self._redis = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    async def get(self, key: str) -> dict | None:
        raw = await self._redis.get(key)
        return json.loads(raw) if raw else None

    async def set(self, key: str, value: dict) -> None:
        await self._redis.set(key, json.dumps(value))

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        await self._redis.aclose()

    def describe(self) -> str:
        return f"redis:{self.url}"


class NoLLM(RuntimeError):
    """A GLIDER instruction is not cached and no LLM endpoint was given."""


class GliderClient:
    """Task instructions for queries from the base model (chat completions to vLLM or the gateway), cached."""

    def __init__(self, cache, url: str | None, model: str, *, concurrency: int = 16,
                 transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = 600):
        self.cache = cache
        self.url = url.rstrip("/") if url else None
        self.model = model
        self.concurrency = concurrency
        self.transport = transport
        self.timeout_s = timeout_s
        self.llm_calls = 0
        self.cache_hits = 0

    async def _generate(self, client: httpx.AsyncClient, query: str) -> tuple[str, float]:
        body = {"model": self.model, "messages": glider_messages(query), "temperature": 0,
                "max_tokens": GLIDER_MAX_TOKENS}
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                r = await client.post(f"{self.url}/v1/chat/completions", json=body)
                if r.status_code < 500:
                    break
            except httpx.TransportError:
                if attempt == 2:
                    raise
            await asyncio.sleep(1 + attempt)
        r.raise_for_status()
        self.llm_calls += 1
        text = r.json()["choices"][0]["message"]["content"]
        return clean_instruction(text), (time.perf_counter() - t0) * 1000

    async def instructions(self, queries: list[str], progress: Progress | None = None) -> list[dict]:
        """One {"instruction", "llm_ms", "cached"} per query; llm_ms is the generation time when it was made."""
        out: list[dict | None] = [None] * len(queries)
        missing = []
        for i, q in enumerate(queries):
            hit = await self.cache.get(glider_key(q))
            if hit and hit.get("prompt_version") == GLIDER_PROMPT_VERSION and hit.get("model") == self.model:
                self.cache_hits += 1
                out[i] = {"instruction": hit["instruction"], "llm_ms": hit.get("llm_ms"), "cached": True}
            else:
                missing.append(i)
        if missing and self.url is None:
            raise NoLLM(f"{len(missing)} GLIDER instructions are not cached and no LLM endpoint was given")
        if missing:
            sem = asyncio.Semaphore(self.concurrency)
            done = 0
            async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as client:
                async def one(i: int) -> None:
                    nonlocal done
                    async with sem:
                        text, ms = await self._generate(client, queries[i])
                    await self.cache.set(glider_key(queries[i]), {
                        "instruction": text, "llm_ms": ms, "model": self.model,
                        "prompt_version": GLIDER_PROMPT_VERSION})
                    out[i] = {"instruction": text, "llm_ms": ms, "cached": False}
                    done += 1
                    if progress and (done % 50 == 0 or done == len(missing)):
                        progress(f"glider: {done}/{len(missing)} instructions generated")

                await asyncio.gather(*(one(i) for i in missing))
            await self.cache.flush()
        return out  # type: ignore[return-value]


async def glider_variant(specs: list[ExpertSpec], description_vectors: np.ndarray, embed_many: EmbedMany,
                         glider: GliderClient, progress: Progress | None = None) -> Variant:
    """Description embeddings on the expert side; the threshold calibrated on the instructions written for the
    cards' examples vs for the out-of-domain calibration prompts."""
    examples = [x for s in specs for x in s.examples]
    ins = await glider.instructions(examples + list(OUT_OF_DOMAIN_PROMPTS), progress)
    vecs = await embed_chunked(embed_many, [x["instruction"] or "(empty)" for x in ins])
    threshold = calibrate(description_vectors, vecs[:len(examples)], vecs[len(examples):])
    return Variant("glider", make_index(specs, description_vectors, threshold), "glider",
                   "LLM-written task instruction (base model, few-shot) vs description embeddings",
                   {"llm": glider.model, "prompt_version": GLIDER_PROMPT_VERSION, "cache": glider.cache.describe()})


# --- the evaluation -------------------------------------------------------------------------------------
def _record(ex: EvalExample, top: str | None, latency_ms: float | None, **extra) -> dict:
    return {"task": ex.task, "kind": ex.kind, "test_only": ex.test_only, "phrasing_id": ex.phrasing_id,
            "top": top, "latency_ms": latency_ms, **extra}


async def evaluate_routing(router, examples: list[EvalExample], held_in, held_out, *, train_per_expert: int = 0,
                           glider: GliderClient | None = None, progress: Progress | None = None) -> dict:
    """{"variants": {name: summary + threshold, note, details}, "records": {name: [...]}} for every variant.

    `router` is a `router.router.Router` whose index is built (`await router.rebuild_index()`). The variant it
    is configured with (`router.expert_vector`) is queried through its own `route()`; the others reuse its
    global method on their own index.
    """
    say = progress or (lambda _msg: None)
    specs = expert_specs(router.pool)
    embed_many = router.embedder.embed_many
    method = router.method("global")
    params = RoutingParams(mode="global")
    prompts = [e.prompt for e in examples]
    served = router.expert_vector

    # The service's own path, through Router.route: per-query latency is its embed + score stages.
    records: dict[str, list[dict]] = {served: []}
    embed_ms: list[float] = []
    for n, ex in enumerate(examples, 1):
        t0 = time.perf_counter()
        result = await router.route(ex.prompt, params)
        ms = (time.perf_counter() - t0) * 1000
        embed_ms.append(result.stages.get("embed", 0.0) * 1000)
        experts = [c.model_dump() for c in result.decision.experts]
        records[served].append(_record(ex, top_expert(experts), ms,
                                       score=experts[0]["score"] if experts else None))
        if n % 200 == 0 or n == len(examples):
            say(f"routing: {served} (service path) {n}/{len(examples)}")

    ood_vecs = await embed_chunked(embed_many, list(OUT_OF_DOMAIN_PROMPTS))
    variants: dict[str, Variant] = {
        "description": await description_variant(specs, embed_many, ood_vecs),
        "centroid": await centroid_variant(specs, embed_many, ood_vectors=ood_vecs)}
    if train_per_expert > 0:  # cards with few examples: what more prompts per expert would buy
        extra = await centroid_variant(specs, embed_many, train_per_expert=train_per_expert, ood_vectors=ood_vecs)
        variants["centroid+train"] = Variant("centroid+train", extra.index, extra.query_side, extra.note,
                                             extra.details)
    variants[served] = Variant(served, router.index, "prompt",
                               variants[served].note + " (the service's router.index, queried via Router.route)",
                               {**variants[served].details, "service": True,
                                "fixed_threshold": router.fixed_threshold})
    generated = await generated_variant(specs, embed_many, ood_vecs)
    if generated is not None:
        variants["generated"] = generated
    skipped: dict[str, str] = {}
    instructions: list[dict] | None = None
    if glider is not None:
        try:
            variants["glider"] = await glider_variant(specs, variants["description"].index.vectors, embed_many,
                                                      glider, say)
            instructions = await glider.instructions(prompts, say)
        except (NoLLM, httpx.HTTPError) as exc:
            variants.pop("glider", None)
            skipped["glider"] = str(exc)
            say(f"routing: glider skipped: {exc}")
    else:
        skipped["glider"] = "no LLM endpoint (give --backend or --gateway) and no cache"

    # (b), (c) and the others: the same query embeddings (or instruction embeddings), their own index.
    query_vecs = await embed_chunked(embed_many, prompts) if len(variants) > 1 else None
    instr_vecs = (await embed_chunked(embed_many, [x["instruction"] or "(empty)" for x in instructions])
                  if instructions is not None else None)
    for name, v in variants.items():
        if name == served:
            continue
        recs = []
        vecs = instr_vecs if v.query_side == "glider" else query_vecs
        assert vecs is not None  # more than one variant, and instructions for the glider one
        for i, ex in enumerate(examples):
            t0 = time.perf_counter()
            decision = router.decide(vecs[i], method, params, v.index)
            score_ms = (time.perf_counter() - t0) * 1000
            experts = [c.model_dump() for c in decision.experts]
            # Embedding a query (or instruction) costs what the service's embed stage cost for this query.
            latency = embed_ms[i] + score_ms
            fields: dict[str, Any] = {"score": experts[0]["score"] if experts else None}
            if v.query_side == "glider":
                assert instructions is not None
                llm_ms = instructions[i]["llm_ms"]
                latency = latency + (llm_ms or 0.0)
                fields.update(instruction=instructions[i]["instruction"], llm_ms=llm_ms)
            recs.append(_record(ex, top_expert(experts), latency, **fields))
        records[name] = recs
        say(f"routing: {name} {len(recs)}/{len(examples)}")

    summaries = {}
    for name, v in variants.items():
        s = routing_summary(records[name], held_in, held_out)
        s.update(threshold=v.index.threshold, note=v.note, details=v.details)
        if name == "glider" and glider is not None:
            s["llm_ms_p50"] = float(np.median([x["llm_ms"] for x in instructions if x["llm_ms"] is not None])) \
                if instructions and any(x["llm_ms"] is not None for x in instructions) else None
            s["llm_calls"] = glider.llm_calls
            s["cache_hits"] = glider.cache_hits
        summaries[name] = s
    return {"variants": summaries, "records": records, "skipped": skipped, "experts": [s.name for s in specs],
            "embed_ms_p50": float(np.median(embed_ms)) if embed_ms else None}
