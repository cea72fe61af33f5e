"""A commit refused after a rebalance, with several batches in flight: nothing lost, nothing doubled."""

from __future__ import annotations

import logging

import pytest
from kafka.errors import CommitFailedError

from pipelines import kafka_io
from pipelines.consumer import StreamConsumer
from pipelines.state import OnlineState
from tests.pipelines.conftest import lake_counts, produce, tagged_events, wait_until


@pytest.mark.parametrize("flush_rows", [None, 350], ids=["a-group-per-poll", "groups-of-several-polls"])
def test_a_refused_commit_drops_every_batch_in_flight_and_they_are_consumed_again(settings, redis_client, caplog,
                                                                                  flush_rows):
    # with groups of several polls, the refused commit covers several polls and more are in the lake buffer
    settings = settings.model_copy(update={"consumer_max_records": 100, "consumer_inflight_batches": 2,
                                           "consumer_lake_flush_rows": flush_rows})
    kafka_io.ensure_topics(settings)
    events = tagged_events(1200)
    produce(settings, events)
    sc = StreamConsumer(settings, OnlineState(redis_client))
    commit = sc.consumer.commit
    calls = {"n": 0, "refused": 0, "in_flight": 0}

    def commit_refused_once(offsets):
        calls["n"] += 1
        if calls["n"] == 3:  # as after a rebalance: the group moved on while batches were being written
            calls["refused"] += 1
            calls["in_flight"] = len(sc._inflight)
            raise CommitFailedError("the group rebalanced")
        return commit(offsets)

    sc.consumer.commit = commit_refused_once
    wanted = [e["event_id"] for e in events]
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.consumer"):
            wait_until(lambda: sc.process_batch(timeout_ms=200) is not None
                       and len(lake_counts(settings, wanted)) == len(wanted) and not sc._inflight,
                       timeout=120, step=0, what="every event in the lake after the refused commit")
    finally:
        sc.close()
    assert calls["refused"] == 1 and calls["in_flight"] >= 1  # later batches were in flight when it was refused
    assert any("commit refused" in r.getMessage() for r in caplog.records)
    counts = lake_counts(settings, wanted)
    assert set(counts.values()) == {1}, {e: n for e, n in counts.items() if n > 1}


def test_a_batch_that_fails_to_be_written_is_never_committed_past(settings, redis_client):
    """The lake write of the oldest batch fails (a full disk) while later batches are in flight."""
    settings = settings.model_copy(update={"consumer_max_records": 100, "consumer_inflight_batches": 2})
    kafka_io.ensure_topics(settings)
    events = tagged_events(600, users=1)  # one user: one partition, so later batches continue the failed one
    produce(settings, events)
    wanted = [e["event_id"] for e in events]
    wanted_set = set(wanted)
    sc = StreamConsumer(settings, OnlineState(redis_client))
    write = sc._write_lake
    failed = {"n": 0}

    def disk_full_once(polled, *args):
        if not failed["n"] and any(e in wanted_set for t in args[0].values() for e in t["event_id"].to_pylist()):
            failed["n"] += 1
            raise OSError(28, "No space left on device")
        return write(polled, *args)

    sc._write_lake = disk_full_once
    with pytest.raises(OSError):
        try:
            for _ in range(200):
                sc.process_batch(timeout_ms=200)
        finally:
            sc.close()  # commits what is durable, never past the failed batch
    # a restarted consumer of the same group picks up from the last commit: nothing is lost
    again = StreamConsumer(settings, OnlineState(redis_client))
    try:
        wait_until(lambda: again.process_batch(timeout_ms=200) is not None
                   and len(lake_counts(settings, wanted)) == len(wanted), timeout=120, step=0,
                   what="every event in the lake after the restart")
    finally:
        again.close()
    assert set(lake_counts(settings, wanted).values()) == {1}
