# myapp/web.py
import os
from pathlib import Path

from aiohttp import web

from progress_sse import Settings
from progress_sse.web import RUN_OPTIONS, create_app

from .progress import TASKS

PAGE = Path(__file__).with_name("page.html")


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE)


if __name__ == "__main__":
    settings = Settings.from_env(os.environ)  # REDIS_URL, PORT, ... as for `progress-sse web`
    app = create_app(settings, allowlist=TASKS)  # everything `progress-sse web` serves
    app.router.add_get("/import", page)
    web.run_app(app, host=settings.host, port=settings.port, **RUN_OPTIONS)
