"""`progress-sse web | worker | dev`: the Procfile's processes and the one-command run.

Every option falls back to its environment variable, so the Procfile lines need no
flags on a platform that sets `PORT` and `REDIS_URL`. Invalid configuration stops
the command at start with a message that names the setting and the bad value.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from .config import ConfigError, Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "worker" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"progress-sse: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "web":
        return _web(settings)
    if args.command == "worker":
        return _worker(settings, args.concurrency, rest)
    return _dev(settings, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="progress-sse",
        description="Live progress for Celery tasks over Server-Sent Events.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--redis-url",
            help="Redis for events, and the broker unless CELERY_BROKER_URL is set "
            "[env REDIS_URL; default redis://localhost:6379/0]",
        )
        p.add_argument("--broker-url", help="Celery broker [env CELERY_BROKER_URL; default: the Redis URL]")
        p.add_argument(
            "--queue", help="Celery queue for tasks started over HTTP [env PROGRESS_SSE_QUEUE; default celery]"
        )
        p.add_argument(
            "--key-prefix",
            help="prefix of every Redis key and channel [env PROGRESS_SSE_KEY_PREFIX; default progress-sse]",
        )

    def web_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="interface to listen on [env HOST; default 0.0.0.0]")
        p.add_argument("--port", help="port to listen on [env PORT; default 8000]")
        p.add_argument("--heartbeat", help="seconds between ': ping' comments [env PROGRESS_SSE_HEARTBEAT; default 15]")

    web = sub.add_parser("web", help="serve the HTTP API and the event streams (Procfile: web)")
    common(web)
    web_options(web)
    worker = sub.add_parser(
        "worker",
        help="run a Celery worker with the bridge and the demo tasks (Procfile: worker)",
        description="Runs `celery worker` for progress_sse.tasks; arguments it does not know are passed to Celery.",
    )
    common(worker)
    worker.add_argument("--concurrency", type=int, help="pool processes [Celery's default: one per CPU]")
    dev = sub.add_parser(
        "dev",
        help="run web + worker (+ an embedded Redis when none is around) in one command",
        description="Uses REDIS_URL if set, else a Redis on localhost:6379 if one answers, else starts a private one.",
    )
    common(dev)
    web_options(dev)
    dev.add_argument("--concurrency", type=int, default=2, help="worker pool processes [default 2]")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    flags = {
        "redis_url": "REDIS_URL",
        "broker_url": "CELERY_BROKER_URL",
        "queue": "PROGRESS_SSE_QUEUE",
        "key_prefix": "PROGRESS_SSE_KEY_PREFIX",
        "host": "HOST",
        "port": "PORT",
        "heartbeat": "PROGRESS_SSE_HEARTBEAT",
    }
    for attr, var in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            env[var] = str(value)
    return Settings.from_env(env)


def _web(settings: Settings) -> int:
    from aiohttp import web

    from .web import create_app

    print(f"progress-sse web on http://{settings.host}:{settings.port} (Redis {_safe(settings.redis_url)})", flush=True)
    # handler_cancellation: a handler whose client went away is cancelled at once,
    # releasing its watcher and subscription instead of waiting for a write to fail.
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        shutdown_timeout=5,
        print=None,
    )
    return 0


def _worker(settings: Settings, concurrency: int | None, rest: Sequence[str]) -> int:
    _export(settings)
    from .tasks import app

    argv = ["worker", "--loglevel=INFO", f"--queues={settings.queue}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main([*argv, *rest])
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    from .embedded import EmbeddedRedis, answers

    embedded: EmbeddedRedis | None = None
    if "REDIS_URL" not in os.environ and args.redis_url is None:
        parts = urlsplit(settings.redis_url)
        if not answers(parts.hostname or "localhost", parts.port or 6379):
            embedded = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="progress-sse-redis-")))
            url = embedded.start()
            print(f"progress-sse: no Redis on localhost:6379, started an embedded one at {url}", flush=True)
            settings = settings.with_(redis_url=url, broker_url=url)
    _export(settings)
    worker = subprocess.Popen(
        [sys.executable, "-m", "progress_sse", "worker", f"--concurrency={args.concurrency}"],
        env=os.environ.copy(),
    )
    try:
        return _web(settings)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
        if embedded is not None:
            embedded.stop()


def _export(settings: Settings) -> None:
    """The worker reads its settings from the environment (celery imports the app)."""
    os.environ.update(
        REDIS_URL=settings.redis_url,
        CELERY_BROKER_URL=settings.broker_url,
        PROGRESS_SSE_QUEUE=settings.queue,
        PROGRESS_SSE_KEY_PREFIX=settings.key_prefix,
    )


def _safe(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


if __name__ == "__main__":
    raise SystemExit(main())
