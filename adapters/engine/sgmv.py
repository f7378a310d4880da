"""The per-token LoRA kernels (sgmv.cpp beside this file: plain adapters, and gated composites with their
per-token gate):
built once per CPU with torch's extension builder, then loaded.

The build (about 30 s) is cached under torch's extensions directory (~/.cache/torch_extensions), keyed by the
source and by this CPU's instruction-set flags: it is compiled with -march=native, so a cache shared with another
kind of CPU (a home directory on a network share, an image built elsewhere) builds its own copy rather than
loading one that would die on an unknown instruction. `make setup` builds it ahead (`python -m adapters.engine.sgmv`);
where nothing can compile it (no C++ compiler) LoRA stays on the torch paths of adapters/engine/lora_linear.py.
FLOCK_LORA_KERNEL=0 turns it off (EngineSettings.lora_kernel; for A/B runs).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from pathlib import Path

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


@functools.cache
def kernel():
    """The compiled module, or None (turned off, or it cannot be built here: logged once)."""
    if turned_off():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"flock_sgmv_{_cpu_tag()}", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
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
