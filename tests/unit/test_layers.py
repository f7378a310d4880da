"""Layers import downward only (docs/architecture.md):

    cli  >  eval  >  bench  >  service  >  router  >  adapters  >  adapters.engine
                               training  >  adapters

`service.settings` is the one settings table and imports nothing of flock's, so every layer above the engine may
read it; the engine (code that runs inside vLLM) reads its part, `adapters.engine.settings`, which the table
includes. Every import counts, also those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cli", "eval", "bench", "service", "router", "training", "adapters")
SETTINGS = "service.settings"

# What each layer may import besides itself. The most specific layer a module falls in applies.
ALLOWED: dict[str, set[str]] = {
    "adapters.engine": set(),
    "adapters": {"adapters.engine"},
    "router": {"adapters", "adapters.engine", SETTINGS},
    "service": {"router", "adapters", "adapters.engine"},
    "training": {"adapters", "adapters.engine", SETTINGS},
    "bench": {"service", "router", "adapters", "adapters.engine", "training"},
    "eval": {"bench", "service", "router", "adapters", "adapters.engine", "training"},
    "cli": {"eval", "bench", "service", "router", "adapters", "adapters.engine", "training"},
}


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every flock import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from adapters import lora_linear` imports adapters.lora_linear: count the submodule.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def allowed(source: str, target: str) -> bool:
    src, dst = layer_of(source), layer_of(target)
    if src is None or dst is None or src == dst:
        return True
    return dst in ALLOWED[src] or (SETTINGS in ALLOWED[src] and (target + ".").startswith(SETTINGS + "."))


def violations(root: Path = REPO) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for line, target in imports(path):
                if not allowed(module, target):
                    bad.append(f"{path.relative_to(root)}:{line}: {module} ({layer_of(module)}) imports {target} "
                               f"({layer_of(target)})")
    return bad


def test_layers_import_downward_only():
    assert violations() == []


@pytest.mark.parametrize("source, target", [
    ("adapters.engine.plugin", "adapters.gated_composite"),
    ("adapters.engine.gating", "router.decision"),
    ("adapters.pool", "router.index"),
    ("router.router", "service.gateway"),
    ("service.gateway", "eval.harness"),
    ("service.app", "bench.run"),
    ("training.lora", "router.embed"),
    ("adapters.engine.plugin", SETTINGS),
    ("bench.run", "cli"),
])
def test_upward_imports_are_refused(source, target):
    assert not allowed(source, target)


@pytest.mark.parametrize("source, target", [
    ("adapters.gated_composite", "adapters.engine.gating"),
    ("router.router", "adapters.pool"),
    ("service.gateway", "router.router"),
    ("training.lora", SETTINGS),
    ("cli.evaluate", "eval.harness"),
])
def test_downward_imports_are_allowed(source, target):
    assert allowed(source, target)


def test_the_check_reads_imports_inside_functions(tmp_path):
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "late.py").write_text("def f():\n    from service.gateway import Gateway\n")
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    assert violations(tmp_path) == ["router/late.py:2: router.late (router) imports service.gateway.Gateway (service)"]


def test_every_flock_import_resolves():
    """Imports inside functions run only when called: a moved module must not leave one of them dangling."""
    import importlib

    missing = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, target in imports(path):
                try:
                    importlib.import_module(target)
                except ModuleNotFoundError:
                    parent, _, name = target.rpartition(".")
                    if not hasattr(importlib.import_module(parent), name):  # a name, not a module
                        missing.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert missing == []
