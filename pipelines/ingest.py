"""The HTTP ingestion paths: validate a batch like its consumer does, then send it to Kafka.

The service's ``/events`` calls :meth:`EventIngestor.ingest` (to the events topic) and
``/catalog`` :meth:`EventIngestor.ingest_products` (to the catalog topic, applied by the catalog
feed); each answers only once the broker acknowledged every record, so a 202 means they are in Kafka.
"""

from __future__ import annotations

import threading
import time

import orjson
from kafka.errors import KafkaTimeoutError

from pipelines import catalog_feed, kafka_io
from pipelines.schemas import Event, EventError, validate_catalog_update, validate_event
from pipelines.settings import Settings


class IngestRejected(ValueError):
    """A batch with at least one invalid record; ``errors`` lists each (nothing is sent)."""

    def __init__(self, errors: list[dict], what: str = "event"):
        super().__init__(f"{len(errors)} invalid {what}(s); nothing was accepted")
        self.errors = errors


def _validate_each(records: list, check, what: str, max_bytes: int) -> tuple[list, list[dict]]:
    """``check(record) -> (id, valid)`` over a batch, with the size limit and a duplicate check on ``id``.

    Returns:
        ``(valid, errors)``; each error is ``{"index", "reason", "message"}`` with the consumer's reason codes.
    """
    errors, valid, seen = [], [], {}
    for i, rec in enumerate(records):
        try:
            size = len(orjson.dumps(rec))
            if size > max_bytes:
                raise EventError("oversized", f"{what} is {size} bytes as JSON; the limit is {max_bytes}")
            key, ok = check(rec)
            if key in seen:
                raise EventError("duplicate", f"{key} is also {what} {seen[key]} of this batch")
        except EventError as err:
            errors.append({"index": i, "reason": err.reason, "message": err.message})
            continue
        except (TypeError, orjson.JSONEncodeError) as err:  # e.g. nesting deeper than JSON allows
            errors.append({"index": i, "reason": "schema", "message": f"{what} cannot be encoded as JSON: {err}"})
            continue
        seen[key] = i
        valid.append(ok)
    return valid, errors


def validate_batch(events: list, settings: Settings) -> tuple[list[Event], list[dict]]:
    """Validate each event of a batch with the consumer's rules (size, schema, ts window, duplicate event_id).

    Returns:
        ``(valid, errors)`` as :func:`_validate_each`'s.
    """
    now_ms = int(time.time() * 1000)

    def check(ev):
        event = validate_event(ev, now_ms=now_ms, max_age_days=settings.max_event_age_days,
                               max_future_s=settings.max_event_future_s)
        return f"event_id {event.event_id}", event

    return _validate_each(events, check, "event", settings.max_event_bytes)


def validate_products(products: list) -> tuple[list[dict], list[dict]]:
    """Validate each product record of a batch (:class:`~pipelines.schemas.CatalogUpdate`: ``item_id``
    and the fields to set, with the catalog's constraints; one record per product).

    Returns:
        ``(valid records without unset fields, errors)``; errors as :func:`validate_batch`'s.
    """
    def check(rec):
        update = validate_catalog_update(rec)
        return f"item_id {update.item_id}", update.model_dump(exclude_none=True, exclude={"schema_version"})

    return _validate_each(products, check, "product", catalog_feed.MAX_ITEM_BYTES)


class EventIngestor:
    """Validates batches from ``/events`` and produces them to ``shop.events``.

    The acks are awaited until ``settings.ingest_ack_wait_s`` after the request began, and each other wait on
    Kafka (the producer's first connection, a topic's partitions) is bounded by it too: all under the API's
    request timeout, so a broker that is down costs the client that long and a 503 that says nothing was
    accepted, not BentoML's 504 at the request timeout, which said neither (the acks were awaited 10 s, the
    first connection 30 s and a topic's partitions 60 s, kafka-python's defaults). A record not acknowledged
    by then is given up by the producer too (``delivery_timeout_ms``) rather than retried behind the client's
    back; one the broker wrote but whose ack was lost arrives twice after the client's retry, which is harmless
    (the consumer drops a repeated event_id; a product record sets the same fields again).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._producer = None
        self._lock = threading.Lock()

    def producer(self, deadline: float | None = None):
        """The producer, made on first use; ``deadline`` (``time.monotonic()``) bounds the wait for another
        request that is making it."""
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):
            raise KafkaTimeoutError("another request is still connecting to Kafka")
        try:
            if self._producer is None:
                wait_ms = int(self.settings.ingest_ack_wait_s * 1000)
                linger_ms = 5
                self._producer = kafka_io.make_producer(
                    self.settings, linger_ms=linger_ms, max_block_ms=wait_ms, bootstrap_timeout_ms=wait_ms,
                    request_timeout_ms=max(1, wait_ms - linger_ms), delivery_timeout_ms=wait_ms)
            return self._producer
        finally:
            self._lock.release()

    def ingest(self, events: list, timeout_s: float | None = None) -> int:
        """Validate a batch and send it to Kafka; returns the count once the broker acknowledged all.

        ``timeout_s`` (default: ``settings.ingest_ack_wait_s``) bounds the whole wait on Kafka.

        Raises:
            IngestRejected: when any event is invalid (nothing is sent).
            kafka.errors.KafkaError: when the broker did not acknowledge in time.
        """
        deadline = time.monotonic() + (timeout_s or self.settings.ingest_ack_wait_s)
        valid, errors = validate_batch(events, self.settings)
        if errors:
            raise IngestRejected(errors)
        return self._await(kafka_io.send_events(self.producer(deadline), [e.model_dump(exclude_none=True) for e in valid],
                                                self.settings.kafka_topic_events), deadline)

    def ingest_products(self, products: list, timeout_s: float | None = None) -> int:
        """Validate product records and send them to the catalog topic; returns the count once acknowledged.

        ``timeout_s`` as :meth:`ingest`'s.

        Raises:
            IngestRejected: when any record is invalid (nothing is sent).
            kafka.errors.KafkaError: when the broker did not acknowledge in time.
        """
        deadline = time.monotonic() + (timeout_s or self.settings.ingest_ack_wait_s)
        valid, errors = validate_products(products)
        if errors:
            raise IngestRejected(errors, "product")
        return self._await(catalog_feed.publish_items(self.producer(deadline), valid,
                                                      self.settings.kafka_topic_catalog), deadline)

    @staticmethod
    def _await(futures: list, deadline: float) -> int:
        for f in futures:
            f.get(timeout=max(0.01, deadline - time.monotonic()))
        return len(futures)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=2)
