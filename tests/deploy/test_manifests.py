"""Checks of deploy/ that need no Docker engine, cluster or GPU.

- Compose: the compose-spec JSON schema (bundled by check-jsonschema), then the wiring between services: the
  gateway's FLOCK_* settings, vLLM's flags against `vllm_command`, ports, volumes, profiles, published ports.
- Kubernetes: every manifest against the Kubernetes JSON schemas bundled by kubernetes-validate (strict: unknown
  fields fail), the prometheus-operator CRDs against cloudcoil's models generated from the operator's CRD schemas,
  then the wiring between objects (selectors, ports, names, backend URLs, GPU limits).
- Prometheus: `promtool check config`, `check rules` and `test rules` (every alert must fire on synthetic series
  and stay quiet on a healthy stack). promtool comes from Debian's `prometheus` package, fetched once into
  .venv/tools when it is not on PATH.
- PromQL of alerts and dashboard: parsed (promql-parser and promtool), and every metric name, label and matched
  label value must exist: gateway names from a real exposition of service.metrics.Metrics, vLLM names from the
  installed vLLM's metrics code.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flock.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
DOCKERFILES = {"Dockerfile": REPO / "Dockerfile",
               "deploy/docker/Dockerfile.cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
BIN = Path(sys.executable).parent
TOOLS = Path(sys.prefix) / "tools"  # .venv/tools: promtool, fetched once

# Kubernetes versions whose schemas every built-in object must satisfy (oldest and newest supported here).
K8S_VERSIONS = ["1.28.0", "1.33.0", "1.37.0"]
# Labels Prometheus attaches to every scraped series; prometheus-operator adds the others.
SCRAPE_LABELS = {"job", "instance"}
OPERATOR_TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint"}
GATEWAY_JOB, VLLM_JOB = "flock-gateway", "vllm"
# Grafana's built-in variables, replaced by a plausible value before parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# --- helpers -------------------------------------------------------------------------------------------------
def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: load_yaml_docs(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def all_k8s_objects() -> list[dict]:
    return [d for docs in k8s_docs().values() for d in docs]


def find(kind: str, name: str) -> dict:
    for d in all_k8s_objects():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} named {name} in deploy/k8s")


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a Dockerfile (continuation lines joined)."""
    env: dict[str, str] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for token in shlex.split(line.strip()[4:]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def vllm_flags(argv: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            flags[token] = None if nxt is None or nxt.startswith("--") else nxt
    return flags


def check_vllm_command(argv: list[str], served_name: str, model_dir: str, port: int) -> None:
    """A deployed vLLM command line against the one `flock serve` runs (service.processes.vllm_command)."""
    from service.processes import vllm_command
    from service.settings import Settings

    settings = Settings()
    reference, reference_env = vllm_command(settings)
    module = reference[reference.index("-m") + 1]
    assert argv[argv.index("-m") + 1] == module, f"vLLM must run {module}: {argv}"
    ref, got = vllm_flags(reference), vllm_flags(argv)
    missing = set(ref) - set(got)
    assert not missing, f"vLLM flags that flock's own vllm_command passes are missing: {sorted(missing)}"
    assert "--enable-lora" in got and got["--enable-lora"] is None
    assert int(got["--max-lora-rank"]) >= settings.vllm_max_lora_rank, "composites need rank up to max-lora-rank"
    assert int(got["--max-cpu-loras"]) >= int(got["--max-loras"]) >= 1
    assert got["--host"] == "0.0.0.0", "in a container vLLM must listen on all interfaces"
    assert int(got["--port"]) == port
    assert got["--served-model-name"] == served_name, "the gateway sends the base model's name to vLLM"
    assert got["--model"] == model_dir
    assert reference_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def check_flock_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> object:
    """Every FLOCK_* variable is a real setting and the values parse; returns the Settings they give."""
    from service.settings import Settings

    fields = {f"FLOCK_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("FLOCK_")} - fields
    assert not unknown, f"not flock settings (service/settings.py): {sorted(unknown)}"
    for key in list(os.environ):
        if key.startswith("FLOCK_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def host_port(url: str, default_port: int | None = None) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"//{url}")
    return parsed.hostname, parsed.port or default_port


# --- the metrics that exist ------------------------------------------------------------------------------------
@lru_cache
def gateway_metrics() -> dict[str, frozenset[str]]:
    """Sample name -> label names, from a real exposition of the gateway's registry with every metric touched once."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics

    metrics = Metrics()
    collectors = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    assert len(collectors) >= 10
    for c in collectors:
        child = c.labels(*["x"] * len(c._labelnames)) if c._labelnames else c
        (getattr(child, "observe", None) or child.inc)(0.1)
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return {k: frozenset(v) for k, v in names.items()}


@lru_cache
def gateway_families() -> frozenset[str]:
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    return frozenset(v._name for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase))


@lru_cache
def vllm_metrics() -> dict[str, frozenset[str] | None]:
    """Sample name -> label names (None: not determinable) of the installed vLLM, read from its metrics code
    without importing vLLM: every `self._gauge_cls / _counter_cls / _histogram_cls(name="vllm:...")` call."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed in this environment (scripts/setup.sh installs it)"
    loggers = Path(spec.origin).parent / "v1" / "metrics" / "loggers.py"
    tree = ast.parse(loggers.read_text())
    base_labels: set[str] | None = None
    for node in ast.walk(tree):  # labelnames = ["model_name", "engine"]
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "labelnames" for t in node.targets)
                and isinstance(node.value, ast.List)):
            base_labels = {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    assert base_labels, f"could not find vLLM's per-engine label names in {loggers}"

    def labels_of(node: ast.AST | None) -> set[str] | None:
        if node is None:
            return set()
        if isinstance(node, ast.Name) and node.id == "labelnames":
            return set(base_labels)
        if isinstance(node, ast.List):
            return {e.value for e in node.elts if isinstance(e, ast.Constant)} \
                if all(isinstance(e, ast.Constant) for e in node.elts) else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = labels_of(node.left), labels_of(node.right)
            return None if left is None or right is None else left | right
        return None  # e.g. metrics_info.keys()

    kinds = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
    names: dict[str, frozenset[str] | None] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in kinds):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if not isinstance(kw.get("name"), ast.Constant):
            continue
        name, kind = kw["name"].value, kinds[node.func.attr]
        labels = labels_of(kw.get("labelnames"))
        frozen = None if labels is None else frozenset(labels)
        if kind == "gauge":
            names[name] = frozen
        elif kind == "counter":  # prometheus_client exposes <name without _total>_total and _created
            base = name[: -len("_total")] if name.endswith("_total") else name
            names[base + "_total"] = names[base + "_created"] = frozen
        else:
            names[name + "_bucket"] = None if frozen is None else frozen | {"le"}
            for suffix in ("_sum", "_count", "_created"):
                names[name + suffix] = frozen
    for core in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
        assert core in names, f"{core} not found in {loggers}: the metric extraction is out of date"
    return names


def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((REPO / d).rglob("*.py"))]


def _const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _const_int(node: ast.AST | None) -> int | None:
    return node.value if isinstance(node, ast.Constant) and type(node.value) is int else None


HTTP_ERROR_TYPE = re.compile(r"http_\d{3}")  # the gateway's type for an HTTPException of status NNN
# Error types the gateway counts directly (metrics.errors.labels("...")), outside any HTTP error answer: the
# status of the failure each stands for, since the code does not say. A new one must be added here.
DIRECT_ERROR_STATUS = {"backend_stream_broken": 502,  # an error event ending a stream the backend broke
                       "client_disconnected": 499}


@lru_cache
def error_types() -> dict[str, int]:
    """Every value of flock_errors_total{type}, with the HTTP status of the error it counts, read from the code:
    the error handlers count `exc.code or exc.type` (service/errors.py), so the codes of the APIErrors raised
    (service/, router/) and of the pool's errors (adapters/errors.py), the OpenAI types of code-less errors, the
    handlers' own constants, and the types counted directly. http_NNN types are HTTP_ERROR_TYPE."""
    types: dict[str, int] = {}
    for path in _py_files("service", "router"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                kw = {k.arg: k.value for k in node.keywords}
                if func == "APIError" and _const_str(kw.get("code")) and node.args and _const_int(node.args[0]):
                    types[_const_str(kw["code"])] = _const_int(node.args[0])
                if (func == "labels" and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "errors"
                        and node.args and _const_str(node.args[0])):
                    kind = _const_str(node.args[0])
                    assert kind in DIRECT_ERROR_STATUS, f"{path}: error type {kind!r} counted directly: classify it"
                    types[kind] = DIRECT_ERROR_STATUS[kind]
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):  # an error handler: count("x") + its status
                counted = [_const_str(c.args[0]) for c in ast.walk(node) if isinstance(c, ast.Call)
                           and isinstance(c.func, ast.Name) and c.func.id == "count" and c.args
                           and _const_str(c.args[0])]
                statuses = {_const_int(k.value) for c in ast.walk(node) if isinstance(c, ast.Call)
                            for k in c.keywords if k.arg == "status_code" and _const_int(k.value)}
                if counted and not any(isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef)
                                       for c in ast.walk(node) if c is not node):
                    assert len(statuses) == 1, f"{path}:{node.name}: counts {counted} but answers {statuses}"
                    types.update(dict.fromkeys(counted, statuses.pop()))
            if isinstance(node, ast.Assign) and any(isinstance(x, ast.Name) and x.id == "_TYPES" for x in node.targets):
                for k, v in zip(node.value.keys, node.value.values):  # OpenAI types of code-less APIErrors
                    types[_const_str(v)] = _const_int(k)
                types["server_error"] = 500  # APIError's type of a code-less 5xx
    for node in ast.walk(ast.parse((REPO / "adapters" / "errors.py").read_text())):
        if isinstance(node, ast.ClassDef):
            attrs = {a.targets[0].id: a.value for a in node.body if isinstance(a, ast.Assign)}
            if _const_str(attrs.get("code")):
                types[_const_str(attrs["code"])] = _const_int(attrs.get("status")) or 400
    for core in ("backend_unavailable", "backend_timeout", "pool_changed", "internal", "invalid_request"):
        assert core in types, f"error type {core!r} not found in the code: the extraction is out of date"
    return types


