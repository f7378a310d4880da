"""Conversation-aware routing and long prompts, without a model: the query the gateway builds from a chat, the
sticky fold on hand-made vectors, the decision-cache key (same last message, another history: another key and
decision), and bounded work for long prompts (what is embedded does not grow with the prompt)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from eval import report, styles
from eval.conversations import DEV_STYLES, STYLES, build_conversations, conversation_summary
from router.cache import RoutingCache, cache_key
from router.conversation import Anchors, ConversationConfig, fold
from router.decision import RoutingDecision
from router.index import ExpertIndex
from router.query import HISTORY_TURNS, TAIL_CHARS, Query, routing_text, routing_texts
from router.router import Router
from service.processes import free_port
from service.protocol import ChatCompletionRequest, ChatMessage
from service.query import chat_query, query_text
from tests.unit.test_eval import DIM, bag_of_words

# --- the query a chat becomes ---------------------------------------------------------------------------


def msgs(*pairs: tuple[str, object]) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]  # type: ignore[arg-type]


def test_a_query_is_its_last_message_carrying_the_user_turns_before_it():
    q = chat_query(msgs(("system", "be brief"), ("user", "What is the opposite of 'hot'?"), ("assistant", "cold"),
                        ("user", "And of 'early'?")))
    assert q == "And of 'early'?" and isinstance(q, str) and len(q) == len("And of 'early'?")
    assert q.history == ("What is the opposite of 'hot'?",)  # assistant and system turns are not read
    assert pickle.loads(pickle.dumps(q)).history == q.history
    assert Query.of("plain").history == ()


def test_only_the_newest_user_turns_are_read():
    many = msgs(*[("user", f"turn {i}") for i in range(300)])
    q = chat_query(many)
    assert q == "turn 299" and q.history == tuple(f"turn {i}" for i in range(299 - HISTORY_TURNS, 299))


def test_content_parts_and_chats_without_a_user_turn():
    q = chat_query(msgs(("user", [{"type": "text", "text": "Sort"}, {"type": "image_url", "image_url": {"url": "x"}},
                                  {"type": "text", "text": "3, 1, 2"}])))
    assert q == "Sort 3, 1, 2"
    assert chat_query(msgs(("assistant", "Hello!"), ("system", "hi"))) == ""
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}])  # type: ignore[list-item]
    assert isinstance(query_text(body), Query)


# --- long prompts: bounded work ---------------------------------------------------------------------------
def test_routing_texts_of_a_long_prompt_are_its_tail_and_last_sentence():
    short = "What is the opposite of 'hot'?"
    assert routing_texts(short) == (short,)
    prompt = "The committee met on Monday. " * 2000 + "Please sort these numbers: 5, 3, 9."
    texts = routing_texts(prompt)
    assert all(len(t) <= TAIL_CHARS for t in texts) and len(texts) == 2
    assert prompt.endswith(texts[0]) and texts[0].startswith("The committee")  # from a sentence boundary
    assert texts[1] == "Please sort these numbers: 5, 3, 9."
    assert routing_text("x" * 10_000) == "x" * TAIL_CHARS  # no boundary at all: the raw tail


class CountingBatcher:
    """Bag-of-words embeddings; records every text embedded."""

    def __init__(self):
        self.embedder = type("E", (), {"dim": DIM})()
        self.texts: list[str] = []

    async def embed(self, text: str) -> np.ndarray:
        self.texts.append(text)
        return bag_of_words(text)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return np.stack([bag_of_words(t) for t in texts])


def router_with(experts: dict[str, str], embedder: CountingBatcher, cache=None, **kw) -> Router:
    router = Router(pool=None, embedder=embedder, cache=cache, **kw)  # type: ignore[arg-type]
    router.index = ExpertIndex(names=list(experts), vectors=np.stack([bag_of_words(t) for t in experts.values()]),
                               threshold=0.3, pool_version="p1")
    router.anchors = Anchors(general=np.stack([bag_of_words("tell me a joke about the weather")]),
                             follow_ups=np.stack([bag_of_words("and this one")]))
    return router


EXPERTS = {"sorter": "sort these numbers ascending order", "antonym": "opposite antonym word meaning"}


@pytest.mark.parametrize("size", [1_000, 32_000, 1_000_000])
async def test_long_prompt_routing_embeds_a_bounded_text(size):
    embedder = CountingBatcher()
    router = router_with(EXPERTS, embedder)
    filler = "The garden is planted with lavender and old apple trees. "
    prompt = filler * (size // len(filler)) + "Please sort these numbers in ascending order: 5, 3, 9."
    result = await router.route(prompt)
    assert result.decision.experts[0].name == "sorter"
    # The work does not grow with the prompt: at most two texts of at most TAIL_CHARS characters embedded.
    assert len(embedder.texts) <= 2 and sum(len(t) for t in embedder.texts) <= 2 * TAIL_CHARS
    assert set(result.stages) >= {"embed", "score"}


# --- the sticky fold ------------------------------------------------------------------------------------
E = np.eye(6, dtype=np.float32)  # axes: 0 sorter, 1 antonym, 2 general chat, 3 follow-up phrasing, 4/5 noise


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


EXPERT_VECTORS = E[:2]
ANCHORS = Anchors(general=E[2:3], follow_ups=E[3:4])


def run_fold(*turns, config: ConversationConfig | None = None) -> int | None:
    vectors = np.stack([unit(t) for t in turns])
    scores = fold(vectors, vectors @ EXPERT_VECTORS.T, 0.5, ANCHORS, config or ConversationConfig())
    best = int(np.argmax(scores))
    return best if scores[best] >= 0.5 else None


def test_a_follow_up_keeps_the_conversations_expert():
    sort_prompt = [1, 0, 0, 0, 0.2, 0]
    follow_up = [0.35, 0.1, 0, 0.8, 0, 0.4]  # names no task: below the threshold, close to a follow-up phrase
    assert run_fold(follow_up) is None  # alone, the base model
    assert run_fold(sort_prompt, follow_up) == 0
    assert run_fold(sort_prompt, follow_up, follow_up) == 0  # and again, after a follow-up
    assert run_fold(follow_up, config=ConversationConfig(mechanism="last")) is None


def test_a_clear_switch_and_general_chat_are_routed_on_their_own():
    sort_prompt = [1, 0, 0, 0, 0.2, 0]
    antonym_prompt = [0.1, 1, 0, 0, 0, 0.1]
    general = [0.05, 0, 1, 0, 0.3, 0]
    assert run_fold(sort_prompt, antonym_prompt) == 1
    assert run_fold(sort_prompt, general) is None
    assert run_fold(general, [0.35, 0.1, 0, 0.8, 0, 0.4]) is None  # nothing to keep after general chat


# --- the decision cache ---------------------------------------------------------------------------------
def test_the_cache_key_names_the_history():
    k1 = cache_key("p", "global", {}, ("What is the opposite of 'hot'?", "And 'early'?"))
    k2 = cache_key("p", "global", {}, ("Sort 3, 1, 2", "And 'early'?"))
    k3 = cache_key("p", "global", {}, ("And 'early'?",))
    assert len({k1, k2, k3}) == 3
    assert cache_key("p", "global", {}, "And  'EARLY'?") == cache_key("p", "global", {}, ("and 'early'?",))


class LocalOnly(RoutingCache):
    """The in-process part of the routing cache; Redis is never reached (every remote lookup misses)."""

    def __init__(self):
        super().__init__(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60)

    async def get_remote(self, key: str):
        return None, "miss"

    async def set(self, key: str, decision: RoutingDecision) -> None:
        self.local.put(key, decision, self.ttl_s)


async def test_same_last_message_after_another_history_is_decided_again():
    embedder = CountingBatcher()
    cache = LocalOnly()
    always_keep = ConversationConfig(keep_weights=(0.0, 0.0, 0.0, 0.0), keep_bias=1.0)
    router = router_with(EXPERTS, embedder, cache, conversation=always_keep)
    try:
        follow_up = "and 'early'"
        sort = await router.route(Query(follow_up, ["sort these numbers in ascending order 3 1 2"]))
        await router.drain()
        opposite = await router.route(Query(follow_up, ["what is the opposite word of hot"]))
        await router.drain()
        again = await router.route(Query(follow_up, ["what is the opposite word of hot"]))
        alone = await router.route(follow_up)
    finally:
        await cache.close()
    assert sort.decision.experts[0].name == "sorter" and sort.cache == "miss"
    assert opposite.cache == "miss" and opposite.decision.experts[0].name == "antonym"
    assert again.cache == "hit" and again.decision.experts[0].name == "antonym"
    assert alone.cache == "miss" and alone.decision.experts == []
    assert "conversation" in opposite.stages
    # The follow-up was embedded once; the second history's turn once: remembered embeddings are reused.
    assert embedder.texts.count(follow_up) == 1


# --- the benchmark's conversations ----------------------------------------------------------------------
def test_conversations_are_seeded_and_dev_never_uses_test_only_styles():
    a, b = build_conversations(40, "test"), build_conversations(40, "test")
    assert a == b and all(2 <= len(c.turns) <= 4 for c in a)
    dev = build_conversations(200, "dev")
    assert all(t.style is None or t.style < DEV_STYLES for c in dev for t in c.turns)
    assert len(STYLES) >= 10
    kinds = {t.kind for c in a + dev for t in c.turns}
    assert kinds == {"first", "follow_up", "switch_task", "switch_ood"}
    msgs_ = a[0].messages(len(a[0].turns) - 1)
    assert msgs_[-1]["role"] == "user" and len(msgs_) == 2 * len(a[0].turns) - 1
    s = conversation_summary([{"kind": "follow_up", "expected": "x", "top": "x", "style": 0},
                              {"kind": "switch_ood", "expected": None, "top": "x", "style": None}])
    assert s["follow_up"] == 1.0 and s["switch"] == 0.0


# --- unseen styles and the report -------------------------------------------------------------------------
def test_styled_sets_are_seeded_and_dev_and_test_share_no_wrapper():
    assert not set(styles.DEV_WRAPPERS) & set(styles.TEST_WRAPPERS)
    assert styles.styled_set("test", 3) == styles.styled_set("test", 3)
    scores = np.array([[0.9, 0.1], [0.5, 0.45], [0.2, 0.1]])
    assert styles.predict_threshold(scores, 0.4) == [0, 0, None]
    assert styles.predict_threshold(scores, 0.4, margin=0.1) == [0, None, None]
    assert styles.predict_threshold(scores, np.array([0.95, 0.1])) == [None, None, None]
    w, b = styles.fit_softmax(scores, [0, 1, None])
    assert styles.predict_softmax(scores, w, b)[0] == 0


def test_report_renders_the_new_sections():
    conv = {"n_conversations": 2, "split": "test", "turns": 5, "served": {}, "fit_on_dev": {"conv": "sticky"},
            "history_cost": {"cold": {"p50": 1.0, "p95": 2.0}},
            "mechanisms": {"last message only": {"follow_up": 0.5, "switch": 1.0, "route_ms_p95": 3.0}}}
    long = {"n_per_task": 1, "served_tail_chars": 192, "by_layout": {"blank line": {"1000": {
        "tail 192 + last sentence": {"top1_held_in": 0.99, "ood_abstain": 1.0}, "served": {"route_ms_p50": 5.0}}}}}
    st = {"n_per_task": 1, "methods": {"kNN (k=5)": {"dev": {"top1_held_in": 1.0, "ood_abstain": 0.5},
                                                     "test": {"top1_held_in": 0.9, "ood_abstain": 0.5}}}}
    md = report.render_markdown({"routing": {"conversations": conv, "long_prompts": long, "styles": st}})
    assert "| last message only | 50.0% |" in md and "| blank line | 1000 |" in md and "| kNN (k=5) |" in md


async def test_last_message_routing_reads_no_history():
    embedder = CountingBatcher()
    router = router_with(EXPERTS, embedder, conversation=ConversationConfig(mechanism="last"))
    result = await router.route(Query("and 'early'", ["sort these numbers in ascending order 3 1 2"]))
    assert result.decision.experts == [] and embedder.texts == ["and 'early'"]
    assert "conversation" not in result.stages
