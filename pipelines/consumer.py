"""The stream consumer: Kafka ``shop.events`` → validation → lake + Redis, invalid → DLQ.

Per poll batch: validate every record; send rejects to ``shop.events.dlq`` with
a reason header; append valid events to the Parquet lake (durable rename);
fold them into the online state in Redis; wait for the DLQ acks; then commit
the offsets. A crash anywhere before the commit replays the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import redis
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from pipelines import kafka_io, lake
from pipelines.schemas import EventError, TOPIC_EVENTS, parse_event
from pipelines.settings import Settings
from pipelines.state import OnlineState

log = logging.getLogger(__name__)

JOIN_WAIT_MS = 15_000


@dataclass
class ConsumerStats:
    consumed: int = 0
    stored: int = 0
    rejected: Counter = field(default_factory=Counter)
    batches: int = 0
    last_commit_ts: float = 0.0


class StreamConsumer:
    """One member of the ``shop.events`` consumer group."""

    def __init__(self, settings: Settings, state: OnlineState, *, group: str | None = None,
                 log_every_s: float = 10.0):
        self.settings = settings
        self.state = state
        self.consumer = kafka_io.make_consumer(settings, (TOPIC_EVENTS,), group=group)
        self.producer = kafka_io.make_producer(settings)
        self.stats = ConsumerStats()
        self.log_every_s = log_every_s
        self._last_log = time.monotonic()
        self._last_logged_count = 0
        self._last_trending = 0.0

    def process_batch(self, timeout_ms: int | None = None) -> int:
        """Poll once and handle what came; returns the number of records handled."""
        timeout_ms = timeout_ms or self.settings.consumer_poll_ms
        if not self.consumer.assignment():
            # kafka-python 3.0.12 drops a JoinGroup that completes between two polls and sends a new
            # one; tansu answers a join after ~3 s, so short polls can rejoin forever. Wait it out.
            timeout_ms = max(timeout_ms, JOIN_WAIT_MS)
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.consumer_max_records)
        records = [r for batch in polled.values() for r in batch]
        if not records:
            self._maybe_log()
            return 0
        valid, seen, rejected = [], set(), Counter()
        for rec in records:
            try:
                ev = parse_event(rec.value, max_bytes=self.settings.max_event_bytes,
                                 max_age_days=self.settings.max_event_age_days,
                                 max_future_s=self.settings.max_event_future_s)
                if ev.event_id in seen:
                    raise EventError("duplicate", f"event_id {ev.event_id} was already seen in this batch")
            except EventError as err:
                rejected[err.reason] += 1
                kafka_io.send_dlq(self.producer, rec.value, err.reason, err.message, rec.key)
                continue
            seen.add(ev.event_id)
            valid.append(ev)
        if valid:
            lake.write_events(self.settings.lake_dir, [e.model_dump() for e in valid])
            self._redis(self.state.apply_events, valid)
        if rejected:
            self.producer.flush()
            self._redis(self.state.count_dlq, dict(rejected))
            log.warning("rejected %d records: %s", sum(rejected.values()), dict(rejected))
        self.consumer.commit()
        self.stats.consumed += len(records)
        self.stats.stored += len(valid)
        self.stats.rejected.update(rejected)
        self.stats.batches += 1
        self.stats.last_commit_ts = time.time()
        self._maybe_log()
        return len(records)

    @staticmethod
    @retry(retry=retry_if_exception_type(redis.ConnectionError | redis.TimeoutError),
           wait=wait_exponential(multiplier=0.2, max=5), stop=stop_after_delay(600),
           before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)
    def _redis(fn, *args):
        return fn(*args)

    def lag(self) -> int:
        """Records behind the partition ends (from ``highwater``, which is exact on tansu)."""
        total = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            pos = self.consumer.position(tp)
            if hw is not None and pos is not None:
                total += max(0, hw - pos)
        return total

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_trending > 2.0:
            self._last_trending = now
            try:
                self.state.refresh_trending()
            except redis.RedisError as err:
                log.warning("trending refresh skipped: %s", err)
        if now - self._last_log < self.log_every_s:
            return
        rate = (self.stats.consumed - self._last_logged_count) / (now - self._last_log)
        lag = self.lag()
        log.info("consumed=%d stored=%d rejected=%d rate=%.0f ev/s lag=%d", self.stats.consumed, self.stats.stored,
                 sum(self.stats.rejected.values()), rate, lag)
        try:
            self.state.set_consumer_status(lag=lag, rate_eps=round(rate, 1), consumed=self.stats.consumed,
                                           last_commit_ts=self.stats.last_commit_ts, updated_ts=time.time())
        except redis.RedisError as err:
            log.warning("consumer status not written: %s", err)
        self._last_log, self._last_logged_count = now, self.stats.consumed

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until ``stop`` is set (or no record came for ``idle_exit_s``)."""
        stop = stop or threading.Event()
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                if self.process_batch():
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            self.producer.flush(timeout=5)
        finally:
            self.producer.close(timeout=5)
            self.consumer.close()
