"""A small read-only dashboard page; it calls the admin API with the token the user gives."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    """The dashboard page."""
    page = resources.files("api").joinpath("static/dashboard.html").read_text()
    return web.Response(text=page, content_type="text/html")
