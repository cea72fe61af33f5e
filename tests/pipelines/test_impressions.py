"""Impressions leave in batches from librdkafka's threads, next to the user's clicks, and none is lost when the service stops."""

from __future__ import annotations

import uuid

import orjson
import pytest

from pipelines import kafka_io
from pipelines.serving import ImpressionLog
from pipelines.settings import Settings
from tests.topics import impressions_in, topic_records


@pytest.fixture
def own_topic(settings, monkeypatch):
    """Settings whose events topic is this test's own, deleted afterwards (the DLQ and catalog topics are shared)."""
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", f"impressions-{uuid.uuid4().hex[:8]}")
    own = Settings()
    kafka_io.ensure_topics(own)
    yield own
    admin = kafka_io.make_admin(own)
    try:
        admin.delete_topics([own.kafka_topic_events])
    finally:
        admin.close()


def test_impressions_logged_just_before_close_still_reach_kafka(own_topic, monkeypatch):
    # a long linger: without the flush on close these would still be waiting in memory
    monkeypatch.setenv("SHOPREC_IMPRESSION_LINGER_MS", "5000")
    settings = Settings()
    log = ImpressionLog(settings)
    ids = {uuid.uuid4().hex for _ in range(50)}
    for rid in ids:
        log.log({"event_id": uuid.uuid4().hex, "event_type": "impression", "user_id": "u1", "request_id": rid,
                 "ts": 1_790_000_000_000})
    log.close(timeout=20)
    assert log.pending() == 0 and log.sent == len(ids)
    assert set(impressions_in(settings, ids)) == ids


def test_a_users_impressions_share_the_partition_of_their_clicks(own_topic):
    # the shop's events are produced by kafka-python (murmur2 of the user id); impressions by librdkafka
    settings = own_topic
    users = [f"user-{i}" for i in range(40)]
    producer = kafka_io.make_producer(settings)
    log = ImpressionLog(settings)
    try:
        for f in kafka_io.send_events(producer, [{"event_type": "click", "user_id": u} for u in users],
                                      settings.kafka_topic_events):
            f.get(timeout=15)
        for u in users:
            log.log({"event_type": "impression", "user_id": u, "request_id": f"r-{u}"})
        log.close(timeout=20)
        assert log.sent == len(users)
        partitions: dict[tuple[str, str], int] = {}
        for record in topic_records(settings, settings.kafka_topic_events):
            ev = orjson.loads(record.value)
            partitions[ev["event_type"], ev["user_id"]] = record.partition
            if len(partitions) == 2 * len(users):
                break
        assert len(partitions) == 2 * len(users)
        assert len({partitions["click", u] for u in users}) > 1  # the users really spread over partitions
        assert all(partitions["impression", u] == partitions["click", u] for u in users)
    finally:
        producer.close(timeout=5)


def test_an_impression_kafka_refuses_is_counted_and_the_next_ones_still_go(own_topic):
    # librdkafka refuses a record over message.max.bytes before queueing it; the request path must not see it
    log = ImpressionLog(own_topic)
    log.log({"event_type": "impression", "user_id": "u1", "request_id": "too-big", "pad": "x" * 2_000_000})
    ids = {uuid.uuid4().hex for _ in range(5)}
    for rid in ids:
        log.log({"event_type": "impression", "user_id": "u1", "request_id": rid})
    log.close(timeout=20)
    assert (log.failed, log.sent, log.dropped) == (1, len(ids), 0)
    assert set(impressions_in(own_topic, ids)) == ids


def test_a_click_that_reaches_kafka_before_its_impression_counts_in_its_comparison(own_topic, redis_client):
    """The API's impressions leave every SHOPREC_IMPRESSION_LINGER_MS, while /events answers once Kafka has the
    click: a click sent sooner is consumed first. It was dropped from the A/B counts (request_id only) or counted
    under the bare experiment name (with its variant). Real producers, broker and consumer."""
    from pipelines.consumer import StreamConsumer
    from pipelines.schemas import new_event
    from pipelines.state import OnlineState
    from tests.pipelines.conftest import wait_until

    s = own_topic
    name = f"exp-{uuid.uuid4().hex[:6]}"
    tag = f"{name}@champion.1:challenger.2"
    state = OnlineState(redis_client, experiment=name)
    sc = StreamConsumer(s, state)
    producer = kafka_io.make_producer(s)
    shown = {f"r{i}-{uuid.uuid4().hex[:6]}": ("champion" if i % 2 else "challenger", f"u{i}") for i in range(6)}
    clicks = [new_event("click", user, "i1", "s", request_id=rid, **({"variant": variant} if i < 3 else {}))
              for i, (rid, (variant, user)) in enumerate(shown.items())]
    try:
        wait_until(lambda: sc.process_batch(timeout_ms=200) is not None and sc.consumer.assignment(), timeout=60,
                   step=0, what="the consumer to join its group")
        for f in kafka_io.send_events(producer, clicks, s.kafka_topic_events):
            f.get(timeout=15)
        wait_until(lambda: sc.process_batch(timeout_ms=100) is not None
                   and state.ab_attribution_gaps()["waiting"] == len(shown), timeout=30, step=0,
                   what="the clicks consumed, waiting for their impressions")
        assert state.ab_counts(tag) == {} and state.ab_counts(name) == {}  # counted nowhere yet
        impressions = ImpressionLog(s)
        for rid, (variant, user) in shown.items():
            impressions.log(new_event("impression", user, None, "s", items=["i1"], request_id=rid, variant=variant,
                                      experiment=tag, model_version="1" if variant == "champion" else "2"))
        impressions.close(timeout=20)
        wait_until(lambda: sc.process_batch(timeout_ms=100) is not None
                   and state.ab_attribution_gaps()["waiting"] == 0, timeout=30, step=0,
                   what="the impressions consumed")
    finally:
        producer.close(timeout=5)
        sc.close()
    assert state.ab_counts(tag) == {"champion": {"impressions": 3, "clicks": 3},
                                    "challenger": {"impressions": 3, "clicks": 3}}
    assert state.ab_counts(name) == {}  # no phantom comparison under the experiment's bare name
