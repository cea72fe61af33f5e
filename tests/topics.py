"""Reading a topic back in tests: from its beginning, without a consumer group, until the test has what it needs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord


def topic_records(settings, topic: str, timeout: float = 30.0) -> Iterator[ConsumerRecord]:
    """Every record of ``topic`` from the start of each partition, until the caller stops iterating or ``timeout``
    seconds have passed (then the iteration just ends: the caller's assertion says what was missing).

    The partitions are assigned, not joined as a group: a group join takes seconds on tansu, and a read that
    ends after a few idle seconds (``consumer_timeout_ms``) could end before the join did on a busy machine.
    """
    consumer = KafkaConsumer(**settings.kafka_client_kwargs(), enable_auto_commit=False,
                             max_partition_fetch_bytes=16 * 1024 * 1024)
    deadline = time.monotonic() + timeout
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        parts = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        if not parts:
            return
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                yield from records
    finally:
        consumer.close()


def impressions_in(settings, request_ids: set[str], timeout: float = 30.0) -> dict[str, dict]:
    """The impressions of ``request_ids`` in the events topic, by request id (reading stops once all arrived)."""
    found: dict[str, dict] = {}
    for r in topic_records(settings, settings.kafka_topic_events, timeout):
        try:
            ev = json.loads(r.value)
        except (TypeError, ValueError, RecursionError):  # other tests' hostile records
            continue
        if isinstance(ev, dict) and ev.get("event_type") == "impression" and ev.get("request_id") in request_ids:
            found[ev["request_id"]] = ev
            if request_ids <= found.keys():
                break
    return found