@lru_cache
def label_values() -> dict[tuple[str, str], frozenset[str] | None]:
    """(metric family, label) -> the values the gateway emits for that label; None where they are data (expert
    names, backend URLs) or computed in a way not followed here. From every `metrics.<attr>.labels(...)` call in
    service/ and router/: a constant argument is a value; flock_errors_total's type comes from error_types() and
    flock_routing_cache_total's result from the router's cache statuses."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    families = {attr: m for attr, m in vars(Metrics()).items() if isinstance(m, MetricWrapperBase)}
    values: dict[tuple[str, str], set[str] | None] = {}
    for path in _py_files("service", "router"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "labels"
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in families):
                continue
            metric = families[node.func.value.attr]
            for label, arg in zip(metric._labelnames, node.args):
                key = (metric._name, label)
                value = _const_str(arg)
                if value is None:
                    values[key] = None
                elif values.get(key, set()) is not None:
                    values.setdefault(key, set()).add(value)
    values[("flock_errors", "type")] = set(error_types())
    # RouteResult.cache: the statuses router/cache.py returns, and the router's own ("hit" from its local copy,
    # "off" without a cache, which the gateway does not count).
    statuses = set()
    for path in _py_files("router"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and _const_str(node.value.elts[-1]):
                statuses.add(_const_str(node.value.elts[-1]))
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RouteResult" and len(node.args) == 3
                    and _const_str(node.args[2])):
                statuses.add(_const_str(node.args[2]))
    assert {"hit", "miss", "bypass"} <= statuses, statuses
    values[("flock_routing_cache", "result")] = statuses - {"off"}
    return {k: None if v is None else frozenset(v) for k, v in values.items()}


def emitted_values(metric: str, label: str) -> frozenset[str] | None:
    """Values of `label` on the sample `metric` (flock_x_total, flock_x_bucket...); None: not checkable."""
    for (family, name), values in label_values().items():
        if name == label and (metric == family or metric.startswith(family + "_")):
            return values
    return None


def value_emitted(label: str, value: str, values: frozenset[str]) -> bool:
    return value in values or (label == "type" and HTTP_ERROR_TYPE.fullmatch(value) is not None)


def regex_problems(metric: str, label: str, regex: str, values: frozenset[str]) -> list[str]:
    """A `=~` matcher: every alternative must match a value the gateway emits (http_NNN: some status)."""
    problems = []
    samples = set(values) | ({f"http_{s}" for s in range(400, 600)} if label == "type" else set())
    for alternative in regex.split("|"):
        if not any(re.fullmatch(alternative, v) for v in samples):
            problems.append(f"{metric}{{{label}=~...}}: alternative {alternative!r} matches nothing the gateway emits")
    return problems


def promql_problems(expr: str, where: str, legend: str = "") -> list[str]:
    """Parse errors, unknown metric names, labels a metric does not carry, equality-matched values the gateway
    never emits, and grouping/legend labels that no selected series has."""
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    known: dict[str, frozenset[str] | None] = {**gateway_metrics(), **vllm_metrics(), "up": frozenset()}
    try:
        tree = promql_parser.parse(expr)
    except Exception as exc:  # noqa: BLE001 - the parser raises its own types
        return [f"{where}: does not parse: {exc}"]
    selectors, groupings = [], []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            groupings.append(node.modifier)
        return True

    promql_parser.walk(tree, visit)
    problems: list[str] = []
    available: set[str] | None = set(SCRAPE_LABELS)
    for sel in selectors:
        if sel.name is None or sel.name not in known:
            problems.append(f"{where}: unknown metric {sel.name!r}")
            continue
        labels = known[sel.name]
        if labels is None:
            available = None
            continue
        if available is not None:
            available |= labels
        for m in sel.matchers.matchers:
            if m.name == "__name__":
                continue
            if m.name not in labels | SCRAPE_LABELS:
                problems.append(f"{where}: {sel.name} has no label {m.name!r} (it has {sorted(labels)})")
            elif sel.name.startswith("flock_") and m.name not in SCRAPE_LABELS:
                values = emitted_values(sel.name, m.name)
                if values is None:
                    continue
                if str(m.op) in {"MatchOp.Equal", "MatchOp.NotEqual"} and not value_emitted(m.name, m.value, values):
                    problems.append(f"{where}: the gateway never emits {m.name}={m.value!r} on {sel.name}")
                elif str(m.op) in {"MatchOp.Re", "MatchOp.NotRe"}:
                    problems += [f"{where}: {p}" for p in regex_problems(sel.name, m.name, m.value, values)]
    if available is not None:
        for modifier in groupings:
            if str(modifier.type) != "AggModifierType.By":
                continue
            for label in modifier.labels:
                if label not in available:
                    problems.append(f"{where}: groups by {label!r}, which no selected series carries")
        for label in re.findall(r"{{\s*(\w+)\s*}}", legend):
            if label not in available:
                problems.append(f"{where}: legend names label {label!r}, which no selected series carries")
    return problems


# --- promtool ----------------------------------------------------------------------------------------------------
def skip_unless_ci(reason: str) -> None:
    """Skip where a tool cannot be had; in CI (CI=true, as GitHub Actions and GitLab set it) fail instead, so a
    broken tool install cannot turn the checks that need it into skips nobody reads."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool from PATH, or from .venv/tools, or fetched there once from Debian's `prometheus` package (only the
    promtool binary is extracted; nothing is installed system-wide and no daemon is started)."""
    for candidate in (shutil.which("promtool"), TOOLS / "promtool"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        skip_unless_ci("promtool is not installed and cannot be fetched here (no apt-get/dpkg-deb): "
                       "install Prometheus' promtool to run these checks")
    with tempfile.TemporaryDirectory() as tmp:
        fetch = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                               timeout=600)
        if fetch.returncode != 0 and os.geteuid() == 0:  # empty package lists on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            fetch = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                                   timeout=600)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if fetch.returncode != 0 or not debs:
            skip_unless_ci(f"promtool is not installed and `apt-get download prometheus` failed: {fetch.stderr[-400:]}")
        subprocess.run(["bash", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" ./usr/bin/promtool', "_",
                        str(debs[0]), tmp], check=True, timeout=300)
        TOOLS.mkdir(parents=True, exist_ok=True)
        partial = TOOLS / "promtool.partial"
        shutil.copy2(Path(tmp) / "usr" / "bin" / "promtool", partial)
        partial.rename(TOOLS / "promtool")
    return str(TOOLS / "promtool")


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


def test_promtool_version(promtool):
    out = run_promtool(promtool, "--version")
    assert out.returncode == 0 and "promtool" in out.stdout + out.stderr
    print((out.stdout + out.stderr).splitlines()[0])


# --- Prometheus: config and alert rules -----------------------------------------------------------------------------
def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_prometheus_config_passes_promtool(promtool):
    out = run_promtool(promtool, "check", "config", str(PROM_CONFIG))
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert [ALERTS.name] == config["rule_files"]


def test_alert_rules_pass_promtool_check(promtool):
    out = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_alerts_fire_in_promtool_unit_tests(promtool):
    out = run_promtool(promtool, "test", "rules", str(ALERTS_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    # Every alert must be shown both firing and quiet somewhere in the unit tests.
    fired, quiet = set(), set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fired == set(), f"alerts never shown firing in {ALERTS_TEST.name}: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never shown quiet in {ALERTS_TEST.name}: {sorted(names - quiet)}"


def test_alert_unit_tests_catch_a_broken_rule(promtool, tmp_path):
    """The unit tests are not vacuous: raising one threshold makes them fail."""
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    text = ALERTS.read_text()
    assert "> 0.05" in text
    (tmp_path / ALERTS.name).write_text(text.replace("> 0.05", "> 0.5", 1))
    out = run_promtool(promtool, "test", "rules", str(tmp_path / ALERTS_TEST.name))
    assert out.returncode != 0 and "FlockHighErrorRate" in out.stdout + out.stderr


def test_alert_rules_use_real_metrics_and_labels():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    required = {"FlockHighErrorRate", "FlockHighBackendLatencyP99", "FlockBackendDown", "FlockRoutingCacheBypassed"}
    assert required <= names, f"missing alert kinds: {sorted(required - names)}"
    problems = []
    for rule in rules:
        problems += promql_problems(rule["expr"], rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in {GATEWAY_JOB, VLLM_JOB}, f"{rule['alert']}: unknown job {job!r}"
    assert not problems, "\n".join(problems)
    # the p99 latency alerts really take a quantile of a histogram
    assert "histogram_quantile(0.99" in next(r for r in rules if r["alert"] == "FlockHighBackendLatencyP99")["expr"]


def test_server_error_alert_covers_every_server_error_type():
    """FlockServerErrors counts exactly the error types of 5xx answers (and broken streams): each one the gateway
    emits (read from the code: error_types), and none of a client's mistakes."""
    import promql_parser

    rule = next(r for r in alert_rules() if r["alert"] == "FlockServerErrors")
    matchers = []
    promql_parser.walk(promql_parser.parse(rule["expr"]), lambda n: matchers.extend(
        m for m in n.matchers.matchers if m.name == "type") if isinstance(n, promql_parser.VectorSelector) else None)
    (matcher,) = matchers
    assert str(matcher.op) == "MatchOp.Re"
    server = {t for t, status in error_types().items() if status >= 500} | {"http_500", "http_502", "http_599"}
    client = {t for t, status in error_types().items() if status < 500} | {"http_404", "http_413", "http_499"}
    missed = sorted(t for t in server if not re.fullmatch(matcher.value, t))
    wrong = sorted(t for t in client if re.fullmatch(matcher.value, t))
    assert not missed, f"FlockServerErrors misses server-side error types: {missed}"
    assert not wrong, f"FlockServerErrors counts client-side error types: {wrong}"


