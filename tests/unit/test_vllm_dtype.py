"""FLOCK_VLLM_DTYPE=auto: bf16 only where the hardware runs it natively (vLLM's CPU backend emulates it)."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings, auto_vllm_dtype


def _cpu(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_auto_is_float32_on_an_avx2_cpu_and_bf16_where_the_cpu_has_bf16(tmp_path: Path) -> None:
    no_gpu = tmp_path / "none"
    assert auto_vllm_dtype(_cpu(tmp_path, "avx avx2 fma"), no_gpu) == "float32"
    assert auto_vllm_dtype(_cpu(tmp_path, "avx2 avx512f avx512_bf16"), no_gpu) == "bfloat16"
    assert auto_vllm_dtype(_cpu(tmp_path, "avx2 amx_bf16 amx_tile"), no_gpu) == "bfloat16"
    assert auto_vllm_dtype(_cpu(tmp_path, "avx2 avx512f avx512bw"), no_gpu) == "float32"  # AVX-512 without BF16


def test_auto_is_bf16_with_an_nvidia_gpu(tmp_path: Path) -> None:
    gpus = tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert auto_vllm_dtype(_cpu(tmp_path, "avx2"), gpus) == "bfloat16"


def test_a_named_dtype_is_passed_as_is(monkeypatch) -> None:
    monkeypatch.setenv("FLOCK_VLLM_DTYPE", "bfloat16")
    assert Settings().resolved_vllm_dtype == "bfloat16"
    monkeypatch.setenv("FLOCK_VLLM_DTYPE", "auto")
    assert Settings().resolved_vllm_dtype == auto_vllm_dtype()
