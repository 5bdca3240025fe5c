"""The server commands: `web`, `worker` and `beat` (the Procfile's processes) and
`dev` (web and worker, beat with `--beat`, and an embedded Redis when none is
around, under one supervisor).

Every option falls back to its environment variable (config.TABLE), so the
Procfile lines need no flags on a platform that sets `PORT` and `REDIS_URL`.
Invalid configuration stops the command at start with a message that names the
setting and the bad value.

`web --workers N` (WEB_CONCURRENCY, as Procfile platforms set it) runs N copies of
the one-process web on one port, each bound with SO_REUSEPORT, under a small
parent (cli/supervisor.py). Why this and not gunicorn's aiohttp worker:

- Balance. With SO_REUSEPORT each process has its own listening socket and the
  Linux kernel hashes every new connection to one of them, so open streams spread
  evenly. Gunicorn's workers accept from one shared socket; epoll's wake-ups are
  uneven, and long-lived streams pile up on a few processes.
- Sameness. Each process is exactly `progress-sse web` with WEB_CONCURRENCY=1:
  the same `run_app` with `RUN_OPTIONS` (limits, handler cancellation, the
  tokenless access log) and the same start-up checks. Gunicorn's worker builds its
  own runner from gunicorn's settings, and would be one more dependency.
- Linux only: elsewhere SO_REUSEPORT does not balance, so N > 1 is refused there.

The parent prints the "progress-sse web on" line (and the access warnings) once,
when every process has said it listens. A SIGTERM or SIGINT to the parent goes to
every process at once; each drains its streams (shutdown_timeout) and exits 0, and
then the parent does. A process that exits on its own (a crash, an OOM kill)
stops all of them and the parent exits 1 naming it, as `dev` does: the platform
restarts the whole, and clients resume from Last-Event-ID without a gap. Restarting
it here instead would hide a crash loop behind a half-serving web.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import config
from ..config import ConfigError, Settings, redacted
from .embedded import EmbeddedRedisError
from .errors import failed

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

COMMANDS = ("web", "worker", "beat", "dev")
# Where `dev` differs from the Procfile's defaults: a laptop's dev server is for its
# own user, so it listens on loopback unless told otherwise (HOST, --host).
DEV_DEFAULTS = {"HOST": "127.0.0.1"}
# How long a web process gives its open requests to end when stopped, unless
# RUN_OPTIONS says: streams end at once (on_shutdown), so this is for the rest.
# Well inside the 30 s a platform allows between SIGTERM and SIGKILL, as is the
# parent's grace (supervisor.STOP_GRACE) for `--workers`.
SHUTDOWN_TIMEOUT = 5.0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    web = sub.add_parser("web", help="serve the HTTP API and the event streams (Procfile: web)")
    _setting_flags(web, "web")
    # Given by `web --workers N` to each process it starts: which one it is, 1 to N.
    web.add_argument("--process", type=int, help=argparse.SUPPRESS)
    worker = sub.add_parser(
        "worker",
        help="run a Celery worker with the bridge and the demo tasks (Procfile: worker)",
        description="Runs `celery worker` for progress_sse.worker.app; options it does not know go to Celery.",
    )
    _setting_flags(worker, "worker")
    worker.add_argument("--concurrency", type=int, help="pool processes [Celery's default: one per CPU]")
    beat = sub.add_parser(
        "beat",
        help="run Celery beat for the worker's app, with the bridge: what it sends is recorded (Procfile: beat)",
        description="Runs `celery beat` for progress_sse.worker.app; options it does not know go to Celery. "
        "Run one beat per deployment. It sends the demo schedule when PROGRESS_SSE_DEMO_SCHEDULE=1, else nothing.",
    )
    _setting_flags(beat, "beat")
    beat.add_argument(
        "--schedule",
        metavar="PATH",
        help="the file where beat keeps when each entry last ran "
        "[default: progress-sse-beat-<uid>/<key prefix>.schedule in the temporary directory]",
    )
    dev = sub.add_parser(
        "dev",
        help="run web + worker (+ an embedded Redis when none is around) in one command",
        description="Uses REDIS_URL if set, else a Redis on localhost:6379 if one answers, else starts a private one.",
    )
    _setting_flags(dev, "dev")
    dev.add_argument("--concurrency", type=int, default=2, help="worker pool processes [default 2]")
    dev.add_argument(
        "--beat",
        action="store_true",
        help="run Celery beat too, with the demo schedule: demo tasks arrive every 20 s and every minute",
    )


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        settings = _settings(args)
        config.check_broker(settings)  # before any child starts
    except ConfigError as exc:
        return failed(exc, 2)
    _configure_logging(settings)
    try:
        if args.command == "web":
            if args.process is not None:
                return _web_process(settings, args.process)
            return _web(settings)
        if args.command == "worker":
            return _worker(settings, args.concurrency, rest)
        if args.command == "beat":
            return _beat(settings, args.schedule, rest)
        return _dev(settings, args)
    except ConfigError as exc:  # found while starting (an allow-list that does not import)
        return _failed(settings, exc, 2)
    except EmbeddedRedisError as exc:
        return _failed(settings, exc, 1)


def _configure_logging(settings: Settings) -> None:
    """The process's logging, in its format (PROGRESS_SSE_LOG_FORMAT). `json`: every
    record as one JSON line on stderr, the access log's and Celery's included, and
    Python's warnings as records too (json_logs.py)."""
    if settings.log_format != "json":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    from .. import json_logs

    logging.basicConfig(level=logging.INFO, handlers=[json_logs.handler()])
    logging.captureWarnings(True)
    json_logs.use_in_celery()  # only acts if this process starts a Celery worker or beat
    sys.excepthook = _log_uncaught  # a crash's traceback too, as one record with `exc`


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):  # Ctrl-C is no crash: as Python shows it
        sys.__excepthook__(kind, value, traceback)
        return
    log.critical("progress-sse stopped on an uncaught exception", exc_info=(kind, value, traceback))


