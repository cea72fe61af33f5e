"""Reading the dead-letter topic back: what was refused, why, and the record as it was sent (``shoprec dlq``).

The consumer and the catalog feed quarantine each record they refuse in ``settings.kafka_topic_dlq`` with
its original bytes, key and headers plus ``reason``, ``error`` and ``source_topic`` headers
(:func:`pipelines.kafka_io.send_dlq`); the dashboard counts them per reason. This reads the newest ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from pipelines.schemas import DLQ_REASON_HEADER
from pipelines.settings import Settings

#: how many of a partition's newest records a filtered read looks through at most
SCAN_MAX = 100_000


@dataclass
class DLQRecord:
    partition: int
    offset: int
    ts_ms: int  # when Kafka took it (the quarantine, not the original event)
    reason: str
    error: str
    source_topic: str | None
    key: str | None
    value: str  # the original record, decoded as UTF-8 where it is (escaped where it is not), cut at ``value_chars``
    value_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _text(raw: bytes | None, limit: int) -> str:
    if raw is None:
        return ""
    text = raw.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[:limit] + f"… ({len(raw):,} bytes)"


def read_dlq(settings: Settings, *, last: int = 20, reason: str | None = None, value_chars: int = 300,
             timeout_s: float = 15.0) -> list[DLQRecord]:
    """The ``last`` newest records of the DLQ (those with ``reason``, when given), oldest first.

    Partitions are assigned, not joined as a consumer group, so reading commits nothing and moves no one's
    offsets. A filtered read looks through at most :data:`SCAN_MAX` of each partition's newest records.

    Raises:
        ConnectionError: when no broker answers at ``kafka_bootstrap``.
        TimeoutError: when the records did not arrive within ``timeout_s``.
    """
    topic = settings.kafka_topic_dlq
    try:
        consumer = KafkaConsumer(**settings.kafka_client_kwargs(), enable_auto_commit=False,
                                 max_partition_fetch_bytes=16 * 1024 * 1024, bootstrap_timeout_ms=int(timeout_s * 1000))
    except KafkaTimeoutError:  # kafka-python: "Unable to bootstrap from [...]"
        raise ConnectionError(f"no Kafka broker answers at {settings.kafka_bootstrap}: start the stack (`make up`) "
                              "or set SHOPREC_KAFKA_BOOTSTRAP to your cluster") from None
    deadline = time.monotonic() + timeout_s
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:  # no such topic: nothing was ever refused (or the shop uses another topic name)
            return []
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        window = last if reason is None else SCAN_MAX
        for tp in parts:
            consumer.seek(tp, max(begin[tp], end[tp] - window))
        todo = {tp for tp in parts if consumer.position(tp) < end[tp]}
        found: list[DLQRecord] = []
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the DLQ topic {topic!r} did not deliver its records within {timeout_s:g} s: "
                                   "is the broker busy? try again, or with a larger --timeout")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.offset >= end[tp]:
                        continue
                    headers = {k: v for k, v in (r.headers or ())}
                    why = headers.get(DLQ_REASON_HEADER, b"").decode("utf-8", "replace")
                    if reason is not None and why != reason:
                        continue
                    source = headers.get("source_topic")
                    found.append(DLQRecord(tp.partition, r.offset, r.timestamp, why,
                                           headers.get("error", b"").decode("utf-8", "replace"),
                                           source.decode("utf-8", "replace") if source is not None else None,
                                           _text(r.key, 200) if r.key is not None else None,
                                           _text(r.value, value_chars), len(r.value or b"")))
                if consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
        found.sort(key=lambda d: (d.ts_ms, d.partition, d.offset))
        return found[-last:] if last else []
    finally:
        consumer.close()


def format_records(records: list[DLQRecord]) -> str:
    """For people: one block per record, oldest first."""
    from datetime import datetime, timezone

    blocks = []
    for d in records:
        when = datetime.fromtimestamp(d.ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        head = f"{when}  {d.reason or '(no reason)'}  from {d.source_topic or '?'}  (partition {d.partition}, offset {d.offset})"
        lines = [head, f"  error: {d.error}" if d.error else "  error: (none given)"]
        if d.key is not None:
            lines.append(f"  key:   {d.key}")
        lines.append(f"  value: {d.value}" if d.value_bytes else "  value: (empty)")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
