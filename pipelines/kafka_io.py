"""Kafka clients with shoprec's settings: idempotent topic creation, fast-joining consumers.

Every client gets the connection and SASL/SSL settings from
:meth:`Settings.kafka_client_kwargs`, so one change reaches all of them; the serving API's
impression producer is librdkafka's (:func:`make_impression_producer`, the same settings under
librdkafka's names) because kafka-python builds every record in Python under the GIL that the
API's event loop needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson
import confluent_kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from pipelines.logs import Repeats
from pipelines.schemas import DLQ_REASON_HEADER
from pipelines.settings import Settings

log = logging.getLogger(__name__)
#: librdkafka's own lines (its logs reach Python in poll()): while the broker is down it reports each failed
#: connect, about two a second per API process; one line per kind every 30 s, saying how many were held back
librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")
librdkafka_log.addFilter(Repeats(prefixes=(librdkafka_log.name,)))

# session/heartbeat values that make a group join in ~3 s instead of ~23 s (measured on tansu)
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 60_000}


def ensure_topics(settings: Settings) -> None:
    """Create shoprec's topics (names from settings); a topic that already exists is left as it is."""
    admin = make_admin(settings)
    try:
        wanted = [
            NewTopic(settings.kafka_topic_events, settings.kafka_events_partitions, 1),
            NewTopic(settings.kafka_topic_catalog, 1, 1),
            NewTopic(settings.kafka_topic_dlq, 1, 1),
        ]
        for topic in wanted:
            try:
                admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def make_admin(settings: Settings, **overrides) -> KafkaAdminClient:
    """An admin client (topic creation) with the shared connection and SASL/SSL settings."""
    return KafkaAdminClient(**{"client_id": "shoprec-admin", **settings.kafka_client_kwargs(), **overrides})


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    """A producer for raw bytes; keys are strings (user_id for events)."""
    # max_request_size: a hostile 10 MB record must reach the consumer to be quarantined, not fail here
    kw = dict(acks=1, linger_ms=5, retries=5, key_serializer=_key_bytes, max_request_size=16 * 1024 * 1024)
    kw.update(overrides)
    if kw["acks"] == 1:  # say what acks=1 means anyway (kafka-python turns idempotence off and warns on every producer)
        kw.setdefault("enable_idempotence", False)
    return KafkaProducer(**{**settings.kafka_client_kwargs(), **kw})


def librdkafka_config(settings: Settings) -> dict:
    """:meth:`Settings.kafka_client_kwargs` under librdkafka's names (for :mod:`confluent_kafka` clients)."""
    kw = settings.kafka_client_kwargs()
    conf = {"bootstrap.servers": ",".join(kw["bootstrap_servers"]), "security.protocol": kw["security_protocol"]}
    names = {"sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username",
             "sasl_plain_password": "sasl.password", "ssl_cafile": "ssl.ca.location"}
    conf.update({names[k]: v for k, v in kw.items() if k in names and v is not None})
    return conf


def make_impression_producer(settings: Settings, **overrides) -> confluent_kafka.Producer:
    """A librdkafka producer for the serving API's impressions: a produce call costs ~2 µs of the
    caller's time (kafka-python's ~70-90 µs of Python); batching, retries and the network run in C threads.

    Keys are hashed like kafka-python's (murmur2), so a user's impressions share a partition with
    their clicks; an undeliverable message is retried until ``close`` (no delivery timeout), bounded
    by ``settings.impression_buffer`` messages in memory.
    """
    conf = {**librdkafka_config(settings), "client.id": "shoprec-impressions", "acks": 1,
            "partitioner": "murmur2_random", "linger.ms": settings.impression_linger_ms,
            "message.timeout.ms": 0, "queue.buffering.max.messages": settings.impression_buffer,
            "reconnect.backoff.max.ms": 2000, "log_level": 3,
            # a delivery report (a Python callback taking the API's GIL) only for a message that failed
            "delivery.report.only.error": True}
    conf.update(overrides)
    return confluent_kafka.Producer(conf, logger=librdkafka_log)


def _key_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def make_consumer(settings: Settings, topics: Iterable[str] | None = None, *, group: str | None = None,
                  **overrides) -> KafkaConsumer:
    """A group consumer that commits by hand (offsets move only after the batch is durable).

    ``topics`` defaults to the events topic of ``settings``.

    Fetches are large (a hostile 10 MB record must be fetched to be quarantined) and wait at most
    100 ms for data, which bounds what an idle-then-busy stream adds to event freshness.
    """
    kw = dict(group_id=group or settings.consumer_group, enable_auto_commit=False, auto_offset_reset="earliest",
              max_poll_records=settings.consumer_max_records, fetch_max_bytes=32 * 1024 * 1024,
              max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_wait_ms=100, **FAST_GROUP)
    kw.update(overrides)
    # topics go to the constructor: a subscribe() after construction can leave kafka-python
    # rejoining the group forever on tansu (joined subscription stays empty)
    return KafkaConsumer(*(topics or (settings.kafka_topic_events,)), **{**settings.kafka_client_kwargs(), **kw})


def send_events(producer: KafkaProducer, events: Iterable[dict], topic: str) -> list:
    """Send event dicts keyed by user_id to ``topic`` (``settings.kafka_topic_events``); returns the
    send futures (``.get()`` to await the ack)."""
    return [producer.send(topic, key=ev.get("user_id"), value=orjson.dumps(ev)) for ev in events]


def send_dlq(producer: KafkaProducer, raw: bytes | None, reason: str, message: str, key: bytes | None = None,
             headers: Iterable[tuple[str, bytes]] = (), *, topic: str, source_topic: str | None = None):
    """Quarantine a rejected record in ``topic`` (``settings.kafka_topic_dlq``): original value, key and
    headers, plus ``reason``, ``error`` and (when given) ``source_topic`` headers."""
    extra = [(DLQ_REASON_HEADER, reason.encode()), ("error", message[:500].encode())]
    if source_topic:
        extra.append(("source_topic", source_topic.encode()))
    return producer.send(topic, value=raw, key=key, headers=[*headers, *extra])
