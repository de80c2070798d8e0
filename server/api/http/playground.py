"""The playground on the HTTP port: `/` and `/playground` serve a page (committed static files, no build step, no
CDN) that builds its form from this server's /openapi.json and calls fal's queue routes like any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

from server.api.http import schema

FILES = Path(__file__).with_name("static")  # the page, its script and style
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
# The page is the server's own: it loads nothing from elsewhere, and nothing may frame it
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob: http: https:; "
                                      "frame-ancestors 'none'"}


async def page(request: Request) -> Response:
    return FileResponse(FILES / "index.html", media_type="text/html", headers=HEADERS)


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return PlainTextResponse("not found\n", 404)
    return FileResponse(FILES / name, media_type=STATIC[name], headers=HEADERS)


def mount(app: FastAPI) -> None:
    html = {200: {"description": "the playground page", "content": {"text/html": {"schema": {"type": "string"}}}}}
    for path, op in (("/", "playground_root"), ("/playground", "playground")):
        app.add_api_route(path, page, methods=["GET"], operation_id=op, summary="The playground page",
                          responses=html)
    app.add_api_route(
        "/playground/static/{name}", static, methods=["GET"], operation_id="playground_static",
        summary="The playground's script and style",
        responses={200: {"description": "the file", "content": {kind: {"schema": {"type": "string"}}
                                                                for kind in STATIC.values()}},
                   404: schema.text("no such file")},
        openapi_extra={"parameters": [schema.parameter("name", "path", {"type": "string", "enum": sorted(STATIC)})]})
