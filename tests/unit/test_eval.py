"""`flock eval` with small fakes: the metrics arithmetic, the markdown, the centroid variant, the GLIDER cache and
the generation client against an httpx.MockTransport gateway. No model, no server."""

from __future__ import annotations

import hashlib
import json
import re

import httpx
import numpy as np
import pytest

from adapters.card import ExpertCard
from adapters.pool import ExpertPool
from adapters.validate import ModelShape
from eval import generation, harness, metrics, report, routing
from eval.testset import EvalExample, build_test_set
from router.decision import RoutingParams
from router.router import Router
from training.synthetic import write_random_lora

BASE = "SmolLM2-135M-Instruct"
SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})
DIM = 256
STOPWORDS = {"a", "an", "the", "to", "in", "of", "for", "with", "and", "by", "is", "what", "how", "me", "my", "i",
             "you", "do", "can", "about", "on", "it", "are", "some", "your", "this", "that", "all", "good"}


# --- fakes ----------------------------------------------------------------------------------------------
def bag_of_words(text: str) -> np.ndarray:
    """Hashed bag of content words, L2-normalised: cosine similarity is word overlap."""
    v = np.zeros(DIM, dtype=np.float32)
    for word in set(re.findall(r"[a-z0-9]+", text.lower())) - STOPWORDS:
        v[int(hashlib.sha256(word.encode()).hexdigest(), 16) % DIM] += 1.0
    n = np.linalg.norm(v)
    return v / n if n else v


