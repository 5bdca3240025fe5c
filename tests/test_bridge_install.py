"""Where `install(app)` records events: REDIS_URL, else the app's own Redis broker.

Each case installs the bridge for real, publishes one event through it, and reads
the event back from the Redis database it should have gone to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

import progress_sse
from progress_sse.config import Settings
from progress_sse.events import State, make_event
from progress_sse.keys import Keys
from progress_sse.worker.publisher import Publisher

OTHER_DB = 14  # not the suite's database: proves the app's broker was followed


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> Iterator[list[Publisher]]:
    """Installs under this test's key prefix; closes and uninstalls afterwards."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.setenv("PROGRESS_SSE_KEY_PREFIX", keys.prefix)
    publishers: list[Publisher] = []
    yield publishers
    progress_sse.uninstall()
    for publisher in publishers:
        publisher.client.close()


def record_one(publisher: Publisher) -> str:
    task_id = str(uuid.uuid4())
    publisher.publish(make_event(task_id, "shop.report", State.QUEUED))
    return task_id


def db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def test_without_redis_url_events_go_to_the_apps_redis_broker(
    installed: list[Publisher], settings: Settings, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    broker = db_url(settings.redis_url, OTHER_DB)
    with caplog.at_level(logging.INFO, logger="progress_sse.worker.bridge"):
        publisher = progress_sse.install(Celery("shop", broker=broker))
    installed.append(publisher)
    task_id = record_one(publisher)
    other = redis.Redis.from_url(broker, decode_responses=True)
    try:
        assert other.hget(keys.state(task_id), "state") == "queued"
    finally:  # only this test's keys, whatever the assertion said
        other.delete(keys.state(task_id), keys.log(task_id), keys.recent(), keys.history(), keys.queued())
        other.close()
    host_port = broker.split("://", 1)[1].rsplit("/", 1)[0]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        f"progress-sse records events in redis://{host_port}/{OTHER_DB} under the key prefix {keys.prefix!r}"
    ]


def test_redis_url_wins_over_the_broker(
    installed: list[Publisher], settings: Settings, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    publisher = progress_sse.install(Celery("shop", broker=db_url(settings.redis_url, OTHER_DB)))
    installed.append(publisher)
    assert publisher.client.connection_pool.connection_kwargs["db"] == int(settings.redis_url.rsplit("/", 1)[1])


@pytest.mark.parametrize("broker", ["amqp://guest@localhost//", None])
def test_a_broker_that_is_not_redis_leaves_the_default(installed: list[Publisher], broker: str | None) -> None:
    publisher = progress_sse.install(Celery("shop", broker=broker))
    installed.append(publisher)
    kwargs = publisher.client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs.get("db", 0)) == ("localhost", 6379, 0)


def test_failover_brokers_use_the_first(installed: list[Publisher], settings: Settings) -> None:
    first, second = db_url(settings.redis_url, OTHER_DB), db_url(settings.redis_url, 2)
    publisher = progress_sse.install(Celery("shop", broker=f"{first};{second}"))
    installed.append(publisher)
    assert publisher.client.connection_pool.connection_kwargs["db"] == OTHER_DB


def test_the_log_line_never_shows_the_password(installed: list[Publisher], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="progress_sse.worker.bridge"):
        installed.append(progress_sse.install(Celery("shop", broker="redis://:s3cret@cache.internal:6380/3")))
    assert "redis://cache.internal:6380/3" in caplog.text
    assert "s3cret" not in caplog.text
