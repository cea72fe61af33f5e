"""`shoprec dlq`: the newest refused records, with their reason, error and original bytes, filtered by reason."""

from __future__ import annotations

import uuid

import pytest

from pipelines import kafka_io
from pipelines.dlq import format_records, read_dlq
from pipelines.settings import get_settings


@pytest.fixture()
def dlq_settings(settings, monkeypatch):
    """The session broker with a DLQ topic of this test's own (the default one collects every test's rejects)."""
    monkeypatch.setenv("SHOPREC_KAFKA_TOPIC_DLQ", f"dlq-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    s = get_settings()
    kafka_io.ensure_topics(s)
    return s


def quarantine(s, records) -> None:
    producer = kafka_io.make_producer(s)
    try:
        for raw, reason, error in records:
            kafka_io.send_dlq(producer, raw, reason, error, key=b"u1", topic=s.kafka_topic_dlq,
                              source_topic=s.kafka_topic_events).get(timeout=30)
    finally:
        producer.close()


def test_the_newest_refused_records_with_reason_error_and_original_bytes(dlq_settings):
    s = dlq_settings
    assert read_dlq(s) == []  # nothing refused yet: an empty answer, not an error
    quarantine(s, [(b'{"event_type": "view", "ts": 1700000000}', "ts_too_old", "ts looks like epoch seconds"),
                   (b"\xff\xfe not utf-8", "undecodable", "not UTF-8"),
                   (b'{"event_id": "e1"}', "duplicate", "event_id e1 was stored before"),
                   (b"x" * 5000, "oversized", "5000 bytes")])

    newest = read_dlq(s, last=3)
    assert [d.reason for d in newest] == ["undecodable", "duplicate", "oversized"]  # oldest first, the first left out
    assert newest[0].value == "\\xff\\xfe not utf-8" and newest[0].key == "u1"  # bytes that are not text, escaped
    assert newest[0].source_topic == s.kafka_topic_events and newest[0].error == "not UTF-8"
    assert newest[2].value_bytes == 5000 and newest[2].value.endswith("… (5,000 bytes)")

    old = read_dlq(s, reason="ts_too_old")
    assert len(old) == 1 and old[0].value == '{"event_type": "view", "ts": 1700000000}'
    assert read_dlq(s, reason="no_such_reason") == []

    text = format_records(read_dlq(s, last=2))
    assert "duplicate  from " + s.kafka_topic_events in text and "error: event_id e1 was stored before" in text
    assert text.index("duplicate") < text.index("oversized")


def test_no_broker_is_said_with_what_to_do(settings, monkeypatch):
    from pipelines import localstack

    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{localstack.free_port()}")
    get_settings.cache_clear()
    with pytest.raises(ConnectionError, match="no Kafka broker answers at 127.0.0.1:.*make up"):
        read_dlq(get_settings(), timeout_s=5)


def test_shoprec_dlq_prints_them_and_filters_by_reason(dlq_settings):
    import json

    from typer.testing import CliRunner

    from pipelines.cli import app

    s = dlq_settings
    empty = CliRunner().invoke(app, ["dlq"])
    assert empty.exit_code == 0 and f"no refused records in {s.kafka_topic_dlq}" in empty.output
    quarantine(s, [(b'{"ts": "2026-01-01"}', "invalid_type", "ts: send epoch milliseconds"),
                   (b'{"event_id": "e1"}', "duplicate", "event_id e1 was stored before")])
    shown = CliRunner().invoke(app, ["dlq", "--reason", "invalid_type"])
    assert shown.exit_code == 0 and "invalid_type  from" in shown.output and "duplicate" not in shown.output
    assert 'value: {"ts": "2026-01-01"}' in shown.output and "error: ts: send epoch milliseconds" in shown.output
    lines = CliRunner().invoke(app, ["dlq", "--json", "--last", "5"]).output.splitlines()
    assert [json.loads(line)["reason"] for line in lines] == ["invalid_type", "duplicate"]
