"""``/ui``: the web dashboard, static files that call the JSON API from the browser.

The page holds no data and no secret: the browser signs in with a team key kept in
``sessionStorage`` and sends it as the bearer header on every API call, so the routes here
need no key. A strict Content-Security-Policy allows only this origin's script, style and
API: no inline code, no third-party request.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from api.errors import NotFound
from asft_core.spec import METHODS
from service.jobs.state import STATUSES, TERMINAL
from service.scans import SCAN_STATUSES

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The files the dashboard is made of; any other name is a 404 (no path ever reaches disk).
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _page() -> str:
    # The page carries the service's own lists of statuses and methods, so the script
    # repeats none of them.
    vocabulary = {
        "statuses": list(STATUSES),
        "terminal": sorted(TERMINAL),
        "methods": list(METHODS),
        "scan_statuses": list(SCAN_STATUSES),
    }
    page = (STATIC_DIR / "index.html").read_text()
    return page.replace("__ASFT_VOCABULARY__", html.escape(json.dumps(vocabulary), quote=True))


@router.get("/ui")
def dashboard() -> HTMLResponse:
    """The dashboard's page (every view is a ``#/...`` route of it)."""
    return HTMLResponse(_page(), headers=SECURITY_HEADERS)


@router.get("/ui/")
def dashboard_slash() -> RedirectResponse:
    """``/ui/`` is ``/ui``: relative links resolve the same way either way."""
    return RedirectResponse("/ui", status_code=308)


@router.get("/ui/static/{name}")
def static_file(name: str) -> FileResponse:
    """One of the dashboard's script, style and icon files."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound("not_found", f"no dashboard file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
