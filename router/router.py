"""Where a request is routed: cache lookup → embed → global scores (→ conversation) → method → cache store.

The Router owns the expert index (rebuilt when the pool changes) and the routing methods. It knows nothing
about HTTP or vLLM; the gateway turns its decision into an adapter on a backend.

Tenants (adapters/tenants.py): a caller is routed over the experts it may see only. Each visible set (shared
experts alone, shared plus one tenant's, everything) gets its own index, built with the pool's: its rows of the
expert matrix, its own abstain threshold calibrated on its own cards, and a version that names its own content,
which keys the decision cache. So no score, threshold or cached decision of one tenant depends on another
tenant's experts, and picking the view costs a request one dict lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.pool import Expert, ExpertPool
from adapters.tenants import EVERYTHING, Scope
from router.cache import RoutingCache, cache_key
from router.calibration import FOLLOW_UP_PHRASES, GENERAL_ANCHORS, OUT_OF_DOMAIN_PROMPTS
from router.card_vectors import CardVectors, CardVectorStore, card_key
from router.conversation import Anchors, ConversationConfig, fold
from router.decision import RoutingDecision, RoutingParams
from router.embed import MicroBatcher
from router.index import ExpertIndex, calibrate_threshold, expert_vectors, own_scores
from router.methods import MethodConfig, RoutingMethod, method_class, method_names
from router.query import Query
from router.spelling import Speller, vocabulary_words, word_uses

StageObserver = Callable[[str, float], None]
EMBED_CHUNK = 256  # card texts embedded per call when a pool's cards are embedded


@dataclass
class RouteResult:
    decision: RoutingDecision
    # seconds per stage: spelling (typo repair), cache, embed, conversation (chats with earlier user turns),
    # score; cache and embed overlap on a local miss
    stages: dict[str, float]
    cache: str  # hit, miss, bypass (Redis down) or off (no cache configured)


@dataclass(frozen=True)
class _Card:
    """An expert's card as the index uses it: embedded, its index vector, and its examples' own-expert scores."""

    key: str
    description: np.ndarray
    examples: np.ndarray
    vector: np.ndarray
    own: np.ndarray  # each example's score against its own expert (leave-one-out for centroids)


class Router:
    def __init__(
        self,
        pool: ExpertPool,
        embedder: MicroBatcher,
        cache: RoutingCache | None,
        *,
        default_mode: str = "global",
        method_configs: Mapping[str, MethodConfig] | None = None,
        fixed_threshold: float | None = None,
        expert_vector: str = "centroid",
        conversation: ConversationConfig | None = None,
        vector_cache_entries: int = 4096,
        vector_dir: Path | None = None,
        spelling: bool = True,
    ):
        self.pool = pool
        self.embedder = embedder
        self.cache = cache
        self.default_mode = default_mode
        self.fixed_threshold = fixed_threshold
        self.expert_vector = expert_vector
        self.conversation = conversation or ConversationConfig()
        # Typo repair to the card words of each visible set (router/spelling.py); the embedder's whole words
        # are never repaired.
        self.spelling = spelling
        self._known_words = vocabulary_words(getattr(embedder.embedder, "tokenizer", None)) if spelling else frozenset()
        self._card_words: dict[str, Counter[str]] = {}  # card key -> its word counts (router/spelling.py)
        configs = method_configs or {}
        self.methods: dict[str, RoutingMethod] = {n: method_class(n)(configs.get(n)) for n in method_names()}
        # Scope.key -> the index of that visible set ('*': everything, `index`; '': shared only; a tenant: shared
        # and its own). A tenant with no private expert is absent and routed on '' (the same visible set).
        self.views: dict[str, ExpertIndex] = {}
        self.index = ExpertIndex(names=[], vectors=np.zeros((0, embedder.embedder.dim), dtype=np.float32))
        self._rebuild_lock = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()  # background cache writes, kept referenced until done
        # Embeddings of recent turns (by the text embedded): a chat's earlier user turns were embedded when each
        # was the last message, so a follow-up usually embeds only itself.
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._vector_cache_entries = vector_cache_entries
        self.anchors: Anchors | None = None
        self._cards_by_key: dict[str, _Card] = {}  # card key -> embedded card, for the cards of the pool
        self._keys: dict[str, tuple[object, str]] = {}  # expert name -> (its card, the card's key)
        self._store = CardVectorStore(vector_dir) if vector_dir is not None else None
        self._pruned = False
        # expert name -> (card key, best score of each example over the other experts, which expert gave it)
        self._best_other: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
        self._ood_vectors: np.ndarray | None = None
        self._gates_seen: dict[tuple[str, int], frozenset[str]] = {}  # (expert dir, gates file mtime) -> kinds

    # --- index ----------------------------------------------------------------------------------------
    async def rebuild_index(self) -> ExpertIndex:
        """Bring the index up to the pool: embed the experts that are new or changed (description or example
        centroid), and re-calibrate the abstain threshold on the cards' examples against general prompts.

        O(change), not O(pool): cards are embedded once (kept by content, on disk across restarts), and each
        example's best score over the other experts is kept and only compared with the experts that came in;
        it is computed again only for examples whose best expert left. The threshold scan is O(n log n)."""
        async with self._rebuild_lock:
            experts = self.pool.servable()  # quarantined experts are left out
            version = self.pool.version
            cards = await self._cards(experts)
            vectors = (np.stack([c.vector for c in cards]) if cards
                       else np.zeros((0, self.embedder.embedder.dim), dtype=np.float32))
            if self.anchors is None:  # the same for every pool: embedded once
                self.anchors = Anchors(general=await self.embedder.embed_many(list(GENERAL_ANCHORS)),
                                       follow_ups=await self.embedder.embed_many(list(FOLLOW_UP_PHRASES)))
            in_best = None
            if self.fixed_threshold is None:
                if self._ood_vectors is None:  # the same for every pool: embedded once
                    self._ood_vectors = await self.embedder.embed_many(list(OUT_OF_DOMAIN_PROMPTS))
                in_best = await asyncio.to_thread(self._in_domain_best, [e.name for e in experts], cards, vectors)
            gates = await asyncio.to_thread(self._gate_kinds, experts)
            views: dict[str, ExpertIndex] = {}
            every = list(range(len(experts)))
            for key, rows in visible_sets(experts).items():
                if key != "*" and rows == every:  # the same visible set: the same index (no tenants: one index)
                    views[key] = views["*"]
                    continue
                # everything: the pool's version (which ensure_current compares with) and the kept scores
                views[key] = await asyncio.to_thread(
                    self._view, experts, rows, cards, vectors, gates, in_best if key == "*" else None,
                    self._index_version(version) if key == "*" else None)
            self.views = views
            return self.index

    @property
    def index(self) -> ExpertIndex:
        """The index of every servable expert (what admin keys are routed on)."""
        return self.views["*"]

    @index.setter
    def index(self, index: ExpertIndex) -> None:
        """An index set by hand (evaluations, tests) has no tenants: every expert in it is shared."""
        self.views = {"*": index, "": index}

    def _view(self, experts: list[Expert], rows: list[int], cards: list[_Card], vectors: np.ndarray,
              gates: dict[str, frozenset[str]], in_best: np.ndarray | None, version: str | None) -> ExpertIndex:
        """The index of one visible set: its experts' rows, and the abstain threshold calibrated on its cards
        alone (another tenant's examples move neither the threshold nor, through it, this tenant's decisions)."""
        chosen = [experts[i] for i in rows]
        vecs = vectors[rows]
        threshold = self.fixed_threshold
        if threshold is None:
            assert self._ood_vectors is not None  # embedded by rebuild_index
            ood_best = (self._ood_vectors @ vecs.T).max(axis=1) if len(chosen) else np.zeros(0)
            if in_best is None:  # a tenant's set: its examples against its own set's experts only
                in_best = subset_in_domain_best([cards[i] for i in rows], vecs)
            threshold = calibrate_threshold(in_best, ood_best)
        speller = None
        if self.spelling:  # this set's card words only: another tenant's cards repair none of its queries
            speller = Speller.from_uses(self._words_of(chosen, [cards[i].key for i in rows]), self._known_words)
        if version is None:  # named by its own content (servable experts only: a quarantine changes it too), so
            # equal visible sets share cached decisions and others never do
            version = f"{self.pool.version_of(chosen)}.{self.expert_vector}"
        return ExpertIndex(
            names=[e.name for e in chosen],
            vectors=np.ascontiguousarray(vecs),
            threshold=float(threshold),
            # The vector kind changes decisions, so cached ones must not outlive a change of it.
            pool_version=version,
            ranks={e.name: e.rank for e in chosen},
            gates={e.name: gates[e.name] for e in chosen},
            speller=speller,
        )

    def _words_of(self, experts: list[Expert], keys: list[str]) -> Counter[str]:
        """The word counts of these experts' cards, each card's counted once per content (by card key)."""
        uses: Counter[str] = Counter()
        for e, key in zip(experts, keys):
            words = self._card_words.get(key)
            if words is None:
                words = self._card_words[key] = word_uses((e.card.description, *e.card.examples))
            uses.update(words)
        return uses

    def view(self, scope: Scope) -> ExpertIndex:
        """The index `scope` is routed on."""
        views = self.views
        found = views.get(scope.key)
        return found if found is not None else views[""]

    async def _cards(self, experts) -> list[_Card]:
        """Each expert's embedded card: kept from the last build when its texts are the same, else read from the
        store or embedded (all missing cards' texts in one call)."""
        model_id = getattr(self.embedder.embedder, "model_id", "")
        keys = []
        for e in experts:  # an expert's key is hashed once per card object, not on every build
            known = self._keys.get(e.name)
            if known is None or known[0] is not e.card:
                known = self._keys[e.name] = (e.card, card_key(model_id, e.card.description, list(e.card.examples)))
            keys.append(known[1])
        if len(self._keys) > len(experts):
            names = {e.name for e in experts}
            for name in [n for n in self._keys if n not in names]:
                del self._keys[name]
        dim = self.embedder.embedder.dim
        missing: dict[str, object] = {}
        for e, key in zip(experts, keys):
            if key in self._cards_by_key or key in missing:
                continue
            stored = self._store.get(key, len(e.card.examples), dim) if self._store else None
            if stored is not None:
                self._cards_by_key[key] = self._card(key, stored)
            else:
                missing[key] = e.card
        if missing:
            texts = [t for card in missing.values() for t in (card.description, *card.examples)]  # type: ignore[attr-defined]
            # In chunks: one forward pass over a whole pool's texts (33,000 at 1,000 experts) would pad them all to
            # the longest and hold every activation at once.
            rows = np.concatenate([await self.embedder.embed_many(texts[i:i + EMBED_CHUNK])
                                   for i in range(0, len(texts), EMBED_CHUNK)])
            at = 0
            for key, card in missing.items():
                n = 1 + len(card.examples)  # type: ignore[attr-defined]
                embedded = CardVectors(rows[at], rows[at + 1:at + n])
                at += n
                self._cards_by_key[key] = self._card(key, embedded)
                if self._store is not None:
                    await asyncio.to_thread(self._store.put, key, embedded)
        if self._store is not None and not self._pruned:
            self._pruned = True  # once per process: files of cards that left the pool while it was down
            await asyncio.to_thread(self._store.keep_only, set(keys))
        for key in set(self._cards_by_key) - set(keys):
            del self._cards_by_key[key]
        for key in set(self._card_words) - set(keys):
            del self._card_words[key]
        return [self._cards_by_key[k] for k in keys]

    def _card(self, key: str, v: CardVectors) -> _Card:
        vector = expert_vectors(self.expert_vector, v.description[None], [v.examples])[0]
        own = own_scores(self.expert_vector, v.description, v.examples, vector)
        return _Card(key, v.description, v.examples, vector, own)

    def _in_domain_best(self, names: list[str], cards: list[_Card], vectors: np.ndarray) -> np.ndarray:
        """Best expert score of every card example (its own expert's leave-one-out; see index.in_domain_best),
        kept per expert between builds: an unchanged expert's examples are scored only against the experts that
        came in, and scored against all only when the expert that was best for one of them left."""
        previous = self._best_other
        current = dict(zip(names, (c.key for c in cards)))
        gone = {n for n, (key, _, _) in previous.items() if current.get(n) != key}
        came = [i for i, n in enumerate(names) if n not in previous or previous[n][0] != current[n]]
        came_names = np.array([names[i] for i in came], dtype=object)
        best_other: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
        rows = []
        for i, (name, card) in enumerate(zip(names, cards)):
            ex, at = card.examples, np.arange(len(card.examples))
            kept = previous.get(name)
            if kept is not None and kept[0] == card.key and not (gone and gone & set(kept[2].tolist())):
                _, best, by = kept
                if came and len(ex):  # only the experts that came in can beat the kept best
                    scores = ex @ vectors[came].T
                    j = scores.argmax(axis=1)
                    better = scores[at, j] > best
                    best, by = np.where(better, scores[at, j], best), np.where(better, came_names[j], by)
            else:  # new or changed, or its best expert for some example left: against every other expert
                scores = ex @ vectors.T
                scores[:, i] = -np.inf
                j = scores.argmax(axis=1)
                best, by = scores[at, j], np.array([names[k] for k in j], dtype=object)
            best_other[name] = (card.key, best, by)
            if len(ex):
                rows.append(np.maximum(card.own, best))
        self._best_other = best_other
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.float32)

    def _gate_kinds(self, experts) -> dict[str, frozenset[str]]:
        """Gate signals each expert has, read from its gates file once per version of that file."""
        from adapters.gates import KINDS, has_gates

        kinds: dict[str, frozenset[str]] = {}
        for e in experts:
            gates = e.path / "gates.safetensors"
            try:
                key = (str(e.path), gates.stat().st_mtime_ns)
            except OSError:
                key = (str(e.path), 0)
            if key not in self._gates_seen:
                try:
                    self._gates_seen[key] = frozenset(k for k in KINDS if has_gates(e.path, k))
                except OSError:  # removed or broken meanwhile: no gates now; read again next time
                    kinds[e.name] = frozenset()
                    continue
            kinds[e.name] = self._gates_seen[key]
        current = {(str(e.path),) for e in experts}
        for key in [k for k in self._gates_seen if k[:1] not in current]:
            del self._gates_seen[key]
        return kinds

    def _index_version(self, pool_version: str) -> str:
        # The vector kind and the quarantined set change decisions too: cached ones must not outlive either.
        return f"{pool_version}.{self.pool.health_version}.{self.expert_vector}"

    async def ensure_current(self, attempts: int = 3) -> None:
        """Wait until the index reflects the pool as it is now: a change may be mid-rebuild (wait for it) or
        not yet rebuilt (rebuild now). Bounded, for a pool that keeps changing."""
        for _ in range(attempts):
            if self.index.pool_version == self._index_version(self.pool.version):
                return
            if self._rebuild_lock.locked():
                async with self._rebuild_lock:
                    pass
            else:
                await self.rebuild_index()

    # --- routing --------------------------------------------------------------------------------------
    def method(self, mode: str | None) -> RoutingMethod:
        name = mode or self.default_mode
        if name not in self.methods:
            raise KeyError(f"unknown routing mode {name!r}; known: {', '.join(sorted(self.methods))}")
        return self.methods[name]

    async def route(self, query: str, params: RoutingParams | None = None, scope: Scope = EVERYTHING) -> RouteResult:
        """Decide for `query`: a str, or a `Query` carrying a chat's earlier user turns (router/query.py), among
        the experts `scope` may see."""
        params = params or RoutingParams()
        method = self.method(params.mode)
        index = self.view(scope)
        stages: dict[str, float] = {}
        turns = Query.of(query).turns()
        if self.conversation.mechanism == "last":  # earlier turns are neither embedded nor part of the key
            turns = turns[-1:]
        if index.speller is not None:  # typos repaired: what is embedded, and what keys the decision
            t0 = time.perf_counter()
            turns = index.texts(turns)
            stages["spelling"] = time.perf_counter() - t0
        conversation = self.conversation if len(turns) > 1 else None
        cache_params = method.cache_params(params)
        if conversation is not None:  # the decision depends on the earlier turns and on how they are weighed
            cache_params = {**cache_params, **conversation.cache_params()}
        key = cache_key(index.pool_version, method.name, cache_params, tuple("\x1f".join(t) for t in turns))

        cache_status = "off"
        if self.cache is None:
            vectors, own = await self._embed(turns, index, stages)
        else:
            t0 = time.perf_counter()
            hit = self.cache.get_local(key)
            if hit is not None:
                stages["cache"] = time.perf_counter() - t0
                return RouteResult(hit.model_copy(update={"cached": True}), stages, "hit")
            # Not decided here: ask Redis (another replica, or this one before a restart, may have decided) while
            # the query is embedded, so a miss does not wait a round trip before its embedding starts. A Redis
            # hit drops the embedding (cancelled if it has not started).
            embedding = asyncio.ensure_future(self._embed(turns, index, stages))
            try:
                hit, cache_status = await self.cache.get_remote(key)
                stages["cache"] = time.perf_counter() - t0
                if hit is not None:
                    return RouteResult(hit.model_copy(update={"cached": True}), stages, cache_status)
                vectors, own = await embedding
            finally:
                if not embedding.done():
                    embedding.cancel()
                elif not embedding.cancelled():
                    embedding.exception()  # retrieved: an embedding that failed after a Redis hit is not an error
        if conversation is not None and self.anchors is not None:
            t0 = time.perf_counter()
            scores = fold(vectors, own, index.threshold, self.anchors, conversation)
            stages["conversation"] = time.perf_counter() - t0
        else:
            scores = own[-1]
        t0 = time.perf_counter()
        decision = self.decide_scores(scores, method, params, index)
        stages["score"] = time.perf_counter() - t0

        if self.cache is not None and cache_status != "bypass":
            # Stored in the background: the request does not wait for the write.
            task = asyncio.get_running_loop().create_task(self.cache.set(key, decision))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return RouteResult(decision, stages, cache_status)

    async def explain(self, query: str, scope: Scope = EVERYTHING) -> tuple[dict[str, float], float]:
        """Every expert's score for `query` (a conversation's earlier turns folded in, as `route` does) and the
        abstain threshold: what the routing console charts, over the experts `scope` may see (its own index
        and threshold). Not cached; the embeddings are remembered."""
        index = self.view(scope)
        turns = Query.of(query).turns()
        if self.conversation.mechanism == "last":
            turns = turns[-1:]
        turns = index.texts(turns)
        vectors, own = await self._embed(turns, index, {})
        scores = own[-1]
        if len(turns) > 1 and self.anchors is not None:
            scores = fold(vectors, own, index.threshold, self.anchors, self.conversation)
        return {name: round(float(s), 4) for name, s in zip(index.names, scores)}, round(index.threshold, 4)

    async def _embed(self, turns: tuple[tuple[str, ...], ...], index: ExpertIndex,
                     stages: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, scores) of the user turns, oldest first: each turn's unit embedding (its first text's) and
        its expert scores (the best over its texts, see router/query.py). Remembered embeddings are reused,
        the others embedded together (the micro-batcher puts them in one forward pass)."""
        t0 = time.perf_counter()
        texts = list(dict.fromkeys(t for turn in turns for t in turn))
        missing = [t for t in texts if t not in self._vectors]
        if missing:
            for text, fresh in zip(missing, await asyncio.gather(*(self.embedder.embed(t) for t in missing))):
                self._remember(text, fresh)
        found: dict[str, np.ndarray] = {}
        for t in texts:
            vector = self._vectors.get(t)
            if vector is None:  # evicted meanwhile by concurrent requests: embed again
                vector = await self.embedder.embed(t)
            else:
                self._vectors.move_to_end(t)
            found[t] = vector
        vectors = np.stack([found[turn[0]] for turn in turns])
        scores = np.stack([np.max([index.scores(found[t]) for t in turn], axis=0) for turn in turns])
        stages["embed"] = time.perf_counter() - t0
        return vectors, scores

    def forget_embeddings(self) -> None:
        """Drop the remembered turn embeddings (benchmarks that time embedding)."""
        self._vectors.clear()

    def _remember(self, text: str, vector: np.ndarray) -> None:
        self._vectors[text] = vector
        while len(self._vectors) > self._vector_cache_entries:
            self._vectors.popitem(last=False)

    async def drain(self) -> None:
        """Wait for background cache writes (tests, benchmarks and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    @staticmethod
    def decide(vector: np.ndarray, method: RoutingMethod, params: RoutingParams, index: ExpertIndex) -> RoutingDecision:
        """The pure part: a query vector and a method give a decision (no I/O; used by `flock bench`)."""
        return Router.decide_scores(index.scores(vector), method, params, index)

    @staticmethod
    def decide_scores(scores: np.ndarray, method: RoutingMethod, params: RoutingParams,
                      index: ExpertIndex) -> RoutingDecision:
        experts = method.choose(scores, index, params)
        # One expert is served as itself (service/resolve.py): a gate over one candidate would mix nothing.
        return RoutingDecision(mode=method.name, experts=experts,
                               gate=method.gate(params) if len(experts) > 1 else None)


def visible_sets(experts: list[Expert]) -> dict[str, list[int]]:
    """Scope.key -> the rows of `experts` that scope sees: '*' all, '' the shared ones, each owning tenant its
    own and the shared ones."""
    shared = [i for i, e in enumerate(experts) if e.tenant is None]
    sets = {"*": list(range(len(experts))), "": shared}
    for tenant in sorted({e.tenant for e in experts if e.tenant is not None}):
        sets[tenant] = [i for i, e in enumerate(experts) if e.tenant in (None, tenant)]
    return sets


def subset_in_domain_best(cards: list[_Card], vectors: np.ndarray) -> np.ndarray:
    """Best expert score of every example of `cards` within this set of experts (`vectors`, in the same order):
    its own expert's score (leave-one-out, see index.in_domain_best) or the best other's, whichever is higher."""
    rows = []
    for i, card in enumerate(cards):
        if not len(card.examples):
            continue
        scores = card.examples @ vectors.T
        scores[:, i] = -np.inf
        rows.append(np.maximum(card.own, scores.max(axis=1)))
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.float32)
