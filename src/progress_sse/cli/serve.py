"""The server commands: `web` and `worker` (the Procfile's processes) and `dev`
(both, and an embedded Redis when none is around, under one supervisor).

Every option falls back to its environment variable (config.TABLE), so the
Procfile lines need no flags on a platform that sets `PORT` and `REDIS_URL`.
Invalid configuration stops the command at start with a message that names the
setting and the bad value.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from .. import config
from ..config import ConfigError, Settings, redacted
from .embedded import EmbeddedRedisError
from .errors import failed

log = logging.getLogger(__name__)

COMMANDS = ("web", "worker", "dev")
# Where `dev` differs from the Procfile's defaults: a laptop's dev server is for its
# own user, so it listens on loopback unless told otherwise (HOST, --host).
DEV_DEFAULTS = {"HOST": "127.0.0.1"}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    web = sub.add_parser("web", help="serve the HTTP API and the event streams (Procfile: web)")
    _setting_flags(web, "web")
    worker = sub.add_parser(
        "worker",
        help="run a Celery worker with the bridge and the demo tasks (Procfile: worker)",
        description="Runs `celery worker` for progress_sse.worker.app; options it does not know go to Celery.",
    )
    _setting_flags(worker, "worker")
    worker.add_argument("--concurrency", type=int, help="pool processes [Celery's default: one per CPU]")
    dev = sub.add_parser(
        "dev",
        help="run web + worker (+ an embedded Redis when none is around) in one command",
        description="Uses REDIS_URL if set, else a Redis on localhost:6379 if one answers, else starts a private one.",
    )
    _setting_flags(dev, "dev")
    dev.add_argument("--concurrency", type=int, default=2, help="worker pool processes [default 2]")


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        return failed(exc, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "web":
            return _web(settings)
        if args.command == "worker":
            return _worker(settings, args.concurrency, rest)
        return _dev(settings, args)
    except ConfigError as exc:  # found while starting (an allow-list that does not import)
        return failed(exc, 2)
    except EmbeddedRedisError as exc:
        return failed(exc, 1)


def _setting_flags(command: argparse.ArgumentParser, name: str) -> None:
    """The flags of a server command, from config.TABLE: each names its variable and default."""
    defaults = Settings()
    for setting in config.TABLE:
        if setting.flag and name in setting.commands:
            default = DEV_DEFAULTS.get(setting.env) if name == "dev" else None
            command.add_argument(
                setting.flag,
                dest=setting.attr,
                help=f"{setting.help} [env {setting.env}; default {default or setting.default_help(defaults)}]",
            )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env({**os.environ, **_flag_env(args)})


def _flag_env(args: argparse.Namespace) -> dict[str, str]:
    """The command's flags as the environment variables they stand for (a flag wins)."""
    pairs = ((s.env, getattr(args, s.attr, None)) for s in config.TABLE if s.flag)
    return {env: str(value) for env, value in pairs if value is not None}


def _web(settings: Settings) -> int:
    from aiohttp import web

    from ..web import RUN_OPTIONS, create_app

    def serving(_aiohttp_banner: str) -> None:
        # Called once the socket listens: the line means a client can connect now.
        where = f"http://{settings.host}:{settings.port}"
        print(f"progress-sse web on {where} (Redis {redacted(settings.redis_url)})", flush=True)
        if settings.keyed:
            print("progress-sse web: access tokens required on every route but /healthz and the page", flush=True)
        elif not config.is_loopback(settings.host):
            log.warning(
                "progress-sse web listens on %s with NO ACCESS CONTROL: anyone who can reach it can start and "
                "cancel allow-listed tasks and read every task and its results. Set PROGRESS_SSE_SECRET to require "
                "access tokens (README: Show your users their own tasks), or HOST=127.0.0.1 to keep it to this "
                "machine.%s",
                where,
                ""
                if settings.allowed_hosts
                else " It also answers any Host header, so a web page that points its own name at this address "
                "can read it: set PROGRESS_SSE_ALLOWED_HOSTS to the names clients reach it by.",
            )

    web.run_app(
        create_app(settings),  # loads the allow-list: a bad one stops the process before `serving`
        host=settings.host,
        port=settings.port,
        **RUN_OPTIONS,
        shutdown_timeout=5,
        print=serving,
    )
    return 0


def _worker(settings: Settings, concurrency: int | None, rest: Sequence[str]) -> int:
    _export(settings)
    from ..worker.app import app

    argv = ["worker", "--loglevel=INFO", f"--queues={settings.queue}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main([*argv, *rest])
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    """web + worker (+ an embedded Redis) as supervised child processes: if any of
    them exits, the others are stopped and the run fails, naming it and its last
    lines (cli/supervisor.py)."""
    from . import supervisor
    from .embedded import EmbeddedRedis, answers, listening

    env = {**os.environ, **_flag_env(args), "PYTHONUNBUFFERED": "1"}  # so their lines show as written
    for variable, value in DEV_DEFAULTS.items():
        if not env.get(variable, "").strip():
            env[variable] = value
    children: list[supervisor.Child] = []
    embedded: EmbeddedRedis | None = None
    host = "localhost" if settings.host in ("0.0.0.0", "127.0.0.1", "::") else settings.host
    try:
        if "REDIS_URL" not in os.environ and args.redis_url is None:
            parts = urlsplit(settings.redis_url)
            if not answers(parts.hostname or "localhost", parts.port or 6379):
                embedded = EmbeddedRedis()
                children.append(supervisor.Child("redis", embedded.command(logfile=""), ready=embedded.answers))
                env.update(REDIS_URL=embedded.url, CELERY_BROKER_URL=embedded.url)
                print(
                    f"progress-sse: no Redis on localhost:6379, starting an embedded one at {embedded.url}", flush=True
                )
        python = [sys.executable, "-m", "progress_sse"]
        children += [
            # Ready once it listens, so the URL below is printed when it works.
            supervisor.Child(
                "web", [*python, "web"], env, ready=lambda: listening(host, settings.port), ready_timeout=60
            ),
            supervisor.Child("worker", [*python, "worker", f"--concurrency={args.concurrency}"], env),
        ]

        def started() -> None:
            print(
                f"progress-sse dev: the page is at http://{host}:{settings.port}/ (Ctrl-C stops everything)", flush=True
            )

        return supervisor.run(children, started=started)
    finally:
        if embedded is not None:
            embedded.cleanup()


def _export(settings: Settings) -> None:
    """The worker reads its settings from the environment (celery imports the app)."""
    os.environ.update(settings.to_env())
