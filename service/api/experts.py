"""GET/POST /v1/experts and DELETE /v1/experts/{name}: manage the expert pool."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import ValidationError

from adapters.card import ExpertCard, read_card
from adapters.errors import InvalidExpert
from adapters.pool import Expert
from adapters.validate import resolve_inside
from service.api.deps import get_gateway, require_admin, require_key
from service.api.responses import ERRORS
from service.gateway import Gateway
from service.protocol import ExpertIn, ExpertList, ExpertOut

router = APIRouter(tags=["experts"])


def _out(expert: Expert) -> ExpertOut:
    return ExpertOut(name=expert.name, description=expert.card.description, examples=expert.card.examples,
                     path=str(expert.path), rank=expert.rank, target_modules=list(expert.target_modules))


@router.get("/v1/experts", response_model=ExpertList, dependencies=[Depends(require_key)])
async def list_experts(gateway: Gateway = Depends(get_gateway)) -> ExpertList:
    return ExpertList(pool_version=gateway.pool.version, data=[_out(e) for e in gateway.pool.experts()])


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
