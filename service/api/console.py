"""GET /ui: the routing console, a few static files (service/console/) with no build step. The files carry no
data; everything the page shows comes from the API with the key typed into it (the same keys as the API)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
router = APIRouter(tags=["console"])


@router.get("/ui", include_in_schema=False)
async def console() -> RedirectResponse:
    return RedirectResponse("/ui/")


def static_files() -> StaticFiles:
    """The console's files, mounted at /ui/."""
    return StaticFiles(directory=CONSOLE_DIR, html=True)
