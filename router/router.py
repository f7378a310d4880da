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
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from adapters.pool import Expert, ExpertPool
from adapters.tenants import EVERYTHING, Scope
from router.cache import RoutingCache, cache_key
from router.calibration import FOLLOW_UP_PHRASES, GENERAL_ANCHORS, OUT_OF_DOMAIN_PROMPTS
from router.conversation import Anchors, ConversationConfig, fold
from router.decision import RoutingDecision, RoutingParams
from router.embed import MicroBatcher
from router.index import ExpertIndex, calibrate_threshold, expert_vectors, in_domain_best
from router.methods import MethodConfig, RoutingMethod, method_class, method_names
from router.query import Query

StageObserver = Callable[[str, float], None]


@dataclass
class RouteResult:
    decision: RoutingDecision
    # seconds per stage: cache, embed, conversation (chats with earlier user turns), score; cache and embed
    # overlap on a local miss
    stages: dict[str, float]
    cache: str  # hit, miss, bypass (Redis down) or off (no cache configured)


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
    ):
        self.pool = pool
        self.embedder = embedder
        self.cache = cache
        self.default_mode = default_mode
        self.fixed_threshold = fixed_threshold
        self.expert_vector = expert_vector
        self.conversation = conversation or ConversationConfig()
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
        self._card_vectors: dict[str, np.ndarray] = {}  # card text -> embedding, for the texts of the pool
        self._ood_vectors: np.ndarray | None = None
        self._gates_seen: dict[tuple[str, int], frozenset[str]] = {}  # (expert dir, gates file mtime) -> kinds

    # --- index ----------------------------------------------------------------------------------------
    async def rebuild_index(self) -> ExpertIndex:
        """Embed every expert (description or example centroid) and re-calibrate the abstain threshold on the
        cards' examples against general prompts."""
        async with self._rebuild_lock:
            experts = self.pool.servable()  # quarantined experts are left out
            version = self.pool.version
            descriptions = await self._card_embeddings([e.card.description for e in experts])
            examples = [x for e in experts for x in e.card.examples]
            in_vecs = await self._card_embeddings(examples)
            self._forget_card_texts({e.card.description for e in experts} | set(examples))
            bounds = np.cumsum([0] + [len(e.card.examples) for e in experts])
            per_expert = [in_vecs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            vectors = expert_vectors(self.expert_vector, descriptions, per_expert)
            if self.anchors is None:  # the same for every pool: embedded once
                self.anchors = Anchors(general=await self.embedder.embed_many(list(GENERAL_ANCHORS)),
                                       follow_ups=await self.embedder.embed_many(list(FOLLOW_UP_PHRASES)))
            if self.fixed_threshold is None and self._ood_vectors is None:  # the same for every pool: embedded once
                self._ood_vectors = await self.embedder.embed_many(list(OUT_OF_DOMAIN_PROMPTS))
            gates = await asyncio.to_thread(self._gate_kinds, experts)
            views: dict[str, ExpertIndex] = {}
            every = list(range(len(experts)))
            for key, rows in visible_sets(experts).items():
                if key != "*" and rows == every:  # the same visible set: the same index (no tenants: one index)
                    views[key] = views["*"]
                    continue
                views[key] = self._view(experts, rows, descriptions, per_expert, vectors, gates,
                                        # everything: the pool's version, which ensure_current compares with
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

    def _view(self, experts: list[Expert], rows: list[int], descriptions: np.ndarray,
              per_expert: list[np.ndarray], vectors: np.ndarray, gates: dict[str, frozenset[str]],
              version: str | None) -> ExpertIndex:
        """The index of one visible set: its experts' rows, and the abstain threshold calibrated on its cards
        alone (another tenant's examples move neither the threshold nor, through it, this tenant's decisions)."""
        chosen = [experts[i] for i in rows]
        vecs, descs, examples = vectors[rows], descriptions[rows], [per_expert[i] for i in rows]
        threshold = self.fixed_threshold
        if threshold is None:
            assert self._ood_vectors is not None  # embedded by rebuild_index
            ood_best = (self._ood_vectors @ vecs.T).max(axis=1) if len(chosen) else np.zeros(0)
            threshold = calibrate_threshold(in_domain_best(self.expert_vector, descs, examples, vecs), ood_best)
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
        )

    def view(self, scope: Scope) -> ExpertIndex:
        """The index `scope` is routed on."""
        views = self.views
        found = views.get(scope.key)
        return found if found is not None else views[""]

    async def _card_embeddings(self, texts: list[str]) -> np.ndarray:
        """Embeddings of card texts, each distinct text embedded once: a pool change embeds only the cards that
        are new or changed, not the whole pool: a registration costs O(change), not O(pool)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._card_vectors))
        if missing:
            self._card_vectors.update(zip(missing, await self.embedder.embed_many(missing), strict=True))
        if not texts:
            return np.zeros((0, self.embedder.embedder.dim), dtype=np.float32)
        return np.stack([self._card_vectors[t] for t in texts])

    def _forget_card_texts(self, keep: set[str]) -> None:
        for text in [t for t in self._card_vectors if t not in keep]:
            del self._card_vectors[text]

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
        return RoutingDecision(mode=method.name, experts=experts, gate=method.gate(params) if experts else None)


def visible_sets(experts: list[Expert]) -> dict[str, list[int]]:
    """Scope.key -> the rows of `experts` that scope sees: '*' all, '' the shared ones, each owning tenant its
    own and the shared ones."""
    shared = [i for i, e in enumerate(experts) if e.tenant is None]
    sets = {"*": list(range(len(experts))), "": shared}
    for tenant in sorted({e.tenant for e in experts if e.tenant is not None}):
        sets[tenant] = [i for i, e in enumerate(experts) if e.tenant in (None, tenant)]
    return sets
