"""The pool's state file and the composites survive a SIGKILL at any moment of a write: a real child process
writes them in a loop and is killed at random moments; what is left on disk is always whole, and start-up
clears what the killed writes left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from adapters.composite import CONFIG_FILE, WEIGHTS_FILE, CompositeStore
from tests.unit.test_pool import library, pool

REPO = Path(__file__).resolve().parents[2]

# The child: commits the pool (add/remove, alternately) and writes 8 MB composites, as fast as it can.
WRITER = """
import os, sys, threading, torch
from pathlib import Path
from adapters.composite import write_once
from tests.unit.test_pool import pool
state, lib, comps = map(Path, sys.argv[1:4])
p = pool(state, [lib], lib)
lock = threading.Lock()
tensors = {f"w{i}": torch.full((512, 512), float(i)) for i in range(8)}
print("ready", flush=True)
k = 0
while True:
    k += 1
    if p.get("law"):
        p.remove("law")
    else:
        p.add(lib / "law")
    write_once(comps / f"c{os.getpid()}-{k}", lock, lambda: (tensors, {"r": k}, {"k": k}))
"""


def test_sigkill_mid_write_leaves_whole_files(tmp_path):
    lib = library(tmp_path)
    state, comps = tmp_path / "state" / "pool.json", tmp_path / "composites"
    comps.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(3)
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(state), str(lib), str(comps)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()

        saved = json.loads(state.read_text())  # whole JSON: the old version or the new one
        assert {e["name"] for e in saved["experts"]} in ({"cooking"}, {"cooking", "law"}) and saved["version"]
        for d in comps.iterdir():
            if not d.name.startswith("."):  # a visible composite is complete
                assert json.loads((d / CONFIG_FILE).read_text())["r"] > 0
                tensors = load_file(str(d / WEIGHTS_FILE))
                assert len(tensors) == 8 and all(float(t[-1, -1]) == i for i, t in enumerate(tensors.values())), d
    assert len([d for d in comps.iterdir() if not d.name.startswith(".")]) >= 3  # the checks above saw some

    # Start-up: the pool loads from the file and drops the temporary files of cut writes; the composite store
    # starts clean (composites are rebuilt on demand).
    p = pool(state, [lib], lib)
    assert "cooking" in {e.name for e in p.experts()}
    assert not list(state.parent.glob("pool.tmp*"))
    store = CompositeStore(comps)
    store.clear()
    assert list(comps.iterdir()) == []


TRUNCATE_WHILE_READING = """
import sys
from safetensors import safe_open
path = sys.argv[1]
with safe_open(path, framework="pt") as f:
    open(path, "r+b").truncate(100)  # another process rewriting the adapter in place
    for key in f.keys():
        f.get_tensor(key)
"""


def test_the_gateway_never_memory_maps_adapter_files(tmp_path):
    """A memory-mapped safetensors read dies with SIGBUS when the file is truncated meanwhile (shown here in a
    child), which took a replica down in the soak; so the gateway's layers read the bytes first
    (adapters/safetensors_io.py), and none of them calls safetensors' mapping readers."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.randn(256, 256) for i in range(8)}, str(path))
    child = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_READING, str(path)], capture_output=True)
    assert child.returncode == -signal.SIGBUS

    offenders = [f"{p.relative_to(REPO)}:{i}" for layer in ("adapters", "router", "service")
                 for p in (REPO / layer).rglob("*.py") if "engine" not in p.parts  # engine: inside vLLM
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "safe_open(" in line or "load_file(" in line]
    assert offenders == []
