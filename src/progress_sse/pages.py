"""The HTML side: templates, static assets and the two pages.

Assets are served from `/static/<version>/<name>`, where the version is a hash of
every asset's content: the browser may cache them for a year, and a deploy that
changes any file changes every URL. Relative imports between ES modules stay in
the same versioned folder, so they need no rewriting. Pages send a
Content-Security-Policy that allows no inline script, and task text only ever
reaches the DOM through `textContent` (static/page.js).
"""

from __future__ import annotations

import hashlib
import importlib.util
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .allowlist import AllowList, Range

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
IMMUTABLE = "public, max-age=31536000, immutable"


def asset_dir(name: str) -> Path:
    """`static` or `templates`: shipped in the wheel as progress_sse._<name>, and at
    the top of the repository in a checkout or an editable install."""
    spec = importlib.util.find_spec(f"progress_sse._{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / name


@dataclass(frozen=True)
class Assets:
    files: dict[str, bytes]
    version: str

    @classmethod
    def load(cls, directory: Path) -> Assets:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in {".js", ".css"}}
        digest = hashlib.sha256()
        for name, body in files.items():
            digest.update(name.encode() + b"\0" + body + b"\0")
        return cls(files, digest.hexdigest()[:12])

    def url(self, name: str) -> str:
        return f"/static/{self.version}/{name}"


ASSETS = web.AppKey("assets", Assets)


def setup(app: web.Application) -> None:
    assets = Assets.load(asset_dir("static"))
    app[ASSETS] = assets
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(asset_dir("templates")),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_get("/", index, name="index")
    app.router.add_get("/static/{version}/{name}", static_file)


def base_path(request: web.Request) -> str:
    """Where this app is mounted: "" at the root, "/progress" as a sub-app there."""
    return str(request.app.router["index"].url_for()).rstrip("/")


def wants_html(request: web.Request) -> bool:
    """A browser navigating to /tasks/<id> asks for HTML first; curl and fetch() do not."""
    accept = request.headers.get("Accept", "")
    html = accept.find("text/html")
    json_at = accept.find("application/json")
    return html != -1 and (json_at == -1 or html < json_at)


def _render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    base = base_path(request)
    assets = request.app[ASSETS]
    context = {**context, "base": base, "static": lambda name: base + assets.url(name)}
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers.update(PAGE_HEADERS)
    return response


def _forms(allowlist: AllowList) -> list[dict[str, Any]]:
    forms = []
    for task in allowlist:
        params = []
        for name, (check, default) in task.params.items():
            if isinstance(check, Range):
                step = "1" if check.kind == "integer" else "any"
                params.append(
                    {
                        "name": name,
                        "kind": check.kind,
                        "min": check.minimum,
                        "max": check.maximum,
                        "step": step,
                        "default": default,
                    }
                )
            else:
                params.append({"name": name, "kind": "json", "default": default})
        forms.append({"name": task.name, "description": task.description, "params": params})
    return forms


async def index(request: web.Request) -> web.Response:
    from .web import ALLOWLIST

    return _render(request, "index.html", {"forms": _forms(request.app[ALLOWLIST]), "task_id": None})


async def task_page(request: web.Request, task_id: str, known: bool) -> web.Response:
    return _render(request, "task.html", {"task_id": task_id, "known": known}, status=200 if known else 404)


async def static_file(request: web.Request) -> web.Response:
    assets = request.app[ASSETS]
    name = request.match_info["name"]
    body = assets.files.get(name)
    if body is None:
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    current = request.match_info["version"] == assets.version
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        content_type = "text/javascript"
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        # An old page asking for an old version gets today's file, but must not keep it.
        headers={"Cache-Control": IMMUTABLE if current else "no-cache", "X-Content-Type-Options": "nosniff"},
    )
