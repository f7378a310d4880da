"""GET/POST /v1/experts, DELETE /v1/experts/{name} and POST /v1/experts/{name}/check: manage the expert pool.

Every handler acts within the caller's scope (adapters/tenants.py): an expert the caller may not see is
answered as one that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from adapters.card import ExpertCard, read_card
from adapters.errors import InvalidExpert, UnknownExpert
from adapters.pool import Expert, ExpertPool, Quarantine
from adapters.tenants import check_tenant_name
from service.api.deps import get_gateway, require_key, require_manager
from service.api.openapi import ERRORS
from service.auth import Principal
from service.errors import APIError
from service.gateway import Gateway
from service.protocol import ExpertChoice, ExpertIn, ExpertList, ExpertOut, RoutingDecision
from service.upload import upload_expert

router = APIRouter(tags=["experts"])


def _out(expert: Expert, quarantine: Quarantine | None = None) -> ExpertOut:
    return ExpertOut(name=expert.name, tenant=expert.tenant, description=expert.card.description,
                     examples=expert.card.examples, path=str(expert.path), rank=expert.rank,
                     target_modules=list(expert.target_modules), status="quarantined" if quarantine else "ok",
                     problem=quarantine.reason if quarantine else None)


@router.get("/v1/experts", response_model=ExpertList)
async def list_experts(gateway: Gateway = Depends(get_gateway), principal: Principal = Depends(require_key)
                       ) -> ExpertList:
    pool = gateway.pool
    experts = pool.experts(principal.scope)
    # The version of what this caller sees: the whole pool's would change with other tenants' experts.
    version = pool.version if principal.admin else pool.version_of(experts)
    return ExpertList(pool_version=version, data=[_out(e, pool.quarantined.get(e.name)) for e in experts])


def owner_of(body_tenant: str | None, principal: Principal) -> str | None:
    """The tenant a new expert belongs to: a tenant key's own; for an admin key, the one it names (or shared)."""
    if principal.admin:
        if body_tenant is not None:
            try:
                check_tenant_name(body_tenant)
            except ValueError as exc:
                raise APIError(400, str(exc), param="tenant", code="invalid_value") from None
        return body_tenant
    if body_tenant is not None and body_tenant != principal.tenant:
        raise APIError(403, f"this key registers experts of tenant {principal.tenant!r} only", param="tenant",
                       code="insufficient_permissions")
    return principal.tenant


def card_for(body: ExpertIn, pool: ExpertPool, tenant: str | None) -> ExpertCard:
    """card.json from the adapter directory, overridden field by field by the request. The directory is
    resolved within the roots `tenant` may use before anything in it is read."""
    adapter_dir = pool.resolve_path(body.path, tenant)
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


_UPLOAD_FIELDS = {"file": {"type": "string", "format": "binary", "description": ".tar.gz or .zip of a PEFT "
                            "directory (adapter_config.json, adapter_model.safetensors, optionally card.json)."},
                  "name": {"type": "string"}, "description": {"type": "string"},
                  "examples": {"type": "string", "description": "A JSON list of example queries."},
                  "replace": {"type": "boolean"}, "tenant": {"type": "string"}}
_BODIES = {"application/json": {"schema": ExpertIn.model_json_schema()},
           "multipart/form-data": {"schema": {"type": "object", "properties": _UPLOAD_FIELDS, "required": ["file"]}}}


@router.post("/v1/experts", response_model=ExpertOut, status_code=201, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": _BODIES}})
async def add_expert(request: Request, gateway: Gateway = Depends(get_gateway),
                     principal: Principal = Depends(require_manager)) -> ExpertOut:
    """Register an expert: JSON naming an adapter directory on the server, or multipart uploading an archive of
    one (service/upload.py)."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return _out(await upload_expert(request, gateway, principal, owner_of, card_for))
    try:
        body = ExpertIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    tenant = owner_of(body.tenant, principal)
    card = card_for(body, gateway.pool, tenant)
    expert = await gateway.add_expert(body.path, card, replace=bool(body.replace), tenant=tenant, who=principal)
    return _out(expert)


@router.delete("/v1/experts/{name}", responses=ERRORS)
async def remove_expert(name: str, gateway: Gateway = Depends(get_gateway),
                        principal: Principal = Depends(require_manager)) -> dict:
    await gateway.remove_expert(name, who=principal)
    return {"id": name, "object": "expert", "deleted": True}


@router.post("/v1/experts/{name}/check", response_model=ExpertOut, responses=ERRORS)
async def check_expert(name: str, gateway: Gateway = Depends(get_gateway),
                       principal: Principal = Depends(require_manager)) -> ExpertOut:
    """Check an expert's files now: a quarantined expert that is healthy again returns to the pool; a broken
    one is quarantined. Admin keys check any expert, tenant keys their tenant's."""
    expert = gateway.pool.visible(name, principal.scope)
    if expert is None or not principal.scope.manages(expert.tenant):
        if expert is None:
            raise UnknownExpert(f"no expert named {name!r}", "name")
        raise APIError(403, f"expert {name!r} is shared: only admin keys check it", code="insufficient_permissions")
    await gateway.recheck_quarantined(force=True)
    if name not in gateway.pool.quarantined:
        await gateway.quarantine_broken(RoutingDecision(mode="direct", experts=[ExpertChoice(name=name, weight=1)]))
    return _out(expert, gateway.pool.quarantined.get(name))
