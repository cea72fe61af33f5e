"""The HTTP ingestion paths: validate a batch like its consumer does, then send it to Kafka.

The service's ``/events`` calls :meth:`EventIngestor.ingest` (to the events topic) and
``/catalog`` :meth:`EventIngestor.ingest_products` (to the catalog topic, applied by the catalog
feed); each answers only once the broker acknowledged every record, so a 202 means they are in Kafka.
"""

from __future__ import annotations

import threading
import time

import orjson

from pydantic import ValidationError

from pipelines import catalog_feed, kafka_io
from pipelines.schemas import CatalogUpdate, Event, EventError, describe_validation_error, validate_event
from pipelines.settings import Settings


class IngestRejected(ValueError):
    """A batch with at least one invalid record; ``errors`` lists each (nothing is sent)."""

    def __init__(self, errors: list[dict], what: str = "event"):
        super().__init__(f"{len(errors)} invalid {what}(s); nothing was accepted")
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


def validate_products(products: list) -> tuple[list[dict], list[dict]]:
    """Validate each product record of a batch (:class:`~pipelines.schemas.CatalogUpdate`: ``item_id``
    and the fields to set, with the catalog's constraints; one record per product).

    Returns:
        ``(valid records without unset fields, errors)``; errors as :func:`validate_batch`'s.
    """
    errors, valid, seen = [], [], {}
    for i, rec in enumerate(products):
        try:
            if not isinstance(rec, dict):
                raise EventError("schema", "a product must be a JSON object")
            size = len(orjson.dumps(rec))
            if size > catalog_feed.MAX_ITEM_BYTES:
                raise EventError("oversized", f"product is {size} bytes as JSON; the limit is {catalog_feed.MAX_ITEM_BYTES}")
            try:
                update = CatalogUpdate.model_validate(rec)
            except ValidationError as err:
                raise EventError(*describe_validation_error(err)) from None
            if update.item_id in seen:
                raise EventError("duplicate", f"item_id {update.item_id} is also product {seen[update.item_id]} of "
                                              "this batch: send one record per product")
        except EventError as err:
            errors.append({"index": i, "reason": err.reason, "message": err.message})
            continue
        except (TypeError, orjson.JSONEncodeError) as err:
            errors.append({"index": i, "reason": "schema", "message": f"product cannot be encoded as JSON: {err}"})
            continue
        seen[update.item_id] = i
        valid.append(update.model_dump(exclude_none=True, exclude={"schema_version"}))
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
        return self._await(kafka_io.send_events(self.producer(), [e.model_dump(exclude_none=True) for e in valid],
                                                self.settings.kafka_topic_events), timeout_s)

    def ingest_products(self, products: list, timeout_s: float = 10.0) -> int:
        """Validate product records and send them to the catalog topic; returns the count once acknowledged.

        Raises:
            IngestRejected: when any record is invalid (nothing is sent).
            kafka.errors.KafkaError: when the broker did not acknowledge in time.
        """
        valid, errors = validate_products(products)
        if errors:
            raise IngestRejected(errors, "product")
        return self._await(catalog_feed.publish_items(self.producer(), valid, self.settings.kafka_topic_catalog),
                           timeout_s)

    @staticmethod
    def _await(futures: list, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        for f in futures:
            f.get(timeout=max(0.1, deadline - time.monotonic()))
        return len(futures)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=2)
