"""GET /v1/models and POST /v1/route (the routing decision alone, no generation)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from adapters.tenants import Scope
from service.api.deps import get_gateway, require_key
from service.api.openapi import ERRORS
from service.auth import Principal
from service.errors import APIError
from service.gateway import AUTO, Gateway
from service.limits import check_limits
from service.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, RouteRequest, RouteResponse
from service.query import query_text

router = APIRouter(tags=["models"], dependencies=[Depends(require_key)])
_STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList)
async def list_models(gateway: Gateway = Depends(get_gateway), principal: Principal = Depends(require_key)
                      ) -> ModelList:
    return ModelList(data=model_cards(gateway, principal.scope))


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
async def get_model(model_id: str, gateway: Gateway = Depends(get_gateway),
                    principal: Principal = Depends(require_key)) -> ModelCard:
    for card in model_cards(gateway, principal.scope):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model {model_id!r} does not exist; GET /v1/models lists the models", param="model",
                   code="model_not_found")


def model_cards(gateway: Gateway, scope: Scope) -> list[ModelCard]:
    """auto, the base model and the experts `scope` may see."""
    base = gateway.settings.base_model_name
    data = [
        ModelCard(id=AUTO, created=_STARTED, parent=base, description="Routed across the expert pool."),
        ModelCard(id=base, created=_STARTED, description="The base model, no adapter."),
    ]
    data += [ModelCard(id=e.name, created=_STARTED, parent=base, description=e.card.description)
             for e in gateway.pool.experts(scope)]
    return data


@router.post("/v1/route", response_model=RouteResponse, responses=ERRORS)
async def route(body: RouteRequest, gateway: Gateway = Depends(get_gateway),
                principal: Principal = Depends(require_key)) -> RouteResponse:
    if body.prompt is None and not body.messages:
        raise APIError(400, "give 'prompt' or 'messages'", param="prompt", code="invalid_request")
    # The same limits as generation: message count and every message's text.
    request: ChatCompletionRequest | CompletionRequest = (
        ChatCompletionRequest(model=body.model, messages=body.messages) if body.messages
        else CompletionRequest(model=body.model, prompt=body.prompt or ""))
    check_limits(gateway.settings, request)
    query = query_text(request)
    decision, _ = await gateway.decide(body.model, body.routing, query, principal.scope)
    gateway.metrics.requests.labels("/v1/route", decision.mode, "ok").inc()
    if not body.explain:
        return RouteResponse(routing=decision)
    scores, threshold = await gateway.router.explain(query, principal.scope)
    return RouteResponse(routing=decision, scores=scores, threshold=threshold)
