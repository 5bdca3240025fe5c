"""Redis key and channel names: hash-tagged per task, and the task id check."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from progress_sse.keys import CLUSTER_PARTITIONS, Keys, is_task_id, partition_tags

TASK_IDS = [
    str(uuid.uuid4()),
    "0b5c2f1e-aaaa-4bbb-8ccc-000000000000",
    "import-2024-01-01",
    "user:42:export",
    "job.v2_final",
    "mail@host+retry=1",
    "A",
]


def per_task_names(keys: Keys, task_id: str) -> list[str]:
    return [keys.state(task_id), keys.log(task_id), keys.channel(task_id)]


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_every_per_task_key_and_the_channel_carry_the_task_id_hash_tag(task_id: str) -> None:
    for name in per_task_names(Keys("pfx"), task_id):
        assert f"{{{task_id}}}" in name
        # The first {...} is the hash tag Redis Cluster uses: it must be the task id.
        assert name[name.index("{") + 1 : name.index("}")] == task_id


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_one_task_lives_in_one_cluster_slot(task_id: str) -> None:
    slots = {key_slot(name.encode()) for name in per_task_names(Keys("pfx"), task_id)}
    assert slots == {key_slot(task_id.encode())}


def test_per_task_names_are_distinct_and_under_the_prefix() -> None:
    keys = Keys("my-app")
    task_id = str(uuid.uuid4())
    names = [*per_task_names(keys, task_id), keys.history(), keys.recent(), keys.control_channel()]
    assert len(set(names)) == len(names)
    assert all(name.startswith("my-app:") for name in names)


def test_different_tasks_get_different_keys() -> None:
    keys = Keys()
    assert set(per_task_names(keys, "a")).isdisjoint(per_task_names(keys, "b"))


def test_different_prefixes_never_share_a_key() -> None:
    task_id = str(uuid.uuid4())
    one, two = Keys("one"), Keys("two")
    ones = {*per_task_names(one, task_id), one.history(), one.recent()}
    twos = {*per_task_names(two, task_id), two.history(), two.recent()}
    assert ones.isdisjoint(twos)


def test_default_prefix_is_progress_sse() -> None:
    assert Keys().history() == "progress-sse:history"


@pytest.mark.parametrize("task_id", TASK_IDS)
@pytest.mark.parametrize("prefix", ["progress-sse", "a:b.c", "pst-1234"])
def test_task_of_channel_round_trips(prefix: str, task_id: str) -> None:
    keys = Keys(prefix)
    assert keys.task_of_channel(keys.channel(task_id)) == task_id


@pytest.mark.parametrize(
    "task_id",
    [
        str(uuid.uuid4()),
        str(uuid.uuid4()).upper(),
        uuid.uuid4().hex,
        "celery-task-1",
        "my_app.tasks.export:2024-06-01",
        "job@worker1",
        "base64ish+abc=",
        "7",
        "a" * 200,
    ],
)
def test_is_task_id_accepts_uuids_and_celery_style_custom_ids(task_id: str) -> None:
    assert is_task_id(task_id)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "{abc}",
        "abc}",
        "ab{c",
        " abc",
        "abc ",
        "a b",
        "abc\n",
        "a\tb",
        "a" * 201,
        "-abc",
        ".abc",
        "_abc",
        ":abc",
        "@abc",
        "a/b",
        "../etc",
        "a?b",
        "ä-umlaut",
    ],
)
def test_is_task_id_rejects_empty_braces_whitespace_overlong_and_leading_punctuation(value: str) -> None:
    assert not is_task_id(value)


@pytest.mark.parametrize("prefix", ["progress-sse", "myapp", "pst-0123abcd"])
def test_the_partitions_fall_evenly_on_masters_that_hold_equal_runs_of_slots(prefix: str) -> None:
    slots = [key_slot(tag.encode()) for tag in partition_tags(prefix)]
    for masters in (2, 3, 4, 6, 12):
        run = REDIS_CLUSTER_HASH_SLOTS / masters  # what `redis-cli --cluster create` gives each
        served = Counter(int(slot // run) for slot in slots)
        assert sorted(served.values()) == [CLUSTER_PARTITIONS // masters] * masters, (masters, slots)