class FakeEmbedder:
    dim = DIM

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([bag_of_words(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)


class FakeBatcher:
    """The MicroBatcher interface the Router uses."""

    def __init__(self):
        self.embedder = FakeEmbedder()

    async def embed(self, text: str) -> np.ndarray:
        return bag_of_words(text)

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    async def stop(self) -> None:
        pass


async def fake_embed_many(texts: list[str]) -> np.ndarray:
    return FakeEmbedder().encode(texts)


def rec(task, top=None, correct=False, kind="held_in", test_only=False, **kw) -> dict:
    return {"task": task, "kind": kind, "test_only": test_only, "top": top, "correct": correct, **kw}


def ex(task, prompt, kind="held_in", test_only=False, answer="") -> EvalExample:
    return EvalExample(task=task, kind=kind, prompt=prompt, answer=answer, phrasing_id=0, test_only=test_only)


# --- metrics --------------------------------------------------------------------------------------------
def test_metrics_arithmetic():
    records = [rec("a", correct=True), rec("a", correct=False), rec("a", correct=True), rec("a", correct=True),
               rec("b", correct=True), rec("b", correct=False)]
    per_task = metrics.per_task_accuracy(records)
    assert per_task == {"a": 0.75, "b": 0.5}
    assert metrics.tasks_mean(per_task, ["a", "b", "missing"]) == pytest.approx(0.625)  # macro, not micro
    assert metrics.pct_of_oracle(0.5, 0.8) == pytest.approx(62.5)
    assert metrics.pct_of_oracle(0.5, 0.0) is None and metrics.pct_of_oracle(None, 0.8) is None
    routed = [rec("ood", None, kind="ood"), rec("ood", "a", kind="ood"), rec("ood", None, kind="ood"),
              rec("ood", None, kind="ood")]
    assert metrics.abstain_rate(routed) == 0.75
    assert metrics.abstain_rate([]) is None
    assert metrics.top1_accuracy([rec("a", "a"), rec("a", "b"), rec("b", "b"), rec("b", None)]) == 0.5
    assert metrics.top_expert([{"name": "x", "weight": 0.4}, {"name": "y", "weight": 0.6}]) == "y"
    assert metrics.top_expert([]) is None
    assert metrics.distribution(["a", None, "a", "b"]) == {"a": 0.5, "b": 0.25, "base": 0.25}
    assert metrics.p50([3.0, 1.0, 2.0]) == 2.0 and metrics.p50([None]) is None


def test_mode_summary_and_relative_numbers():
    held_in, held_out = ["a", "b"], ["c"]

    def recs(acc_a, acc_b, acc_c, top=None):
        out = []
        for task, acc in (("a", acc_a), ("b", acc_b), ("c", acc_c)):
            for i in range(4):
                out.append(rec(task, top if top is None else task if task != "c" else "a", correct=i < acc * 4,
                               kind="held_out" if task == "c" else "held_in", test_only=i == 0, gateway_ms=1.0 + i))
        out += [rec("ood", None, True, kind="ood"), rec("ood", "a", True, kind="ood")]
        return out

    summaries = harness.summarize_modes({"base": recs(0.25, 0.25, 0.5), "oracle": recs(1.0, 0.5, 0.5),
                                         "global": recs(0.75, 0.5, 0.75, top="x")},
                                        held_in, held_out)
    base, oracle, glob = summaries["base"], summaries["oracle"], summaries["global"]
    assert oracle["held_in_mean"] == 0.75 and glob["held_in_mean"] == 0.625
    assert glob["pct_of_oracle"] == pytest.approx(100 * 0.625 / 0.75)
    assert oracle["pct_of_oracle"] == pytest.approx(100.0)
    assert glob["held_out_vs_base"] == pytest.approx(0.25) and base["held_out_vs_base"] == 0
    assert "ood" not in glob["accuracy_per_task"]  # ood never counts as accuracy
    assert base["routing"] is None and oracle["routing"] is None  # not routed: no routing numbers
    r = glob["routing"]
    assert r["top1_held_in"] == 1.0 and r["ood_abstain"] == 0.5
    assert r["held_out_distribution"] == {"c": {"a": 1.0}}
    assert glob["gateway_ms_p50"] == 2.5
    assert glob["held_in_mean_test_only_phrasings"] == 1.0  # i == 0 is always correct here
    split = oracle["held_in_by_phrasing"]  # per expert: training's phrasing families vs test-only ones
    assert split["seen"] == {"a": 1.0, "b": pytest.approx(1 / 3)} and split["test_only"] == {"a": 1.0, "b": 1.0}
    assert split["n_seen"] == {"a": 3, "b": 3} and split["n_test_only"] == {"a": 1, "b": 1}  # held-out c: none


# --- markdown -------------------------------------------------------------------------------------------
def test_markdown_rendering():
    results = {
        "config": {"n_per_task": 4, "seed": 7, "experts": ["a", "b"], "library": "/lib", "date": "today"},
        "tasks": [["a", "held_in"], ["b", "held_in"], ["c", "held_out"], ["ood", "ood"]],
        "modes": {
            "base": {"accuracy_per_task": {"a": 0.5, "b": 0.25, "c": 0.5}, "held_in_mean": 0.375,
                     "pct_of_oracle": 50.0, "held_out_mean": 0.5, "held_out_vs_base": 0.0, "routing": None,
                     "gateway_ms_p50": 0.12, "errors": 0},
            "global": {"accuracy_per_task": {"a": 1.0, "b": 0.5, "c": 0.75}, "held_in_mean": 0.75,
                       "held_in_mean_test_only_phrasings": 0.625, "pct_of_oracle": 100.0, "held_out_mean": 0.75,
                       "held_out_vs_base": 0.25,
                       "routing": {"top1_held_in": 0.9, "ood_abstain": 0.8}, "gateway_ms_p50": 6.5, "errors": 1},
        },
        "routing": {"variants": {"description": {
            "top1_held_in": 0.9, "top1_held_in_test_only": 0.8, "held_in_abstain": 0.05, "ood_abstain": 0.8,
            "held_out_distribution": {"c": {"a": 0.6, "base": 0.3, "b": 0.1}}, "threshold": 0.31234,
            "latency_ms_p50": 5.25, "top1_per_task": {"a": 1.0, "b": 0.8}, "note": "the service's index"}},
            "skipped": {"glider": "no LLM"}},
    }
    md = report.render_markdown(results)
    lines = md.splitlines()
    assert ("| mode | held-in mean | held-in, held-out phrasings | % of oracle | held-out mean (vs base) | "
            "routing top-1 | ood abstain |") in md
    assert "| base | 37.5% | – | 50.0% | 50.0% | – | – | 0.12 | 0 |" in lines
    assert "| global | 75.0% | 62.5% | 100.0% | 75.0% (+25.0 pp) | 90.0% | 80.0% | 6.50 | 1 |" in lines
    assert "| a | held_in | 50.0% | 100.0% |" in lines and "| c | held_out | 50.0% | 75.0% |" in lines
    assert not any(line.startswith("| ood |") for line in lines)  # ood has no accuracy row
    assert "| description | 90.0% | 80.0% | 5.0% | 80.0% | c: a 60%, base 30% | 0.312 | 5.25 |" in lines
    assert "- **glider** skipped: no LLM" in lines
    assert "experts in the pool (/lib). today" in md and "dtype" not in lines[2]  # an external engine: unknown
    results["config"]["vllm_dtype"] = "bfloat16"
    assert "experts in the pool (/lib). vLLM dtype bfloat16. today" in report.render_markdown(results)
    results["config"]["glider_defaults"] = {"alpha": 100.0, "solo_margin": None}
    assert "bfloat16. glider without parameters: α 100, always mixing. today" in report.render_markdown(results)
    results["config"]["glider_defaults"]["solo_margin"] = 0.05
    assert "glider without parameters: α 100, solo margin 0.05. today" in report.render_markdown(results)
    assert "### Held-in tasks by phrasing family" not in md  # no oracle mode: no split table
    results["modes"]["oracle"] = {"accuracy_per_task": {"a": 0.75, "b": 1.0}, "held_in_by_phrasing": {
        "seen": {"a": 1.0, "b": 1.0}, "test_only": {"a": 0.5}, "n_seen": {"a": 2, "b": 4}, "n_test_only": {"a": 2}}}
    lines = report.render_markdown(results).splitlines()
    assert "| a | 100.0% (n=2) | 50.0% (n=2) | 75.0% |" in lines and "| b | 100.0% (n=4) | – (n=0) | 100.0% |" in lines
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in rows}) <= 1, block


