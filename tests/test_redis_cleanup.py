"""The suite's clean-up removes what its run made in a shared database, and nothing else."""

from __future__ import annotations

import uuid

import redis

from .redis_cleanup import BINDING_DEADLINES, UNACKED, UNACKED_INDEX, forget_run


def test_forget_run_removes_the_runs_keys_and_table_entries_only(redis_client: redis.Redis) -> None:
    marker, other = f"pst-{uuid.uuid4().hex[:10]}", f"pst-{uuid.uuid4().hex[:10]}"
    # Shared tables of exchanges that carry neither marker, as celery.pidbox's does not.
    mixed, only_ours = f"cleanup-{uuid.uuid4().hex[:8]}", f"cleanup-{uuid.uuid4().hex[:8]}"
    sep = "\x06\x16"
    r = redis_client
    r.set(f"{marker}:seq", 1)
    r.rpush(marker, "a task message")
    r.set(f"{other}:seq", 1)
    r.sadd(f"_kombu.binding.{mixed}", f"{sep}{sep}{marker}-a1b2@host.{mixed}", f"{sep}{sep}{other}-c3@host.{mixed}")
    r.sadd(f"_kombu.binding.{only_ours}", f"{sep}{sep}{marker}-d4@host.{only_ours}")
    r.sadd(f"_kombu.binding_permanent.{mixed}", f"{sep}{sep}{marker}", f"{sep}{sep}{other}")
    # A deadline whose table is missing but was never ours stays: kombu sweeps it.
    foreign = f"cleanup-{uuid.uuid4().hex[:8]}"
    r.zadd(BINDING_DEADLINES, {mixed: 1, only_ours: 1, foreign: 1})
    r.hset(UNACKED, mapping={f"tag-{marker}": f'[{{"queue": "{marker}"}}]', f"tag-{other}": f'[{{"q": "{other}"}}]'})
    r.zadd(UNACKED_INDEX, {f"tag-{marker}": 1, f"tag-{other}": 1})
    try:
        forget_run(r, marker)

        assert r.exists(f"{marker}:seq", marker) == 0
        assert r.get(f"{other}:seq") == "1"
        assert r.smembers(f"_kombu.binding.{mixed}") == {f"{sep}{sep}{other}-c3@host.{mixed}"}
        assert not r.exists(f"_kombu.binding.{only_ours}")
        assert r.smembers(f"_kombu.binding_permanent.{mixed}") == {f"{sep}{sep}{other}"}
        deadlines = r.zrange(BINDING_DEADLINES, 0, -1)
        assert mixed in deadlines and foreign in deadlines and only_ours not in deadlines
        assert r.hkeys(UNACKED).count(f"tag-{marker}") == 0 and f"tag-{other}" in r.hkeys(UNACKED)
        assert r.zscore(UNACKED_INDEX, f"tag-{marker}") is None
        assert r.zscore(UNACKED_INDEX, f"tag-{other}") == 1
    finally:
        forget_run(r, other)
        r.delete(f"_kombu.binding.{mixed}", f"_kombu.binding_permanent.{mixed}")
        r.zrem(BINDING_DEADLINES, mixed, only_ours, foreign)
