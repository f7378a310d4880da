"""GET/POST /v1/experts, DELETE /v1/experts/{name} and POST /v1/experts/{name}/check: manage the expert pool."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import ValidationError

from adapters.card import ExpertCard, read_card
from adapters.errors import InvalidExpert, UnknownExpert
from adapters.pool import Expert, Quarantine
from adapters.validate import resolve_inside
from service.api.deps import get_gateway, require_admin, require_key
from service.api.openapi import ERRORS
from service.gateway import Gateway
from service.protocol import ExpertChoice, ExpertIn, ExpertList, ExpertOut, RoutingDecision

router = APIRouter(tags=["experts"])


def _out(expert: Expert, quarantine: Quarantine | None = None) -> ExpertOut:
    return ExpertOut(name=expert.name, description=expert.card.description, examples=expert.card.examples,
                     path=str(expert.path), rank=expert.rank, target_modules=list(expert.target_modules),
                     status="quarantined" if quarantine else "ok", problem=quarantine.reason if quarantine else None)


@router.get("/v1/experts", response_model=ExpertList, dependencies=[Depends(require_key)])
async def list_experts(gateway: Gateway = Depends(get_gateway)) -> ExpertList:
    pool = gateway.pool
    return ExpertList(pool_version=pool.version, data=[_out(e, pool.quarantined.get(e.name)) for e in pool.experts()])


def _card(body: ExpertIn, roots) -> ExpertCard:
    """card.json from the adapter directory, overridden field by field by the request."""
    adapter_dir = resolve_inside(body.path, roots)
    try:
        on_disk = read_card(adapter_dir) if adapter_dir.is_dir() else None
    except (ValueError, OSError) as exc:
        raise InvalidExpert(f"card.json is invalid: {exc}", "path") from None
    fields = on_disk.model_dump() if on_disk else {}
    fields.update({k: v for k, v in {"name": body.name, "description": body.description,
                                     "examples": body.examples}.items() if v is not None})
    if "name" not in fields or "description" not in fields:
        raise InvalidExpert("an expert needs a name and a description: give them or ship a card.json", "name")
    try:
        return ExpertCard.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidExpert(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0])) from None


@router.post("/v1/experts", response_model=ExpertOut, status_code=201, responses=ERRORS,
             dependencies=[Depends(require_admin)])
async def add_expert(body: ExpertIn, gateway: Gateway = Depends(get_gateway)) -> ExpertOut:
    card = _card(body, gateway.pool.roots)
    expert = await gateway.add_expert(body.path, card, replace=bool(body.replace))
    return _out(expert)


@router.delete("/v1/experts/{name}", responses=ERRORS, dependencies=[Depends(require_admin)])
async def remove_expert(name: str, gateway: Gateway = Depends(get_gateway)) -> dict:
    await gateway.remove_expert(name)
    return {"id": name, "object": "expert", "deleted": True}


@router.post("/v1/experts/{name}/check", response_model=ExpertOut, responses=ERRORS,
             dependencies=[Depends(require_admin)])
async def check_expert(name: str, gateway: Gateway = Depends(get_gateway)) -> ExpertOut:
    """Check an expert's files now: a quarantined expert that is healthy again returns to the pool; a broken
    one is quarantined."""
    expert = gateway.pool.get(name)
    if expert is None:
        raise UnknownExpert(f"no expert named {name!r}", "name")
    await gateway.recheck_quarantined(force=True)
    if name not in gateway.pool.quarantined:
        await gateway.quarantine_broken(RoutingDecision(mode="direct", experts=[ExpertChoice(name=name, weight=1)]))
    return _out(expert, gateway.pool.quarantined.get(name))