def test_plot_writes_png(tmp_path):
    results = {"tasks": [["a", "held_in"], ["c", "held_out"]],
               "modes": {"base": {"accuracy_per_task": {"a": 0.5, "c": 0.2}},
                         "global": {"accuracy_per_task": {"a": 0.9}}},
               "routing": {"variants": {"description": {"top1_per_task": {"a": 1.0}}}}}
    assert report.plot(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# --- centroid variant -----------------------------------------------------------------------------------
async def test_centroid_routes_to_closest_examples():
    # Descriptions are vague on purpose; the examples say what each expert really sees.
    specs = [routing.ExpertSpec("cook", "helps with many kinds of everyday requests",
                                ("bake bread with flour and yeast", "oven temperature for a flour cake")),
             routing.ExpertSpec("sqlx", "helps with many kinds of data requests",
                                ("select rows from the employees table", "sql join employees and departments"))]
    variant = await routing.centroid_variant(specs, fake_embed_many, train_per_expert=0)
    assert variant.index.names == ["cook", "sqlx"]
    assert np.allclose(np.linalg.norm(variant.index.vectors, axis=1), 1.0)
    assert variant.details["sources"]["cook"] == {"card_examples": 2, "train_prompts": 0}
    from router.methods import create_method

    def top(query: str) -> str | None:
        d = Router.decide(bag_of_words(query), create_method("global"), RoutingParams(), variant.index)
        return d.experts[0].name if d.experts else None

    assert top("select the employees table rows with sql") == "sqlx"
    assert top("how long to bake a flour cake in the oven") == "cook"
    # the threshold is calibrated on card examples vs the out-of-domain prompts: the examples are routed
    assert all(top(x) is not None for s in specs for x in s.examples)


def test_centroid_texts_add_train_prompts():
    spec = routing.ExpertSpec("arithmetic", "adds numbers", ("What is 2 plus 2?",))
    texts, n_train = routing.centroid_texts(spec, 5)
    assert n_train == 5 and len(texts) == 6 and texts[0] == "What is 2 plus 2?"
    test_prompts = {e.prompt for e in build_test_set(50, tasks=["arithmetic"])}
    assert not set(texts[1:]) & test_prompts  # train split only
    assert routing.centroid_texts(routing.ExpertSpec("not_a_task", "x", ("a",)), 5) == (["a"], 0)


# --- GLIDER ---------------------------------------------------------------------------------------------
def llm_transport(calls: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        query = body["messages"][-1]["content"].split("Request: ", 1)[1]
        calls.append(query)
        assert body["temperature"] == 0 and body["model"] == BASE
        return httpx.Response(200, json={"choices": [{"message": {"content": f"The task is about {query}\nextra"}}]})
    return httpx.MockTransport(handler)


async def test_glider_cache_hit_on_second_call(tmp_path):
    calls: list[str] = []
    cache_file = tmp_path / "glider.json"
    glider = routing.GliderClient(routing.JsonCache(cache_file), "http://llm", BASE, transport=llm_transport(calls))
    first = await glider.instructions(["sum 2 and 3", "bake bread"])
    assert [x["instruction"] for x in first] == ["The task is about sum 2 and 3", "The task is about bake bread"]
    assert not any(x["cached"] for x in first) and calls == ["sum 2 and 3", "bake bread"]
    again = await glider.instructions(["bake bread"])
    assert again[0]["cached"] and again[0]["instruction"] == "The task is about bake bread" and len(calls) == 2
    # persisted: a new client on the same file (and no LLM endpoint at all) needs no call
    offline = routing.GliderClient(routing.JsonCache(cache_file), None, BASE)
    assert [x["instruction"] for x in await offline.instructions(["sum 2 and 3", "bake bread"])] == \
           [x["instruction"] for x in first]
    assert offline.llm_calls == 0 and len(calls) == 2
    key = routing.glider_key("bake bread")
    assert key == "flock:glider:" + hashlib.sha256(b"bake bread").hexdigest()
    assert key in json.loads(cache_file.read_text())
    with pytest.raises(routing.NoLLM):
        await offline.instructions(["never seen"])


def test_glider_prompt_is_few_shot():
    msgs = routing.glider_messages("Sort 3, 1, 2")
    assert msgs[0]["role"] == "system" and "one sentence describing the task" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(routing.GLIDER_SHOTS)
    assert msgs[-1]["content"].endswith("Request: Sort 3, 1, 2")


# --- routing evaluation on a real Router and pool (synthetic adapters, fake embedder) ----------------------
@pytest.fixture
def tiny_router(tmp_path) -> Router:
    root = tmp_path / "lib"
    cards = {"arithmetic": ("adds and multiplies integers plus minus times",
                            ["What is 3 plus 4?", "Compute 6 times 7."]),
             "text_to_sql": ("writes sql select queries over a table", ["Write SQL to select all employees.",
                                                                        "SQL query for salaries by department."])}
    for seed, (name, (desc, examples)) in enumerate(cards.items()):
        write_random_lora(root / name, shape=SHAPE, base_name=BASE, seed=seed,
                          card=ExpertCard(name=name, description=desc, examples=examples,
                                          extra={"generated_description": f"{name} generated: {desc}"}))
    pool = ExpertPool(state_file=tmp_path / "state" / "pool.json", roots=[root.resolve()], base_name=BASE,
                      shape=SHAPE, max_rank=16)
    pool.load(seed_dir=root)
    assert len(pool) == 2
    return Router(pool, FakeBatcher(), None)


async def test_evaluate_routing_variants(tiny_router, tmp_path):
    await tiny_router.rebuild_index()
    examples = [ex("arithmetic", "What is 12 plus 30?"), ex("arithmetic", "Compute 5 times 9.", test_only=True),
                ex("text_to_sql", "Write SQL to select employees by salary."),
                ex("words_to_number", "Write forty two with digits", kind="held_out"),
                ex("ood", "Tell me a story about a dragon.", kind="ood")]
    calls: list[str] = []
    glider = routing.GliderClient(routing.JsonCache(tmp_path / "g.json"), "http://llm", BASE,
                                  transport=llm_transport(calls))
    out = await routing.evaluate_routing(tiny_router, examples, ["arithmetic", "text_to_sql"], ["words_to_number"],
                                         train_per_expert=3, glider=glider)
    assert set(out["variants"]) == {"description", "centroid", "centroid+train", "generated", "glider"}
    d = out["variants"]["description"]
    assert d["top1_held_in"] == 1.0 and d["top1_held_in_test_only"] == 1.0 and d["ood_abstain"] == 1.0
    # The router's default (centroid) is the service path: its own index, threshold and route() latency.
    c = out["variants"]["centroid"]
    assert c["details"]["service"] and c["threshold"] == tiny_router.index.threshold and c["latency_ms_p50"] > 0
    assert c["top1_per_task"]["text_to_sql"] == 1.0
    assert "service" not in d["details"]
    t = out["variants"]["centroid+train"]
    assert t["details"]["sources"]["arithmetic"] == {"card_examples": 2, "train_prompts": 3}
    for v in out["variants"].values():
        assert set(v["held_out_distribution"]) == {"words_to_number"}
        assert abs(sum(v["held_out_distribution"]["words_to_number"].values()) - 1) < 1e-9
    # calibration (4 card examples + 40 ood prompts) and the 5 test prompts went to the LLM once each
    assert len(calls) == 4 + 40 + 5 and out["variants"]["glider"]["llm_calls"] == 49
    assert [r["instruction"] for r in out["records"]["glider"]][0] == "The task is about What is 12 plus 30?"
    again = await routing.evaluate_routing(tiny_router, examples, ["arithmetic", "text_to_sql"],
                                           ["words_to_number"], train_per_expert=3, glider=glider)
    assert len(calls) == 49 and again["variants"]["glider"]["top1_held_in"] == out["variants"]["glider"]["top1_held_in"]


async def test_evaluate_routing_without_llm_skips_glider(tiny_router, tmp_path):
    await tiny_router.rebuild_index()
    glider = routing.GliderClient(routing.JsonCache(tmp_path / "g.json"), None, BASE)
    out = await routing.evaluate_routing(tiny_router, [ex("arithmetic", "What is 1 plus 1?")], ["arithmetic"], [],
                                         glider=glider, train_per_expert=0)
    assert "glider" not in out["variants"] and "glider" in out["skipped"]


# --- generation through a fake gateway ------------------------------------------------------------------
def fake_gateway(seen: list[dict]) -> httpx.MockTransport:
    """Oracle answers right, base wrong, 'global' right when it routes to the task's expert."""
    answers = {"What is 2 plus 2?": "4", "Sort 3, 1": "1, 3", "Write 8 PM as 24h": "20:00"}
    route = {"What is 2 plus 2?": "arithmetic", "Sort 3, 1": "arithmetic", "Write 8 PM as 24h": None}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "auto"}, {"id": BASE}, {"id": "arithmetic"}]})
        body = json.loads(request.content)
        if request.url.path == "/v1/route":
            if body["routing"]["mode"] not in ("global", "merge"):
                return httpx.Response(400, json={"error": {"message": "unknown routing mode 'nope'"}})
            return httpx.Response(200, json={"routing": {"mode": "global", "experts": []}})
        seen.append(body)
        prompt = body["messages"][0]["content"]
        if body["model"] == "auto":
            expert = route.get(prompt)
            experts = [{"name": expert, "weight": 1.0, "score": 0.5}] if expert else []
            text = answers[prompt] if expert and prompt != "Sort 3, 1" else "no idea"
            routing_field = {"mode": body["routing"]["mode"], "experts": experts, "cached": False}
            headers = {"x-flock-gateway-ms": "3.5"}
        else:
            text = answers[prompt] if body["model"] == "arithmetic" else "wrong"
            routing_field = {"mode": "direct" if body["model"] != BASE else "base", "experts": [], "cached": False}
            headers = {"x-flock-gateway-ms": "0.5"}
        return httpx.Response(200, headers=headers, json={"choices": [{"message": {"content": text}}],
                                                          "routing": routing_field})
    return httpx.MockTransport(handler)