def _say(settings: Settings, line: str) -> None:
    """A line for whoever reads the output: printed, or in JSON a record like the rest."""
    if settings.log_format == "json":
        log.info("%s", line)
    else:
        print(line, flush=True)


def _failed(settings: Settings, exc: Exception, status: int) -> int:
    """`failed` once the logging is set up: in JSON, the error is a record."""
    if settings.log_format != "json":
        return failed(exc, status)
    log.error("progress-sse: %s", exc)
    return status


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
    if settings.web_workers > 1:
        return _web_group(settings)
    from ..web import create_app

    app = create_app(settings)  # loads the allow-list: a bad one stops the process before `_announce`
    _run(app, settings, print=lambda _: _announce(settings))
    return 0


def _web_process(settings: Settings, process: int) -> int:
    """Process `process` (1..N) of `web --workers N`."""
    from ..web import create_app

    app = create_app(settings)

    def listening(_aiohttp_banner: str) -> None:
        # The parent waits for this line from every process before it says the web serves.
        print(f"{_ready_line(process, settings.web_workers)} (pid {os.getpid()})", flush=True)

    _run(_first_signal_stops(app), settings, print=listening, reuse_port=True, handle_signals=False)
    from ..web import metrics

    metrics.process_ended()  # its gauges leave the group's sums (its counters stay in)
    return 0


def _run(app: web.Application | Awaitable[web.Application], settings: Settings, **options: Any) -> None:
    """Serve until stopped; `print` is called once the socket listens."""
    from ..web import RUN_OPTIONS
    from ..web.server import run_app

    run_app(
        app,
        host=settings.host,
        port=settings.port,
        event_loop=settings.event_loop,
        **{"shutdown_timeout": SHUTDOWN_TIMEOUT, **RUN_OPTIONS, **options},
    )


def _ready_line(process: int, processes: int) -> str:
    return f"progress-sse web process {process}/{processes} listening"


async def _first_signal_stops(app: web.Application) -> web.Application:
    """A process of a group stops gracefully on its first SIGTERM or SIGINT and
    ignores the ones after. It gets two: platforms signal every process of a dyno
    or container, and the parent forwards its own. aiohttp's handler would take the
    second as "stop now", cutting the drain short with status 1; here the parent's
    grace (then SIGKILL) is what bounds it."""
    from aiohttp.web import GracefulExit

    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise GracefulExit  # as aiohttp's own handler does

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    return app