def test_prometheusrule_is_alerts_yml_verbatim():
    rule = find("PrometheusRule", "flock")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: regenerate it with the "
        "command in its header")


# --- Compose -------------------------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict) -> dict[str, str]:
    """A service's environment, with ${VAR:?msg} given a dummy value and ${VAR:-default} its default."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)

    def resolve(value: object) -> str:
        value = str(value)
        value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"{m.group(1).lower()}-1,{m.group(1).lower()}-2", value)
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)

    return {k: resolve(v) for k, v in env.items()}


def test_compose_passes_compose_spec_schema(tmp_path):
    tool = BIN / "check-jsonschema"
    out = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and the schema is enforced: a misspelt key is refused
    broken = compose()
    broken["services"]["gateway"]["enviroment"] = broken["services"]["gateway"].pop("environment")
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    out = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(tmp_path / "broken.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "enviroment" in out.stdout + out.stderr


def test_compose_services_and_profiles():
    services = compose()["services"]
    assert {"redis", "vllm", "vllm-cpu", "gateway", "prometheus", "grafana"} <= set(services)
    assert services["vllm"]["profiles"] == ["gpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    assert "vllm" in services["vllm-cpu"]["networks"]["default"]["aliases"], "both variants answer as vllm"
    for name in ("redis", "gateway", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must run under either profile"
    devices = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_builds_and_mounts_exist():
    spec = compose()
    declared_volumes = set(spec.get("volumes") or {})
    for name, service in spec["services"].items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            tag = service["image"]
            same_tag = [s for s in spec["services"].values() if s.get("image") == tag and "build" in s]
            assert all(s["build"] == service["build"] for s in same_tag), f"{tag} is built two ways"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"


def test_compose_gateway_wiring(monkeypatch):
    spec = compose()
    services = spec["services"]
    gateway = services["gateway"]
    env = compose_env(gateway)
    settings = check_flock_env(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.api_keys and settings.admin_keys, "compose refuses to start without keys (${VAR:?})"
    assert "${FLOCK_API_KEYS:?" in str(gateway["environment"]["FLOCK_API_KEYS"])
    # Redis
    host, port = host_port(settings.redis_url)
    assert host == "redis" and port == 6379 and "--port" not in services["redis"]["command"]
    # vLLM: every backend URL is a vLLM service (or alias) on the port its command listens on
    vllm_names = {"vllm"} | {a for s in ("vllm", "vllm-cpu")
                             for a in services[s].get("networks", {}).get("default", {}).get("aliases", [])}
    for url in settings.backend_urls:
        host, port = host_port(url)
        assert host in vllm_names, f"backend {url} is not a vLLM service"
        for name in ("vllm", "vllm-cpu"):
            argv = services[name]["entrypoint"] + services[name]["command"]
            assert int(vllm_flags(argv)["--port"]) == port
    # The gateway's published port is the one it listens on; nothing else is published on all interfaces.
    assert gateway["ports"] == [f"{settings.port}:{settings.port}"]
    for name in ("redis", "vllm", "vllm-cpu"):
        assert "ports" not in services[name], f"{name} must not be published (vLLM loads adapters from any path)"
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    assert "${GRAFANA_ADMIN_PASSWORD:?" in services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    # Shared state: the gateway writes FLOCK_STATE_DIR, the vLLM containers read it at the same path.
    state_mount = next(m for m in gateway["volumes"] if str(settings.state_dir).startswith(m.split(":")[1]))
    for name in ("vllm", "vllm-cpu"):
        assert f"{state_mount}:ro" in services[name]["volumes"]


@pytest.mark.parametrize("name", ["vllm", "vllm-cpu"])
def test_compose_vllm_matches_flock(name, monkeypatch):
    services = compose()["services"]
    service = services[name]
    settings = check_flock_env(compose_env(services["gateway"]), monkeypatch)
    dockerfile = DOCKERFILES[service["build"]["dockerfile"]]
    cache = dockerfile_env(dockerfile)["FLOCK_CACHE_DIR"]
    check_vllm_command(service["entrypoint"] + service["command"], settings.base_model_name,
                       f"{cache}/models/{settings.base_model_name}", 8000)
    assert compose_env(service)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # the gateway image converts the base model to the same path
    gateway_dockerfile = DOCKERFILES[services["gateway"]["build"]["dockerfile"]]
    assert dockerfile_env(gateway_dockerfile)["FLOCK_CACHE_DIR"] == cache


_PARSE_VLLM_ARGS = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.load(sys.stdin):
    try:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    except SystemExit as exc:  # argparse refused the command line (its message is on stderr)
        out.append({"refused": exc.code})
        continue
    out.append({k: getattr(args, k) for k in ("model", "served_model_name", "host", "port", "enable_lora",
                                              "max_loras", "max_lora_rank", "max_cpu_loras")})
print("PARSED " + json.dumps(out))
"""


