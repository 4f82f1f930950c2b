"""The operator console: one page and its script, both static; the script calls the admin API
(/v1/..., GET /v1/overview for the aggregates) with the token the user pastes in."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()

# Defence in depth behind the console's rule (data only ever as text): no inline script or event
# handler runs, scripts and requests go to this origin only, and no other site may frame the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self';"
    " img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    """The console page."""
    page = resources.files("api").joinpath("static/dashboard.html").read_text()
    return web.Response(text=page, content_type="text/html", headers=SECURITY_HEADERS)


@routes.get("/console.js")
async def script(request: web.Request) -> web.Response:
    """The console's script."""
    text = resources.files("api").joinpath("static/console.js").read_text()
    return web.Response(
        text=text, content_type="text/javascript", headers={"X-Content-Type-Options": "nosniff"}
    )
