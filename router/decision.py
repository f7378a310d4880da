"""What a routing decision is. The same schema goes on the wire (`routing` in every response)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ExpertChoice(BaseModel):
    name: str
    weight: float = Field(description="Share of this expert in the answer (weights sum to 1).")
    score: float | None = Field(None, description="Global router score (cosine similarity); null if not routed.")


class GateParams(BaseModel):
    """Per-token gating of the chosen experts (modes arrow, phatgoose, glider): s = local + α·global, top-k."""

    local: str = Field(description="Local gate signal: 'phatgoose' or 'arrow'.")
    alpha: float = Field(description="Weight of the global score.")
    top_k: int = Field(description="Experts mixed per token.")


class RoutingDecision(BaseModel):
    mode: str = Field(description="Routing mode used: a method name, 'direct' (expert by name) or 'base'.")
    experts: list[ExpertChoice] = Field(default_factory=list, description="Empty: the base model answered.")
    gate: GateParams | None = Field(None, description="Set for per-token modes: the experts are candidates, "
                                    "mixed per token and per layer; their weight is their share under the "
                                    "global term alone.")
    cached: bool = False


# A solo margin no lead reaches (cosine scores differ by at most 2): glider always mixes the candidates.
ALWAYS_MIX = 2.0


class RoutingParams(BaseModel):
    """The optional `routing` field of a request. Methods read the parameters they understand."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = Field(None, description="Routing method; default: FLOCK_DEFAULT_MODE.")
    top_k: int | None = Field(None, ge=1, le=8, description="Experts to combine (merge and later modes).")
    alpha: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False,
                                description="Weight of the global score in per-token gating (GLIDER used 3-1000); "
                                "kept to two significant digits.")
    solo_margin: float | None = Field(None, ge=0, le=ALWAYS_MIX, allow_inf_nan=False,
                                      description="glider: the top expert answers alone when its global score "
                                      "beats the runner-up's by at least this; below it the experts are mixed "
                                      "per token. Default: FLOCK_GLIDER_SOLO_MARGIN.")