def test_vllm_command_lines_parse_with_vllms_own_parser():
    """The installed vLLM (the version the CUDA image pins) accepts every deployed command line: its argument
    parser, run in a subprocess (importing vLLM takes seconds), rejects unknown or malformed flags."""
    services = compose()["services"]
    sts_container = find("StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"][0]
    commands = {"compose vllm": services["vllm"]["entrypoint"] + services["vllm"]["command"],
                "compose vllm-cpu": services["vllm-cpu"]["entrypoint"] + services["vllm-cpu"]["command"],
                "k8s vllm": sts_container["command"] + sts_container["args"]}
    argvs = [argv[argv.index("-m") + 2:] for argv in commands.values()]
    argvs.append(argvs[0] + ["--max-lora-rnk", "32"])  # and a misspelt flag is refused
    out = subprocess.run([sys.executable, "-c", _PARSE_VLLM_ARGS], input=json.dumps(argvs), capture_output=True,
                         text=True, timeout=180, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    assert out.returncode == 0 and "PARSED " in out.stdout, out.stderr[-3000:]
    parsed = json.loads(out.stdout.split("PARSED ", 1)[1])
    for (where, argv), args in zip(commands.items(), parsed):
        assert "refused" not in args, f"{where}: vLLM refuses its command line: {out.stderr[-2000:]}"
        flags = vllm_flags(argv)
        assert args["enable_lora"] is True, where
        assert args["max_lora_rank"] == int(flags["--max-lora-rank"]), where
        assert args["served_model_name"] == [flags["--served-model-name"]], where
        assert args["port"] == int(flags["--port"]) and args["host"] == "0.0.0.0", where
    assert parsed[-1].get("refused") == 2 and "--max-lora-rnk" in out.stderr


def test_compose_prometheus_targets():
    spec = compose()
    services = spec["services"]
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert {GATEWAY_JOB, VLLM_JOB} <= set(jobs)
    gateway_port = int(compose_env(services["gateway"])["FLOCK_PORT"])
    expected = {GATEWAY_JOB: ("gateway", gateway_port), VLLM_JOB: ("vllm", 8000)}
    for job, (host, port) in expected.items():
        targets = [t for sc in jobs[job]["static_configs"] for t in sc["targets"]]
        assert targets == [f"{host}:{port}"]
        assert jobs[job].get("metrics_path", "/metrics") == "/metrics"
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert f"./prometheus/{ALERTS.name}:/etc/prometheus/{ALERTS.name}:ro" in mounts


def test_grafana_provisioning():
    services = compose()["services"]
    grafana = services["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and host_port(ds["url"]) == ("prometheus", 9090)
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "flock.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./grafana/dashboards"]
    assert DASHBOARD.parent == DEPLOY / "grafana" / "dashboards"


# --- Kubernetes --------------------------------------------------------------------------------------------------
BUILTIN_KINDS = {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "StatefulSet", "Service",
                 "HorizontalPodAutoscaler", "PodDisruptionBudget"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate_crd(doc: dict) -> None:
    """prometheus-operator objects against cloudcoil's models (generated from the operator's CRD OpenAPI schemas):
    types, patterns and required fields; a field the schema does not know is dropped by the model, so the
    object must survive a round trip unchanged."""
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, doc["kind"])
    dumped = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert dumped == doc, f"{doc['kind']}/{doc['metadata']['name']}: fields unknown to the CRD schema, or coerced"


def test_k8s_manifests_are_known_kinds():
    kinds = {d["kind"] for d in all_k8s_objects()}
    assert kinds <= BUILTIN_KINDS | CRD_KINDS, f"unexpected kinds: {kinds - BUILTIN_KINDS - CRD_KINDS}"
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret",
            "ServiceMonitor"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_pass_kubernetes_schemas(version):
    import kubernetes_validate

    validated = 0
    for filename, docs in k8s_docs().items():
        for doc in docs:
            if doc["kind"] in BUILTIN_KINDS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                                f"{exc.message} at {'/'.join(map(str, exc.path))}")
                validated += 1
    assert validated >= 10


