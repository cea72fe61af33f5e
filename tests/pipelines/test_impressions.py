"""Impressions leave in batches from a background thread and none is lost when the service stops."""

from __future__ import annotations

import uuid

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