async def test_generation_modes_through_fake_gateway():
    examples = [ex("arithmetic", "What is 2 plus 2?", answer="4"), ex("sort_numbers", "Sort 3, 1", answer="1, 3"),
                ex("time_24h", "Write 8 PM as 24h", kind="held_out", answer="20:00")]
    seen: list[dict] = []
    progress: list[str] = []
    records, served, skipped = await generation.run_generation(
        "http://gw", examples, ["base", "oracle", "global", "nope"], base_model=BASE,
        transport=fake_gateway(seen), progress=progress.append)
    assert served == {"arithmetic"} and set(records) == {"base", "oracle", "global"} and "nope" in skipped
    assert {b["model"] for b in seen if "routing" not in b} == {BASE, "arithmetic"}
    oracle_models = [b["model"] for b in seen[3:6]]
    assert oracle_models == ["arithmetic", BASE, BASE]  # no sort_numbers expert served: base answers
    assert all(b["temperature"] == 0 and b["max_tokens"] == 48 for b in seen)
    assert all(b["routing"] == {"mode": "global"} for b in seen if b["model"] == "auto")
    assert any("base: arithmetic done" in p for p in progress)
    summaries = harness.summarize_modes(records)
    assert summaries["base"]["accuracy_per_task"] == {"arithmetic": 0.0, "sort_numbers": 0.0, "time_24h": 0.0}
    assert summaries["oracle"]["held_in_mean"] == 0.5 and summaries["global"]["held_in_mean"] == 0.5
    assert summaries["global"]["pct_of_oracle"] == pytest.approx(100.0)
    g = summaries["global"]["routing"]
    assert g["top1_held_in"] == 0.5  # sort_numbers went to arithmetic
    assert g["held_out_distribution"] == {"time_24h": {"base": 1.0}}
    assert summaries["global"]["gateway_ms_p50"] == 3.5 and summaries["global"]["errors"] == 0