def test_k8s_crd_objects_pass_operator_schemas():
    crds = [d for d in all_k8s_objects() if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in crds} == CRD_KINDS
    for doc in crds:
        validate_crd(doc)


def test_k8s_schema_checks_catch_mistakes():
    """The validators are not vacuous: each refuses a deliberately broken copy."""
    import kubernetes_validate
    from pydantic import ValidationError

    gateway = copy.deepcopy(find("Deployment", "flock-gateway"))
    gateway["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSIONS[-1], strict=True)
    hpa = copy.deepcopy(find("HorizontalPodAutoscaler", "flock-gateway"))
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)
    monitor = copy.deepcopy(find("ServiceMonitor", "flock-gateway"))
    monitor["spec"]["endpoints"][0]["interval"] = "soon"
    with pytest.raises(ValidationError):
        validate_crd(monitor)
    monitor = copy.deepcopy(find("ServiceMonitor", "flock-gateway"))
    monitor["spec"]["endpoints"][0]["honourLabels"] = True  # misspelt
    with pytest.raises(AssertionError):
        validate_crd(monitor)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files
    assert len(kustomization["resources"]) == len(set(kustomization["resources"]))
    # the Secret is created by the operator of the cluster, never applied with example values
    assert "secret.example.yaml" not in kustomization["resources"]
    images = {c["image"].split(":")[0] for d in all_k8s_objects() if d["kind"] in {"Deployment", "StatefulSet"}
              for c in d["spec"]["template"]["spec"]["containers"] if c["image"].startswith("flock")}
    assert images == {i["name"] for i in kustomization["images"]}


