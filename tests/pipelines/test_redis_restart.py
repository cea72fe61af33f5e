"""The consumer rides out a Redis restart: it retries with backoff, commits nothing meanwhile, then catches up."""

from __future__ import annotations

import signal

import pytest
import redis

from pipelines import kafka_io, localstack
from pipelines.state import OnlineState, connect
from tests.pipelines.conftest import lake_counts, produce, start_consumer, tagged_events, wait_until

pytestmark = pytest.mark.slow


def test_redis_restart_mid_stream_loses_nothing(settings, tmp_path, monkeypatch):
    port = localstack.free_port()
    monkeypatch.setenv("SHOPREC_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    kafka_io.ensure_topics(settings)
    log = tmp_path / "consumer.log"
    first, second = tagged_events(800), tagged_events(800)
    data = tmp_path / "redis"
    data.mkdir()
    with localstack.running(localstack.redis_command(port, data, persist=True), port):  # as `make up` runs it
        proc = start_consumer(log)
        produce(settings, first)
        wait_until(lambda: len(lake_counts(settings, [e["event_id"] for e in first])) == len(first), timeout=90,
                   what="the first wave in the lake")
    try:
        # Redis is down: the second wave must wait, not be committed past nor dropped
        produce(settings, second)
        wait_until(lambda: "Retrying" in log.read_text(), timeout=30, what="the consumer to retry Redis")
        assert proc.poll() is None, f"the consumer died while Redis was down: see {log}"
        assert not lake_counts(settings, [e["event_id"] for e in second])
        with localstack.running(localstack.redis_command(port, data, persist=True), port):
            state = OnlineState(connect(f"redis://127.0.0.1:{port}/0"))
            # what the first wave wrote is still there (a restart used to wipe every A/B counter and purchase)
            def first_wave_kept():
                try:
                    return all(state.recent_items(u) for u in {e["user_id"] for e in first})
                except redis.BusyLoadingError:  # still reading its append-only file
                    return False

            wait_until(first_wave_kept, timeout=30, what="the first wave's state after the restart")
            ids = [e["event_id"] for e in second]
            wait_until(lambda: len(lake_counts(settings, ids)) == len(ids), timeout=60,
                       what="the second wave in the lake after Redis came back")
            users = {e["user_id"] for e in second}
            wait_until(lambda: all(state.recent_items(u) for u in users), timeout=10,
                       what="the second wave in the online state")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    counts = lake_counts(settings, [e["event_id"] for e in first + second])
    assert len(counts) == len(first) + len(second) and set(counts.values()) == {1}
