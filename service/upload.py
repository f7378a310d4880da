"""POST /v1/experts as multipart: an archive of a PEFT directory, unpacked into the caller's expert directory
and registered like a path, or removed again.

The archive is checked while it is unpacked (adapters/archive.py), then validated as any registration is; on
any refusal nothing of it stays on disk. Each upload gets a directory of its own (`<name>-<random>`), so a
failed or concurrent upload never touches the files of an expert already registered; a replaced or removed
uploaded expert's directory is deleted by the gateway (UPLOAD_MARKER tells uploads from directories an
operator placed there).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from adapters.archive import ArchiveLimits, unpack
from adapters.card import ExpertCard
from adapters.pool import Expert, ExpertPool
from service.auth import Principal
from service.errors import APIError
from service.protocol import ExpertIn

UPLOAD_MARKER = ".flock-upload"
_FIELDS = {"file", "name", "description", "examples", "replace", "tenant"}


def _text(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"'{field}' must be a text field, not a file", param=field, code="invalid_value")
    return value


def _examples(value: str | None) -> list[str] | None:
    if value is None:
        return None
    try:
        examples = json.loads(value)
    except ValueError:
        examples = None
    if not isinstance(examples, list) or not all(isinstance(x, str) for x in examples):
        raise APIError(400, "'examples' must be a JSON list of strings", param="examples", code="invalid_value")
    return examples


def _flag(value: str | None) -> bool:
    if value is None or value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise APIError(400, "'replace' must be true or false", param="replace", code="invalid_value")


async def upload_expert(request: Request, gateway, principal: Principal,
                        owner_of: Callable[[str | None, Principal], str | None],
                        card_for: Callable[[ExpertIn, ExpertPool, str | None], ExpertCard]) -> Expert:
    settings = gateway.settings
    try:
        form = await request.form(max_files=1, max_fields=len(_FIELDS))
    except HTTPException as exc:  # python-multipart's own refusals (too many parts, malformed body)
        raise APIError(400, f"malformed multipart body: {exc.detail}", param="file", code="invalid_value") from None
    unknown = set(form.keys()) - _FIELDS
    if unknown:
        raise APIError(400, f"unknown form field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}",
                       param=sorted(unknown)[0], code="invalid_value")
    archive = form.get("file")
    if not isinstance(archive, UploadFile):
        raise APIError(400, "give the archive (.tar.gz or .zip) in the form field 'file'", param="file",
                       code="invalid_value")
    limit = settings.upload_max_mb << 20
    if archive.size is None or archive.size > limit:
        raise APIError(413, f"the archive exceeds {settings.upload_max_mb} MiB (FLOCK_UPLOAD_MAX_MB)", param="file",
                       code="archive_too_large")
    tenant = owner_of(_text(form.get("tenant"), "tenant"), principal)
    pool: ExpertPool = gateway.pool
    base = pool.upload_dir(tenant)
    token = secrets.token_hex(6)
    staging = base / f".upload-{token}"
    limits = ArchiveLimits(max_entries=settings.upload_max_entries,
                           max_unpacked_bytes=settings.upload_max_unpacked_mb << 20)
    final: Path | None = None
    try:
        adapter_dir = await asyncio.to_thread(unpack, archive.file, staging, limits)
        try:
            body = ExpertIn(path=str(adapter_dir), name=_text(form.get("name"), "name"),
                            description=_text(form.get("description"), "description"),
                            examples=_examples(_text(form.get("examples"), "examples")),
                            replace=_flag(_text(form.get("replace"), "replace")), tenant=tenant)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first.get("loc") else None
            raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
        card = card_for(body, pool, tenant)
        final = base / f"{card.name}-{token}"
        adapter_dir.rename(final)
        (final / UPLOAD_MARKER).write_text(f"uploaded by key {principal.key_id}\n")
        shutil.rmtree(staging, ignore_errors=True)
        return await gateway.add_expert(str(final), card, replace=body.replace, tenant=tenant, who=principal,
                                        action="upload")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    finally:
        await archive.close()


def discard_upload(path: Path, tenants_dir: Path) -> bool:
    """Delete an uploaded expert's directory (one the gateway unpacked; never one an operator placed)."""
    if path.is_relative_to(tenants_dir.resolve()) and (path / UPLOAD_MARKER).is_file():
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False