def _web_group(settings: Settings) -> int:
    """`web --workers N`: N one-process webs on one port (see the module's docstring)."""
    from . import supervisor

    processes = settings.web_workers
    if not sys.platform.startswith("linux"):
        raise ConfigError(
            f"WEB_CONCURRENCY={processes} (--workers) needs Linux, whose SO_REUSEPORT spreads connections over the "
            "processes; elsewhere run one process per port behind a proxy"
        )
    try:
        _check_free(settings.host, settings.port)
    except OSError as exc:
        return _failed(settings, OSError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"), 1)
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}  # the flags' values too
    # Every process's metrics in files of this run's own, which a scrape of any one
    # sums (web/metrics.py): new each run, so no earlier run's processes count.
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir = tempfile.mkdtemp(prefix="progress-sse-metrics-")
    python = [sys.executable, "-m", "progress_sse", "web"]
    children = [
        supervisor.Child(
            f"web.{i}",
            [*python, f"--process={i}"],
            env,
            ready_line=_starts_with(_ready_line(i, processes)),
            ready_timeout=60,
        )
        for i in range(1, processes + 1)
    ]
    try:
        return supervisor.run(
            children,
            started=lambda: _announce(settings, processes),
            name="progress-sse web",
            together=True,
            strict_stop=True,
            **_group_output(settings, [child.name for child in children]),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _group_output(settings: Settings, names: list[str]) -> dict[str, Any]:
    """Where the group's supervisor writes: as ever, or in JSON only JSON lines (cli/json_output.py)."""
    if settings.log_format != "json":
        return {}
    from .json_output import JsonLines

    return {"out": JsonLines(sys.stderr, names), "err": JsonLines(sys.stderr, level=logging.ERROR)}


def _starts_with(prefix: str) -> Callable[[str], bool]:
    return lambda line: line.startswith(prefix)


def _check_free(host: str, port: int) -> None:
    """Raise OSError if anything listens on host:port. The processes bind with
    SO_REUSEPORT, which would let them join another group of ours on the port (a
    stale one, or a second start) without a word; this plain bind fails instead."""
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no user
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def _announce(settings: Settings, processes: int = 1) -> None:
    """The line that says the web serves, and what a user must know about its access."""
    where = f"http://{settings.host}:{settings.port}"
    group = f"; {processes} processes" if processes > 1 else ""
    _say(settings, f"progress-sse web on {where} (Redis {redacted(settings.redis_url)}{group})")
    if settings.keyed:
        _say(
            settings,
            "progress-sse web: access tokens required on every route but /healthz, /openapi.json and the page",
        )
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


def _worker(settings: Settings, concurrency: int | None, rest: Sequence[str]) -> int:
    _export(settings)
    from ..worker.app import app

    argv = [*_celery_options(settings), "worker", "--loglevel=INFO", f"--queues={settings.queue}"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main([*argv, *rest])
    return 0


def _beat(settings: Settings, schedule: str | None, rest: Sequence[str]) -> int:
    """`celery beat` for the worker's app. Importing the app installs the bridge in
    this process, and `queued` is written by the process that sends a task
    (before_task_publish), so each task beat sends is recorded as it is sent, as
    the web's are; the worker records the rest."""
    _export(settings)
    from ..worker.app import app

    path = Path(schedule) if schedule else default_schedule(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not app.conf.beat_schedule:
        log.warning(
            "progress-sse beat: the schedule is empty, so beat sends nothing. PROGRESS_SSE_DEMO_SCHEDULE=1 turns "
            "on the demo schedule; your own app's schedule runs with `celery -A yourapp beat` (README)"
        )
    log.info("progress-sse beat keeps its schedule state in %s", path)
    status = app.start([*_celery_options(settings), "beat", "--loglevel=INFO", f"--schedule={path}", *rest])
    return int(status or 0)


def default_schedule(settings: Settings) -> Path:
    """Where `beat` keeps its schedule state unless --schedule says: in the
    temporary directory, not in the working directory (a checkout, a release), one
    file per key prefix."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"progress-sse-beat-{user}" / f"{settings.key_prefix}.schedule"


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    """web + worker (+ beat, + an embedded Redis) as supervised child processes: if
    any of them exits, the others are stopped and the run fails, naming it and its
    last lines (cli/supervisor.py). Beat keeps its schedule state in a temporary
    directory of the run's own, removed when it stops."""
    from . import supervisor
    from .embedded import EmbeddedRedis, answers, listening

    env = {**os.environ, **_flag_env(args), "PYTHONUNBUFFERED": "1"}  # so their lines show as written
    env["WEB_CONCURRENCY"] = "1"  # one web process on a laptop, whatever a platform's variable says
    for variable, value in DEV_DEFAULTS.items():
        if not env.get(variable, "").strip():
            env[variable] = value
    children: list[supervisor.Child] = []
    embedded: EmbeddedRedis | None = None
    beat_dir: Path | None = None
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
        if args.beat:
            beat_dir = Path(tempfile.mkdtemp(prefix="progress-sse-beat-"))
            beat = [*python, "beat", f"--schedule={beat_dir / 'schedule'}"]
            children.append(supervisor.Child("beat", beat, {**env, "PROGRESS_SSE_DEMO_SCHEDULE": "1"}))

        def started() -> None:
            print(
                f"progress-sse dev: the page is at http://{host}:{settings.port}/ (Ctrl-C stops everything)", flush=True
            )
            if args.beat:
                print(
                    "progress-sse dev: beat sends demo.count every 20 s and demo.stages every minute, the first of "
                    "each now; press Show tasks on the page to watch them arrive",
                    flush=True,
                )

        return supervisor.run(children, started=started)
    finally:
        if embedded is not None:
            embedded.cleanup()
        if beat_dir is not None:
            shutil.rmtree(beat_dir, ignore_errors=True)


def _celery_options(settings: Settings) -> list[str]:
    """`celery`'s own options before its command. In JSON, `--quiet`: the banner a
    worker or beat prints at start is many lines of text, not a log record."""
    return ["--quiet"] if settings.log_format == "json" else []


def _export(settings: Settings) -> None:
    """The worker reads its settings from the environment (celery imports the app)."""
    os.environ.update(settings.to_env())
