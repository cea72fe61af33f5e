"""The ``/events`` ingestion path: validate a batch like the stream consumer does, then send it to Kafka.

The HTTP service calls :meth:`EventIngestor.ingest`; it answers only once the
broker acknowledged every event, so a 202 means the events are in Kafka.
"""

from __future__ import annotations

import threading
import time

import orjson

from pipelines import kafka_io
from pipelines.schemas import Event, EventError, validate_event
from pipelines.settings import Settings


class IngestRejected(ValueError):
    """A batch of events with at least one invalid event; ``errors`` lists each (nothing is sent)."""

    def __init__(self, errors: list[dict]):
        super().__init__(f"{len(errors)} invalid event(s); nothing was accepted")
        self.errors = errors


def validate_batch(events: list, settings: Settings) -> tuple[list[Event], list[dict]]:
    """Validate each event of a batch with the consumer's rules (size, schema, ts window, duplicates).

    Returns:
        ``(valid, errors)``; each error is ``{"index", "reason", "message"}`` with the consumer's reason codes.
    """
    errors, valid, seen = [], [], {}
    now_ms = int(time.time() * 1000)
    for i, ev in enumerate(events):
        try:
            size = len(orjson.dumps(ev))
            if size > settings.max_event_bytes:
                raise EventError("oversized", f"event is {size} bytes as JSON; the limit is {settings.max_event_bytes}")
            event = validate_event(ev, now_ms=now_ms, max_age_days=settings.max_event_age_days,
                                   max_future_s=settings.max_event_future_s)
            if event.event_id in seen:
                raise EventError("duplicate", f"event_id {event.event_id} is also event {seen[event.event_id]} "
                                              "of this batch")
        except EventError as err:
            errors.append({"index": i, "reason": err.reason, "message": err.message})
            continue
        except (TypeError, orjson.JSONEncodeError) as err:  # e.g. nesting deeper than JSON allows
            errors.append({"index": i, "reason": "schema", "message": f"event cannot be encoded as JSON: {err}"})
            continue
        seen[event.event_id] = i
        valid.append(event)
    return valid, errors


class EventIngestor:
    """Validates batches from ``/events`` and produces them to ``shop.events``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._producer = None
        self._lock = threading.Lock()

    def producer(self):
        with self._lock:
            if self._producer is None:
                self._producer = kafka_io.make_producer(self.settings)
            return self._producer

    def ingest(self, events: list, timeout_s: float = 10.0) -> int:
        """Validate a batch and send it to Kafka; returns the count once the broker acknowledged all.

        Raises:
            IngestRejected: when any event is invalid (nothing is sent).
            kafka.errors.KafkaError: when the broker did not acknowledge in time.
        """
        valid, errors = validate_batch(events, self.settings)
        if errors:
            raise IngestRejected(errors)
        futures = kafka_io.send_events(self.producer(), [e.model_dump(exclude_none=True) for e in valid],
                                       self.settings.kafka_topic_events)
        deadline = time.monotonic() + timeout_s
        for f in futures:
            f.get(timeout=max(0.1, deadline - time.monotonic()))
        return len(valid)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=2)