def workloads() -> list[dict]:
    return [d for d in all_k8s_objects() if d["kind"] in {"Deployment", "StatefulSet"}]


def container_ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_select_workloads_and_ports():
    for svc in (d for d in all_k8s_objects() if d["kind"] == "Service"):
        targets = [w for w in workloads()
                   if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports(targets[0]), f"{svc['metadata']['name']}: {port}"
    for w in workloads():
        assert selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        for c in w["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in container_ports(w)
            assert "memory" in c["resources"]["limits"], f"{w['metadata']['name']}: no memory limit"


def test_k8s_references_resolve():
    names = {(d["kind"], d["metadata"]["name"]) for d in all_k8s_objects()}
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in spec.get("volumes", [])}
    hpa = find("HorizontalPodAutoscaler", "flock-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = find(target["kind"], target["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert all("cpu" in c["resources"]["requests"] for c in deployment["spec"]["template"]["spec"]["containers"]), \
        "a CPU-utilization HPA needs CPU requests"
    pdb = find("PodDisruptionBudget", "flock-gateway")
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_k8s_gateway_settings_and_keys(monkeypatch):
    config = find("ConfigMap", "flock-config")["data"]
    settings = check_flock_env(config, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert not settings.api_keys and not settings.admin_keys, "keys belong in the Secret, not the ConfigMap"
    gateway = find("Deployment", "flock-gateway")
    spec = gateway["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container_ports(gateway)["http"] == settings.port
    keys_volume = next(v for v in spec["volumes"] if "secret" in v)
    assert keys_volume["secret"].get("optional") is not True, "the gateway must not start without its keys"
    mount = next(m for m in container["volumeMounts"] if m["name"] == keys_volume["name"])
    secret = find("Secret", keys_volume["secret"]["secretName"])
    for path in (settings.api_keys_file, settings.admin_keys_file):
        assert path.parent == Path(mount["mountPath"]) and path.name in secret["stringData"]
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert str(settings.state_dir).startswith(data_mount["mountPath"]) and not data_mount.get("readOnly")
    # Redis
    host, port = host_port(settings.redis_url)
    redis = find("Service", host)
    assert port in {p["port"] for p in redis["spec"]["ports"]}


def test_k8s_backend_urls_name_every_vllm_replica(monkeypatch):
    settings = check_flock_env(find("ConfigMap", "flock-config")["data"], monkeypatch)
    sts = find("StatefulSet", "vllm")
    svc = find("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "per-replica DNS names need a headless Service"
    (port,) = svc["spec"]["ports"]
    expected = [f"http://{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{port['port']}"
                for i in range(sts["spec"]["replicas"])]
    assert settings.backend_urls == expected


def test_k8s_vllm_replicas_match_flock():
    sts = find("StatefulSet", "vllm")
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    config = find("ConfigMap", "flock-config")["data"]
    cache = dockerfile_env(DOCKERFILES["deploy/docker/Dockerfile.cuda"])["FLOCK_CACHE_DIR"]
    name = config["FLOCK_BASE_MODEL_NAME"]
    check_vllm_command(container["command"] + container["args"], name, f"{cache}/models/{name}",
                       container_ports(sts)["http"])
    data = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert data["readOnly"] is True
    assert container["image"].startswith("flock-cuda")
    with open(DOCKERFILES["deploy/docker/Dockerfile.cuda"]) as f:
        assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v0\.32\.0$", f.read(), re.M), \
            "the CUDA image must be the vLLM version of requirements/engine-cuda.txt"
    assert "vllm==0.32.0" in (REPO / "requirements" / "engine-cuda.txt").read_text()


def test_k8s_servicemonitors_scrape_gateway_and_vllm():
    services = {d["metadata"]["name"]: d for d in all_k8s_objects() if d["kind"] == "Service"}
    scraped = {}
    for monitor in (d for d in all_k8s_objects() if d["kind"] == "ServiceMonitor"):
        matched = [s for s in services.values()
                   if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(matched) == 1, f"ServiceMonitor {monitor['metadata']['name']} matches {len(matched)} Services"
        svc = matched[0]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
            assert endpoint.get("path", "/metrics") == "/metrics"
            scraped[svc["metadata"]["name"]] = endpoint
    # job label = Service name (no jobLabel set): the alert rules' job names
    assert set(scraped) == {GATEWAY_JOB, VLLM_JOB}
    # a metric label that the operator also sets as a target label is renamed exported_<name> unless honorLabels
    gateway_labels = set().union(*gateway_metrics().values())
    vllm_labels = set().union(*(v for v in vllm_metrics().values() if v is not None))
    for job, labels in ((GATEWAY_JOB, gateway_labels), (VLLM_JOB, vllm_labels)):
        if labels & OPERATOR_TARGET_LABELS:
            assert scraped[job].get("honorLabels") is True, \
                f"{job} metrics carry {sorted(labels & OPERATOR_TARGET_LABELS)}: set honorLabels"


# --- Grafana ------------------------------------------------------------------------------------------------------
def dashboard_panels() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": f"${{{var['name']}}}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]


def test_dashboard_queries_use_real_metrics_and_labels():
    problems = []
    for p in dashboard_panels():
        for t in p.get("targets", []):
            problems += promql_problems(t["expr"], f"panel {p['title']!r}/{t['refId']}", t.get("legendFormat", ""))
    assert not problems, "\n".join(problems)


def test_dashboard_queries_pass_promtool(promtool, tmp_path):
    rules = []
    for p in dashboard_panels():
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:panel{p['id']}_{t['refId']}", "expr": expr})
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool(promtool, "check", "rules", str(tmp_path / "dashboard_rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_dashboard_covers_gateway_and_vllm():
    exprs = " ".join(t["expr"] for p in dashboard_panels() for t in p.get("targets", []))
    used = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", exprs))
    families = gateway_families()
    shown = {f for f in families if any(n == f or n.startswith(f + "_") for n in used)}
    assert shown == families, f"gateway metrics without a panel: {sorted(families - shown)}"
    vllm_core = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:generation_tokens_total", "vllm:prompt_tokens_total"}
    assert vllm_core <= used, f"vLLM metrics without a panel: {sorted(vllm_core - used)}"


def test_metric_checks_catch_mistakes():
    """The PromQL checks are not vacuous."""
    assert promql_problems("rate(flock_request_total[5m])", "x")  # misspelt metric
    assert promql_problems('flock_routing_cache_total{result="bypassed"}', "x")  # value never emitted
    # a string the code holds, but not a value of this label
    assert promql_problems('flock_routing_cache_total{result="global"}', "x")
    assert promql_problems('flock_requests_total{outcome="bypass"}', "x")
    # a regex alternative that matches nothing emitted, and one that does
    assert promql_problems('flock_errors_total{type=~"backend_unavailable|backend_gone"}', "x")
    assert not promql_problems('flock_errors_total{type=~"backend_unavailable|pool_changed|http_5.."}', "x")
    assert not promql_problems('flock_errors_total{type="http_503"}', "x")
    assert promql_problems('flock_backend_up{backnd="a"}', "x")  # label the metric lacks
    assert promql_problems("sum by (model) (vllm:num_requests_running)", "x")  # grouping label nobody has
    assert promql_problems("vllm:num_requests_running{", "x")  # syntax
    assert not promql_problems('sum by (model_name) (vllm:num_requests_running{job="vllm"})', "x")
