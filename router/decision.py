"""What a routing decision is. The same schema goes on the wire (`routing` in every response)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ExpertChoice(BaseModel):
    name: str
    weight: float = Field(description="Share of this expert in the answer (weights sum to 1).")
    score: float | None = Field(None, description="Global router score (cosine similarity); null if not routed.")


class RoutingDecision(BaseModel):
    mode: str = Field(description="Routing mode used: a method name, 'direct' (expert by name) or 'base'.")
    experts: list[ExpertChoice] = Field(default_factory=list, description="Empty: the base model answered.")
    cached: bool = False


class RoutingParams(BaseModel):
    """The optional `routing` field of a request. Methods read the parameters they understand."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = Field(None, description="Routing method; default: FLOCK_DEFAULT_MODE.")
    top_k: int | None = Field(None, ge=1, le=8, description="Experts to combine (merge and later modes).")
    alpha: float | None = Field(None, ge=0, description="Weight of the global score in per-token gating.")
