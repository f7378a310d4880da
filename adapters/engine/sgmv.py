"""The per-token LoRA kernels (sgmv.cpp beside this file: plain adapters, and gated composites with their
per-token gate):
built once per CPU with torch's extension builder, then loaded.

The build (about 30 s) is cached under torch's extensions directory (~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR), in a folder keyed by the source's hash and by this CPU's instruction-set flags: it is
compiled with -march=native, so a cache shared with another kind of CPU (a home directory on a network share, an
image built elsewhere) builds its own copy rather than loading one that would die on an unknown instruction, and
two versions of the source (checkouts side by side) never rebuild each other's.

A built module is imported directly. torch's own loader would take its build lock (a plain file) and run ninja
on every process start, and a vLLM killed while holding that lock left every later vLLM waiting for it forever
at its first LoRA step (seen in a soak). Builds are serialised with an OS lock instead, which dies with its
holder. `make setup` builds ahead (`python -m adapters.engine.sgmv`); where nothing can compile it (no C++
compiler) LoRA stays on the torch paths of adapters/engine/lora_linear.py. FLOCK_LORA_KERNEL=0 turns it off
(EngineSettings.lora_kernel; for A/B runs).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from adapters.engine.settings import EngineSettings

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("sgmv.cpp")


def _cpu_tag() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def turned_off() -> bool:
    return not EngineSettings().lora_kernel


CFLAGS = ["-O3", "-march=native", "-fopenmp-simd"]


def module_name() -> str:
    """The module's name, and its build folder's: this CPU's flags and this source's hash (with the flags)."""
    source = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:8]
    return f"flock_sgmv_{_cpu_tag()}_{source}"


def build_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own loader
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / module_name()


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, folder: Path) -> ModuleType:
    """Build under an OS lock (released if this process dies); torch's file lock, left by a build that was
    killed, is removed first: while this lock is held, nobody else is building here."""
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"{name}.so"
    with open(folder / "flock.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if library.exists():  # built by another process while this one waited
            try:
                return _import(name, library)
            except ImportError:  # cut short by a killed build: built again below
                library.unlink()
        (folder / "lock").unlink(missing_ok=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(folder),
                    verbose=False)


@functools.cache
def kernel() -> ModuleType | None:
    """The compiled module, or None (turned off, or it cannot be built here: logged once)."""
    if turned_off():
        return None
    try:
        name, folder = module_name(), build_dir()
        library = folder / f"{name}.so"
        if library.exists():
            try:
                return _import(name, library)
            except ImportError:
                pass  # a partial file: built again
        return _build(name, folder)
    except Exception as exc:  # no compiler, or a build error: the torch paths still serve every batch
        log.warning("per-token LoRA kernel unavailable, using the torch paths: %s", str(exc).strip()[-500:])
        return None


if __name__ == "__main__":  # make setup: build ahead so that vLLM's first LoRA step does not wait for it
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO)
    if turned_off():
        print("per-token LoRA kernel turned off (FLOCK_LORA_KERNEL)")
        sys.exit(0)
    ok = kernel() is not None
    print(f"per-token LoRA kernel {'ready' if ok else 'NOT built (see the warning above)'} "
          f"in {time.perf_counter() - start:.0f} s")
    sys.exit(0 if ok else 1)
