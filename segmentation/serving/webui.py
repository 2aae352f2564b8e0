"""The web page to try the service: three static files served by the BentoML server itself.

`create_app()` is a small Starlette app, mounted on the public service with
`@bentoml.asgi_app(webui.create_app(), path="/ui")`. It serves `GET /` (index.html) and the page's
own assets, from a fixed list (no directory listing, no path from the request touches the disk).
The page calls the API with relative URLs, so it works behind any path prefix, offline, no CDN.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

WEB_DIR = Path(__file__).resolve().parent / "web"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from here; images are shown from blob:/data: URLs only.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, revalidated each time: a new deploy is seen at once.
    "Cache-Control": "no-cache",
}


def _serve(name: str):
    media_type = FILES[name]

    async def endpoint(request: Request) -> Response:
        return Response((WEB_DIR / name).read_bytes(), media_type=media_type, headers=SECURITY_HEADERS)

    return endpoint


def create_app() -> Starlette:
    """The page's app: `/` and `/index.html` → the page (GET, HEAD); `/app.js`, `/style.css` → its assets."""
    routes = [Route("/", _serve("index.html"), methods=["GET"])]
    routes += [Route(f"/{name}", _serve(name), methods=["GET"]) for name in FILES]
    return Starlette(routes=routes)