def test_request_body_and_parser():
    e = ex("time_24h", "Write 8 PM as 24h", kind="held_out")
    assert generation.request_body("oracle", e, BASE, {"arithmetic"})["model"] == BASE
    assert generation.request_body("merge", e, BASE, set())["routing"] == {"mode": "merge"}
    assert "routing" not in generation.request_body("base", e, BASE, set())
    from cli import build_parser, evaluate

    args = build_parser().parse_args(["eval", "--modes", "global,merge,global,mix", "--routing-only"])
    assert args.func is evaluate.run and args.n_per_task == 50 and args.out == "eval" and args.routing_only
    assert args.backend is None and args.gateway is None
    assert harness.parse_modes(args.modes) == ["global", "merge", "mix"]


def test_test_set_is_fixed_and_marks_test_only_phrasings():
    a, b = build_test_set(6), build_test_set(6)
    assert a == b
    tasks = {e.task for e in a}
    assert {"arithmetic", "time_24h", "ood"} <= tasks and all(sum(x.task == t for x in a) == 6 for t in tasks)
    from training.tasks import TASKS
    assert all(e.test_only == (e.phrasing_id in TASKS[e.task].test_only_ids) for e in a)


def test_mode_variants_carry_routing_parameters():
    from eval.generation import routing_params

    assert harness.parse_modes("base, glider:alpha=3+top_k=1,glider") == ["base", "glider:alpha=3,top_k=1", "glider"]
    assert routing_params("glider:alpha=3,top_k=1") == {"mode": "glider", "alpha": 3.0, "top_k": 1}
    assert routing_params("merge") == {"mode": "merge"}
