"""The try-it page at GET /: one static HTML page with its script and style sheet (service/web/).

The page talks to the API it came from with relative URLs only (it works behind a proxy that
mounts the service under a path) and loads nothing from elsewhere (it works offline). Its
Content-Security-Policy allows scripts, styles, requests and images from this origin alone (and
images from the page's own blob: URLs): no inline script, no eval, no frames. FLOWIE_WEB_UI=false
leaves the routes out.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so an upgrade's page is never mixed with an old script
}
# URL path -> (file in service/web, media type). Nothing else under the page is served.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/web/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/web/app.css": ("app.css", "text/css; charset=utf-8"),
}


def web_router() -> APIRouter:
    """Routes serving the page's files, read once from the package data (left out of OpenAPI)."""
    router = APIRouter()
    folder = resources.files("service") / "web"
    for path, (name, media_type) in PAGE_FILES.items():
        body = (folder / name).read_bytes()

        def serve(body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

        router.add_api_route(path, serve, methods=["GET"], include_in_schema=False, name=f"web_{name}")
    return router
