"""The in-process list cache serves only what Redis has not changed since, and turns itself off without Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from pipelines import localstack
from pipelines.localcache import TrackedCache
from pipelines.schemas import RedisKeys
from pipelines.state import AsyncServingState, connect
from tests.pipelines.conftest import wait_until


@pytest.fixture()
def tracked(redis_url, redis_client):  # redis_client first: its FLUSHDB must not race the test
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    cache = TrackedCache(redis_url, prefix, max_entries=3, ttl_s=60)
    assert cache.wait_active(10), "the invalidation connection did not come up"
    yield cache, prefix
    cache.close()


def _read(cache: TrackedCache, r, key: str, field: str) -> str | None:
    """What serving does: the local copy, else Redis (kept locally if nothing changed meanwhile)."""
    value = cache.get(key, field)
    if value is None:
        token = cache.token()
        value = r.hget(key, field)
        if value is not None:
            cache.put(key, field, value, token)
    return value


def _changed(cache: TrackedCache, write) -> None:
    """Change Redis and wait until the invalidation arrived (a read racing its own invalidation is not kept)."""
    seen = cache.invalidations
    write()
    wait_until(lambda: cache.invalidations > seen, timeout=5, what="the invalidation")


def test_a_change_in_redis_drops_the_local_copy(tracked, redis_client):
    cache, prefix = tracked
    key = prefix + "u1"
    _changed(cache, lambda: redis_client.hset(key, "champion", "v1"))
    assert _read(cache, redis_client, key, "champion") == "v1"
    assert cache.get(key, "champion") == "v1"  # now served without Redis

    redis_client.hset(key, "champion", "v2")  # e.g. another API process stored a new list
    wait_until(lambda: cache.get(key, "champion") is None, timeout=5, what="the copy to be invalidated")
    assert _read(cache, redis_client, key, "champion") == "v2"
    assert cache.get(key, "champion") == "v2"

    redis_client.delete(key)  # what the consumer does after the user's next event
    wait_until(lambda: cache.get(key, "champion") is None, timeout=5, what="the copy to be invalidated")
    assert _read(cache, redis_client, key, "champion") is None

    redis_client.hset(key, "champion", "v3")
    redis_client.pexpire(key, 100)  # the Redis TTL ends the copy too
    assert _read(cache, redis_client, key, "champion") in ("v3", None)
    wait_until(lambda: cache.get(key, "champion") is None and not redis_client.exists(key), timeout=5,
               what="the expiry to reach the copy")


def test_a_read_begun_before_a_change_is_not_kept(tracked, redis_client):
    cache, prefix = tracked
    key = prefix + "u2"
    _changed(cache, lambda: redis_client.hset(key, "champion", "old"))
    token = cache.token()
    stale = redis_client.hget(key, "champion")  # read, then the key changes before the answer is stored
    seen = cache.invalidations
    redis_client.hset(key, "champion", "new")
    wait_until(lambda: cache.invalidations > seen, timeout=5, what="the invalidation")
    assert not cache.put(key, "champion", stale, token)
    assert cache.get(key, "champion") is None
    assert _read(cache, redis_client, key, "champion") == "new"
    assert cache.get(key, "champion") == "new"


def test_the_copy_is_bounded(tracked, redis_client):
    cache, prefix = tracked
    for i in range(5):
        _changed(cache, lambda: redis_client.hset(prefix + f"b{i}", "champion", str(i)))
        _read(cache, redis_client, prefix + f"b{i}", "champion")
    assert len(cache) == 3
    assert cache.get(prefix + "b0", "champion") is None and cache.get(prefix + "b4", "champion") == "4"


def test_no_copy_is_used_while_redis_is_away(tmp_path):
    port = localstack.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    (tmp_path / "redis").mkdir()
    key = RedisKeys.cache("away")
    cache = TrackedCache(url, RedisKeys.cache(""))
    try:
        with localstack.running(localstack.redis_command(port, tmp_path / "redis"), port):
            assert cache.wait_active(10)
            r = connect(url)
            _changed(cache, lambda: r.hset(key, "champion", "before"))
            assert _read(cache, r, key, "champion") == "before" and cache.get(key, "champion") == "before"
        # Redis is gone: nothing may be answered from a copy that nobody invalidates any more
        wait_until(lambda: not cache.active, timeout=10, what="the copy to be switched off")
        assert cache.get(key, "champion") is None
        with localstack.running(localstack.redis_command(port, tmp_path / "redis"), port):
            wait_until(lambda: cache.active, timeout=20, what="the copy to come back with Redis")
            assert len(cache) == 0  # whatever changed meanwhile, the old copy is gone
            r = connect(url)
            _changed(cache, lambda: r.hset(key, "champion", "after"))
            assert _read(cache, r, key, "champion") == "after"
    finally:
        cache.close()


def test_serving_reads_go_local_and_see_the_consumers_invalidation(redis_url, redis_client):
    async def scenario():
        state = AsyncServingState(redis_url, local_entries=100)
        try:
            assert state.local.wait_active(10)
            _changed(state.local, lambda: redis_client.hset(RedisKeys.cache("shopper"), "champion",
                                                            b'{"items": ["a"], "model_version": "1"}'))
            assert (await state.get_cached("shopper", "champion"))["items"] == ["a"]
            assert len(state.local) == 1
            redis_reads = []
            real_hget = state.r.hget
            state.r.hget = lambda *a: redis_reads.append(a) or real_hget(*a)
            assert (await state.get_cached("shopper", "champion"))["items"] == ["a"]
            assert redis_reads == []  # answered from the local copy
            redis_client.delete(RedisKeys.cache("shopper"))
            for _ in range(100):
                if state.local.get(RedisKeys.cache("shopper"), "champion") is None:
                    break
                await asyncio.sleep(0.05)
            assert state.local.get(RedisKeys.cache("shopper"), "champion") is None
            assert await state.get_cached("shopper", "champion") is None
            assert len(redis_reads) == 1
        finally:
            state.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("which", ["tracking", "pubsub"])
def test_losing_either_connection_empties_the_copy_until_tracking_is_back(tracked, redis_client, which):
    """e.g. an operator's CLIENT KILL: redis-py must not quietly reconnect a connection Redis no longer tracks for."""
    cache, prefix = tracked
    key = prefix + "k"
    _changed(cache, lambda: redis_client.hset(key, "champion", "v1"))
    assert _read(cache, redis_client, key, "champion") == "v1" and cache.get(key, "champion") == "v1"
    flag = "t" if which == "tracking" else "P"
    victims = [c["id"] for c in redis_client.client_list() if flag in c["flags"]]
    assert victims, f"no {which} connection found"
    for cid in victims:
        redis_client.client_kill_filter(_id=cid)
    wait_until(lambda: cache.get(key, "champion") is None, timeout=5, what="the copy to be dropped")
    wait_until(lambda: cache.active, timeout=10, what="tracking to be re-established")
    _changed(cache, lambda: redis_client.hset(key, "champion", "v2"))  # invalidations flow again
    assert _read(cache, redis_client, key, "champion") == "v2" and cache.get(key, "champion") == "v2"
