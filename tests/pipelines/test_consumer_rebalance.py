"""A commit refused after a rebalance, with several batches in flight: nothing lost, nothing doubled."""

from __future__ import annotations

import logging

from kafka.errors import CommitFailedError

from pipelines import kafka_io
from pipelines.consumer import StreamConsumer
from pipelines.state import OnlineState
from tests.pipelines.conftest import lake_counts, produce, tagged_events, wait_until


def test_a_refused_commit_drops_every_batch_in_flight_and_they_are_consumed_again(settings, redis_client, caplog):
    settings = settings.model_copy(update={"consumer_max_records": 100, "consumer_inflight_batches": 2})
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
    assert OnlineState(redis_client).dlq_reasons().get("duplicate", 0) == 0  # the replay is not taken for duplicates
