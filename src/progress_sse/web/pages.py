"""The HTML side: templates, static assets and the two pages.

Assets are served from `/static/<version>/<name>`, where the version is a hash of
every asset's content: the browser may cache them for a year, and a deploy that
changes any file changes every URL. Relative imports between ES modules stay in
the same versioned folder, so they need no rewriting. Pages send a
Content-Security-Policy that allows no inline script, and task text only ever
reaches the DOM through `textContent` (static/card.js and the other page modules).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from ..allowlist import AllowList, describe_checker, same_json
from .context import ALLOWLIST

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
# The assets are public code: a page of your own on another origin imports
# progress.js from here, and a module script is fetched with CORS.
SHARED_ASSET = {"Access-Control-Allow-Origin": "*", "Cross-Origin-Resource-Policy": "cross-origin"}


def asset_dir(name: str) -> Path:
    """`static` or `templates`: shipped in the wheel as progress_sse._<name>, and at
    the top of the repository in a checkout or an editable install."""
    spec = importlib.util.find_spec(f"progress_sse._{name}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[3] / name


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
    app.router.add_get("/static/{version}/{name}", static_file, name="static")
    app.router.add_get("/static/{name}", latest_static_file, name="static_latest")


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


# The kinds of input the start form renders; a checker that describes itself as
# anything else gets the JSON field, which takes every value.
INPUT_KINDS = frozenset({"integer", "number", "string", "choice", "boolean", "list", "json"})
# List items simple enough to type comma-separated ("1, 2, 3", "red, green").
SIMPLE_ITEMS = frozenset({"integer", "number", "string"})


def describe_check(check: Any) -> dict[str, Any]:
    """What a parameter's check accepts, as the form needs it: its own description,
    or {"kind": "json"} for a check that has none (a user's own), or a kind the
    form has no input for; the JSON field takes every value."""
    described = describe_checker(check)
    if isinstance(described, dict) and described.get("kind") in INPUT_KINDS:
        return described
    return {"kind": "json"}


def _param(name: str, check: Any, default: Any) -> dict[str, Any]:
    """One input of a start form. `optional`: the field cannot show the default (None,
    say), so the page leaves it out of the request when it is blank, and the server
    fills in the default."""
    described = describe_check(check)
    kind = described["kind"]
    param: dict[str, Any] = {"name": name, "kind": kind, "optional": default is None, "hint": ""}
    if kind in {"integer", "number"}:
        param.update(
            min=described.get("min"),
            max=described.get("max"),
            step="1" if kind == "integer" else "any",
            value="" if default is None else default,
        )
    elif kind == "string":
        limit = described.get("max_length")
        param.update(min_length=described.get("min_length"), max_length=limit)
        param.update(value=default if isinstance(default, str) else "")
        param["hint"] = "text" if limit is None else f"text, at most {limit} characters"
    elif kind == "choice":
        # Each option's value is its JSON, so a choice of numbers is sent as a number.
        param["choices"] = [
            {
                "json": json.dumps(choice, ensure_ascii=False),
                "label": choice if isinstance(choice, str) else json.dumps(choice, ensure_ascii=False),
                "selected": same_json(choice, default),
            }
            for choice in described.get("choices") or []
        ]
        # A default that is not one of the choices (None, say) gets an option of its
        # own, left out of the request so that the server uses it.
        param["optional"] = not any(c["selected"] for c in param["choices"])
    elif kind == "boolean":
        param.update(checked=default is True, optional=False)  # unchecked sends false
    elif kind == "list":
        param.update(_list_param(described, default))
    if param["kind"] == "json":
        text = _json_text(default)
        # A default JSON cannot spell (None, or a date, say) shows an empty field,
        # which the page leaves out of the request: the server then uses the default.
        param.update(value=text or "", optional=text is None, hint='JSON, e.g. "text", 3, [1, 2] or {"a": 1}')
    return param


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _list_param(described: dict[str, Any], default: Any) -> dict[str, Any]:
    """A list of simple items is typed comma-separated (a JSON array works too); any
    other list, or a default that commas cannot spell, gets the JSON field."""
    item = described.get("item")
    item_kind = item.get("kind") if isinstance(item, dict) else None
    items = [] if default is None else default
    if item_kind not in SIMPLE_ITEMS or not isinstance(items, list) or not all(_spells(item_kind, x) for x in items):
        return {"kind": "json"}
    words = {"integer": "whole numbers", "number": "numbers", "string": "words"}[item_kind]
    limit = described.get("max_items")
    hint = f"{words}, comma-separated (or a JSON array)" + (f", at most {limit}" if limit is not None else "")
    return {"item": item_kind, "value": ", ".join(str(x) for x in items), "hint": hint}


def _spells(item_kind: str, value: Any) -> bool:
    """Whether `value` reads back the same from a comma-separated field."""
    if item_kind == "string":
        return isinstance(value, str) and value != "" and value == value.strip() and "," not in value
    return isinstance(value, int | float) and not isinstance(value, bool)


def _forms(allowlist: AllowList) -> list[dict[str, Any]]:
    return [
        {
            "name": task.name,
            "description": task.description,
            "params": [_param(name, check, default) for name, (check, default) in task.params.items()],
        }
        for task in allowlist
    ]


async def index(request: web.Request) -> web.Response:
    allowlist = request.app[ALLOWLIST]
    context = {
        "forms": _forms(allowlist),
        # The demo tasks say "Start a demo task"; a user's own allow-list must not.
        "title": getattr(allowlist, "title", "Start a task"),
        "task_id": None,
    }
    return _render(request, "index.html", context)


async def task_page(request: web.Request, task_id: str, known: bool) -> web.Response:
    return _render(request, "task.html", {"task_id": task_id, "known": known}, status=200 if known else 404)


async def latest_static_file(request: web.Request) -> web.Response:
    """`/static/progress.js`: a URL a page of your own can write down. It redirects
    to the current version's URL, which the browser then caches for good; the
    redirect itself is never cached, so an upgrade is picked up at once."""
    assets = request.app[ASSETS]
    name = request.match_info["name"]
    if name not in assets.files:
        raise web.HTTPNotFound(text=f"no static file {name!r}")
    location = base_path(request) + assets.url(name)
    raise web.HTTPFound(location, headers={"Cache-Control": "no-cache", **SHARED_ASSET})


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
        headers={
            "Cache-Control": IMMUTABLE if current else "no-cache",
            "X-Content-Type-Options": "nosniff",
            **SHARED_ASSET,
        },
    )
