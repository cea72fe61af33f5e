"""Impressions leave in batches from librdkafka's threads, next to the user's clicks, and none is lost when the service stops."""

from __future__ import annotations

import uuid

import orjson

from pipelines import kafka_io
from pipelines.serving import ImpressionLog
from pipelines.settings import Settings
from tests.bentos.test_service import _consume_impressions


def test_impressions_logged_just_before_close_still_reach_kafka(settings, monkeypatch):
    # a long linger: without the flush on close these would still be waiting in memory
    monkeypatch.setenv("SHOPREC_IMPRESSION_LINGER_MS", "5000")
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", f"impressions-{uuid.uuid4().hex[:8]}")  # a topic of its own
    settings = Settings()
    kafka_io.ensure_topics(settings)
    log = ImpressionLog(settings)
    ids = {uuid.uuid4().hex for _ in range(50)}
    for rid in ids:
        log.log({"event_id": uuid.uuid4().hex, "event_type": "impression", "user_id": "u1", "request_id": rid,
                 "ts": 1_790_000_000_000})
    log.close(timeout=20)
    try:
        assert log.pending() == 0 and log.sent == len(ids)
        assert set(_consume_impressions(settings, ids)) == ids
    finally:
        admin = kafka_io.make_admin(settings)
        try:
            admin.delete_topics([settings.kafka_topic_events])  # its own; the DLQ and catalog topics are shared
        finally:
            admin.close()


def test_a_users_impressions_share_the_partition_of_their_clicks(settings, monkeypatch):
    # the shop's events are produced by kafka-python (murmur2 of the user id); impressions by librdkafka
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", f"impressions-{uuid.uuid4().hex[:8]}")
    settings = Settings()
    kafka_io.ensure_topics(settings)
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
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**settings.kafka_client_kwargs(), enable_auto_commit=False, consumer_timeout_ms=2000)
        consumer.assign([TopicPartition(settings.kafka_topic_events, p) for p in range(settings.kafka_events_partitions)])
        consumer.seek_to_beginning()
        for record in consumer:
            ev = orjson.loads(record.value)
            partitions[ev["event_type"], ev["user_id"]] = record.partition
        consumer.close()
        assert len(partitions) == 2 * len(users)
        assert len({partitions["click", u] for u in users}) > 1  # the users really spread over partitions
        assert all(partitions["impression", u] == partitions["click", u] for u in users)
    finally:
        producer.close(timeout=5)
        admin = kafka_io.make_admin(settings)
        try:
            admin.delete_topics([settings.kafka_topic_events])
        finally:
            admin.close()


def test_an_impression_kafka_refuses_is_counted_and_the_next_ones_still_go(settings, monkeypatch):
    # librdkafka refuses a record over message.max.bytes before queueing it; the request path must not see it
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_EVENTS", f"impressions-{uuid.uuid4().hex[:8]}")
    settings = Settings()
    kafka_io.ensure_topics(settings)
    log = ImpressionLog(settings)
    try:
        log.log({"event_type": "impression", "user_id": "u1", "request_id": "too-big", "pad": "x" * 2_000_000})
        ids = {uuid.uuid4().hex for _ in range(5)}
        for rid in ids:
            log.log({"event_type": "impression", "user_id": "u1", "request_id": rid})
        log.close(timeout=20)
        assert (log.failed, log.sent, log.dropped) == (1, len(ids), 0)
        assert set(_consume_impressions(settings, ids)) == ids
    finally:
        admin = kafka_io.make_admin(settings)
        try:
            admin.delete_topics([settings.kafka_topic_events])
        finally:
            admin.close()
